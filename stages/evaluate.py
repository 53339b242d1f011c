"""Stage `evaluate`: oracle metrics of one method's samples, in the shape every method fills.

With `--setting multitask`, one entry per task (compressibility_half, ink) and one for the joint class.
"""

from __future__ import annotations

import argparse
import json

import pandas as pd
import torch

from ctrldiff.classifier import Classifier
from ctrldiff.data import table_images
from ctrldiff.evaluation import evaluate_samples, real_by_split
from ctrldiff.io import confusion_pairs, write_json
from ctrldiff.oracles import to_model_space
from ctrldiff.params import load_params
from ctrldiff.tasks import SETTINGS, load_reward


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", required=True)
    parser.add_argument("--setting", default="single", choices=sorted(SETTINGS))
    parser.add_argument(
        "--no-fidelity", action="store_true", help="paper scale: c is a prompt, no c-classifier to score it"
    )
    args = parser.parse_args(argv)
    method, setting = args.method, SETTINGS[args.setting]
    label_meta = json.loads((setting.data / "meta.json").read_text())
    samples_dir = setting.samples / method
    samples = pd.read_parquet(samples_dir / "samples.parquet")
    sample_meta = json.loads((samples_dir / "meta.json").read_text())

    digit_clf, real = None, None
    if not args.no_fidelity:
        digit_clf = Classifier.load("models/classifier/digit")
        digit_clf.check_classes(label_meta["tasks"]["digit"]["classes"])
        real = real_by_split(pd.read_parquet(setting.data / "images.parquet"), label_meta)
    metrics = evaluate_samples(
        method,
        table_images(samples, label_meta["resolution"], label_meta["channels"]),
        samples["c"].to_numpy(),
        samples["y"].to_numpy(),
        label_meta,
        digit_clf,
        real,
        sample_meta["cost"],
    )
    metrics["scale"] = sample_meta.get("scale")  # the guidance scale `tune` chose (None: no scale)
    # CTRL's own terms on these images: E log p̂(y | x) under the reward, and (CTRL) the trajectory KL
    reward = load_reward(label_meta, weights=load_params("params.yaml").multitask.weights).requires_grad_(
        False
    )
    images = to_model_space(table_images(samples, label_meta["resolution"], label_meta["channels"]))
    y = torch.tensor(samples["y"].to_numpy())
    with torch.no_grad():
        log_p = torch.cat(
            [reward.log_prob(x, yy) for x, yy in zip(images.split(500), y.split(500), strict=True)]
        )
    metrics["objective"] = {
        "reward_log_p": float(log_p.mean()),
        "kl": float(samples["kl"].mean()) if "kl" in samples else (0.0 if method == "base" else None),
    }
    write_json(setting.metrics / "eval" / f"{method}.json", metrics)
    shown = list(metrics["tasks"])[-1]  # the only task, or with several the joint one
    confusion_pairs(
        setting.metrics / "eval" / f"{method}_confusion.csv",
        metrics["tasks"][shown]["confusion"],
        ("requested", "achieved"),
    )
    fid = metrics["fidelity"]
    tasks = ", ".join(
        f"{name} accuracy {t['accuracy']:.3f}, macro-F1 {t['macro_f1']:.3f}"
        for name, t in metrics["tasks"].items()
    )
    fidelity = (
        "fidelity not measured"
        if fid is None
        else (
            f"c_accuracy {fid['c_accuracy']:.3f}, Fréchet {fid['frechet']:.2f} "
            f"(held-out real {fid['frechet_real_heldout']:.2f})"
        )
    )
    print(f"{method}: {tasks}; {fidelity}")


if __name__ == "__main__":
    main()
