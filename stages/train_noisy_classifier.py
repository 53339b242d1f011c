"""Stage `train_noisy_classifier`: p(y | x_t, t) on the offline compressibility pairs.

Classifier guidance's classifier: it sees noisy images, so its gradient needs no denoiser pass.
"""

from __future__ import annotations

import pandas as pd
import torch

from ctrldiff.base import load_base
from ctrldiff.classifier import task_tensors
from ctrldiff.guidance.classifier_guidance import save_noisy_classifier, train_noisy_classifier
from ctrldiff.io import atomic_dir, read_json, write_json
from ctrldiff.params import load_params


def main() -> None:
    params = load_params("params.yaml")
    cfg = params.baselines
    meta = read_json("data/labelled/meta.json")
    table = pd.read_parquet("data/labelled/images.parquet")
    base = load_base("models/base")
    if base.vae is not None:
        raise SystemExit(
            "train_noisy_classifier: latent (VAE) bases are not supported; drop classifier_guidance"
        )
    x, y, _ = task_tensors(table, meta, "compressibility", "train")
    num_y = len(meta["tasks"]["compressibility"]["classes"])
    model = train_noisy_classifier(
        x,
        y,
        num_y,
        base.scheduler,
        cfg.noisy_classifier_steps,
        cfg.noisy_classifier_batch,
        cfg.noisy_classifier_lr,
        params.classifier.width,
        params.seed,
    )
    # Accuracy on the validation pairs at a few noise levels: how much it can guide, and where.
    xv, yv, _ = task_tensors(table, meta, "compressibility", "val")
    accuracy = {}
    for t in (0, 250, 500, 750):
        noise = base.scheduler.add_noise(
            xv, torch.randn(xv.shape, generator=torch.Generator().manual_seed(t)), torch.full((len(xv),), t)
        )
        with torch.no_grad():
            pred = model(noise, torch.full((len(xv),), t)).argmax(-1)
        accuracy[f"val_accuracy_t{t}"] = float((pred == yv).float().mean())
    arch = {"in_channels": x.shape[1] + 1, "num_classes": num_y, "width": params.classifier.width}
    with atomic_dir("models/noisy_classifier") as tmp:
        save_noisy_classifier(model, {"arch": arch, "task": "compressibility", "noisy": True}, tmp)
    write_json("metrics/noisy_classifier.json", accuracy)
    print("noisy classifier: " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))


if __name__ == "__main__":
    main()
