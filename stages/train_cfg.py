"""Stage `train_cfg`: the classifier-free guidance baseline, the base fine-tuned on (c, x, y) triples.

Same LoRA + y-embedding as CTRL (finetune.lora_rank / lora_targets), its own rates (baselines.cfg_lr_*),
trained with
the denoising loss instead of the reward: the only difference between the two is the signal.
"""

from __future__ import annotations

import time

import pandas as pd
from accelerate.utils import set_seed

from ctrldiff.base import load_base
from ctrldiff.classifier import task_tensors
from ctrldiff.control import add_control
from ctrldiff.guidance.cfg import train_cfg
from ctrldiff.io import atomic_dir, read_json, write_json
from ctrldiff.params import load_params


def main() -> None:
    params = load_params("params.yaml")
    ft, cfg = params.finetune, params.baselines
    meta = read_json("data/labelled/meta.json")
    table = pd.read_parquet("data/labelled/images.parquet")
    x, y, c = task_tensors(table, meta, "compressibility", "train")
    set_seed(params.seed)
    model = add_control(
        load_base("models/base"), meta["tasks"]["compressibility"]["classes"], ft.lora_rank, ft.lora_targets
    )
    start = time.perf_counter()
    losses = train_cfg(
        model,
        x,
        c,
        y,
        cfg.cfg_train_steps,
        cfg.cfg_batch_size,
        cfg.cfg_lr_lora,
        cfg.cfg_lr_embedding,
        cfg.cfg_dropout,
        params.seed,
    )
    with atomic_dir("models/cfg") as tmp:
        model.save(tmp)
    tail = losses[-50:]
    write_json(
        "metrics/train_cfg.json",
        {
            "triples": len(x),
            "steps": len(losses),
            "final_loss": sum(tail) / len(tail),
            "minutes": round((time.perf_counter() - start) / 60, 2),
        },
    )
    print(f"train_cfg: {len(x)} triples, {len(losses)} steps, final loss {sum(tail) / len(tail):.4f}")


if __name__ == "__main__":
    main()
