"""Where the reward classifier and the oracle part ways: real digits vs generated ones.

Run after `dvc repro finetune`:
    python research/reward_gap.py [--models models] [--ctrl models/ctrl] [--n 2]

For the held-out real digits, the base model's samples and CTRL's samples (the same balanced (c, y)
requests and seeds as the `sample` stage, n per pair) it prints the pixel statistics JPEG size is
most sensitive to (the share of dark pixels that are exactly black, the share of faint haze at levels
1-32), the mean oracle size, and how often the compressibility classifier's verdict equals the
oracle's. For CTRL it then splits each requested class: the classifier's verdict against the oracle's.
A classifier that agrees with the oracle on real digits but not on generated ones rewards CTRL for
images the oracle puts in another class.
Last, the reward's own ceiling: for each class, the largest p̂(y | x) on the held-out real digits and
the oracle's share of class y among the `--top` real digits with the highest p̂(y | x).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ctrldiff.data import table_images
from ctrldiff.methods import build, generate
from ctrldiff.oracles import to_model_space
from ctrldiff.params import load_params
from ctrldiff.tasks import load_reward, oracle_classes


def pixel_stats(pixels: np.ndarray) -> dict[str, float]:
    """Share of dark pixels (< 64) that are exactly 0, and share of all pixels in the faint 1-32 range."""
    dark = pixels[pixels < 64]
    return {"black": float((dark == 0).mean()), "haze": float(((pixels >= 1) & (pixels <= 32)).mean())}


def verdicts(
    reward: torch.nn.Module, pixels: np.ndarray, spec: dict
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(classifier's class probabilities, oracle's class, oracle score) of each image."""
    with torch.no_grad():
        probs = reward(to_model_space(pixels)).softmax(-1).numpy()
    scores, truth = oracle_classes(pixels, spec)  # (score, class)
    return probs, truth, scores


def confident_purity(probs: np.ndarray, truth: np.ndarray, top: int) -> list[tuple[float, float]]:
    """Per class y: the largest p̂(y | x), and the oracle's share of y among the ``top`` images by p̂(y | x).

    At large γ CTRL's target keeps only images where p̂(y | x) is near its maximum. If even among
    real digits those are not of class y by the oracle, no optimiser reaches full accuracy with this
    reward: the share bounds what the tilted target can give on a class.
    """
    ceiling = []
    for k in range(probs.shape[1]):
        best = np.argsort(-probs[:, k])[:top]
        ceiling.append((float(probs[:, k].max()), float((truth[best] == k).mean())))
    return ceiling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--ctrl", type=Path, default=Path("models/ctrl"))
    parser.add_argument("--n", type=int, default=2, help="images per (c, y) pair")
    parser.add_argument("--top", type=int, default=50, help="most confident real digits per class")
    args = parser.parse_args()
    params = load_params("params.yaml")
    meta = json.loads(Path("data/labelled/meta.json").read_text())
    spec = meta["tasks"]["compressibility"]
    reward = load_reward(meta, args.models)
    table = pd.read_parquet("data/labelled/images.parquet")
    real = table_images(table[table.split == "val"], meta["resolution"], meta["channels"])
    sets = {"real (held out)": (real, None)}
    num_y = len(spec["classes"])
    for method in ("base", "ctrl"):
        model, step, y_null = build(method, None, meta, args.models, ctrl=args.ctrl)
        req, pixels, _ = generate(
            model, step, y_null, params.sample, num_y, args.n, params.sample.seed, method
        )
        sets[method] = (pixels, req.y.to_numpy())

    print(f"{'images':<16} {'black':>6} {'haze':>6} {'JPEG B':>7} {'classifier = oracle':>20}")
    judged = {name: verdicts(reward, pixels, spec) for name, (pixels, _) in sets.items()}
    for name, (pixels, _) in sets.items():
        probs, truth, scores = judged[name]
        said = probs.argmax(-1)
        stats = pixel_stats(pixels)
        agree = (said == truth).mean()
        print(f"{name:<16} {stats['black']:6.3f} {stats['haze']:6.3f} {scores.mean():7.1f} {agree:20.3f}")

    asked = sets["ctrl"][1]
    probs, truth, scores = judged["ctrl"]
    said = probs.argmax(-1)
    print("\nCTRL, per requested class: images the classifier puts in it, and of those the oracle's classes")
    for k in range(num_y):
        hit = (asked == k) & (said == k)
        oracle = np.bincount(truth[hit], minlength=num_y).tolist()
        print(
            f"y = {k}: classifier {hit.sum():3d} / {(asked == k).sum()}, oracle classes of those {oracle}, "
            f"mean size {scores[asked == k].mean():.0f} B (thresholds {spec['thresholds']})"
        )

    print(f"\nThe reward's ceiling on the held-out real digits (its {args.top} most confident per class)")
    probs, truth, _ = judged["real (held out)"]
    for k, (most, share) in enumerate(confident_purity(probs, truth, args.top)):
        print(f"y = {k}: largest p̂(y | x) {most:.2f}, oracle class = y for {share:.2f} of the {args.top}")


if __name__ == "__main__":
    main()
