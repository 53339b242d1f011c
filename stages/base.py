"""Stage `base`: the pre-trained model p_pre(x | c): trained on the labelled digits (embedded) or
loaded from a Stable Diffusion folder or hub id (paper scale), recording which weights were used."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import torch

from ctrldiff.base import build_embedded, load_stable_diffusion, read_prompts, train_base
from ctrldiff.data import table_images
from ctrldiff.io import atomic_dir, write_json
from ctrldiff.oracles import to_model_space
from ctrldiff.params import BaseParams, load_params

DATA = Path("data/labelled")
OUT = "models/base"


def load_pretrained(cfg: BaseParams) -> None:
    """Paper scale: load Stable Diffusion once (fails early on a bad path) and record what was used."""
    prompts = read_prompts(cfg.prompts)
    base = load_stable_diffusion(cfg.pretrained, prompts)
    with atomic_dir(OUT) as tmp:
        (tmp / "base.json").write_text(json.dumps(base.meta, indent=2) + "\n")
    write_json(
        "metrics/base.json",
        {
            "kind": base.meta["kind"],
            "pretrained": cfg.pretrained,
            "prompts": len(prompts),
            "resolution": base.meta["resolution"],
        },
    )
    print(f"base: Stable Diffusion from {cfg.pretrained}, {len(prompts)} prompts")


def main(argv: list[str] | None = None) -> None:
    params = load_params("params.yaml")
    if params.base.kind == "stable-diffusion":
        return load_pretrained(params.base)
    meta = json.loads((DATA / "meta.json").read_text())
    table = pd.read_parquet(DATA / "images.parquet")
    train = table[table.split == "train"]  # the validation digits stay unseen (Fréchet reference)
    x = to_model_space(table_images(train, meta["resolution"], meta["channels"]))
    classes = meta["tasks"]["digit"]["classes"]
    c = torch.tensor(train["c"].map({k: i for i, k in enumerate(classes)}).to_numpy())

    base = build_embedded(params.base, len(classes), meta["resolution"], meta["channels"], params.seed)
    start = time.perf_counter()
    losses = train_base(base, x, c, params.base, params.seed)
    seconds = time.perf_counter() - start
    with atomic_dir(OUT) as tmp:
        base.save(tmp)
    n_params = sum(p.numel() for p in base.unet.parameters()) + sum(
        p.numel() for p in base.encoder.parameters()
    )
    write_json(
        "metrics/base.json",
        {
            "kind": "embedded",
            "parameters": n_params,
            "train_steps": params.base.train_steps,
            "train_seconds": round(seconds, 1),
            "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        },
    )
    print(f"base: {n_params / 1e6:.2f} M parameters, {seconds / 60:.1f} min, final loss {losses[-1]:.4f}")


if __name__ == "__main__":
    main()
