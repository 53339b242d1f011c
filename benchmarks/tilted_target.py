"""What exact sampling from CTRL's target would give: the tilted base, estimated by reweighting.

Run after `dvc repro train_classifier base` (10 min on 2 cores; `--cache` keeps the base images):
    python benchmarks/tilted_target.py [--setting single|multitask] [--n 1000] [--cache F.npz]
                                       [--compare data/samples/ctrl]

CTRL's optimum samples p_γ(x | c, y) ∝ p̂(y | x)^γ p_pre(x | c). This script draws n base images per
digit c (the `sample` section's sampler, seeds disjoint from the evaluation's) and weights each by
p̂(y | x)^γ, self-normalised within (c, y). The weighted oracle accuracy and macro-F1 per task, and the
digit accuracy (c_accuracy), are what a perfect optimiser would reach among the images the base itself
produces. ESS is the effective sample size per (c, y) (mean over pairs); near 1 the estimate is
best-of-n. E log p̂, KL and the objective γ E log p̂ − KL are CTRL's own terms (its finetune log's
`reward` and `kl`) at this optimum, for comparison with a run's. The target also holds images the
base makes too rarely to be drawn here (a blank "3"): CTRL can beat these figures only by going
there, which is where digits stop being recognised. So a low accuracy here says the reward, not the
optimiser, holds CTRL back at fidelity. `--compare` reads a method's samples with the same reward and
prints their mean log p̂(y | x) per (c, y) beside the target's at the pipeline's γ: where the method
stops short of an optimum the base's own images reach.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ctrldiff.classifier import Classifier
from ctrldiff.data import table_images
from ctrldiff.evaluation import features_and_predictions
from ctrldiff.methods import build, generate
from ctrldiff.oracles import to_model_space
from ctrldiff.params import load_params
from ctrldiff.tasks import (
    SETTINGS,
    class_counts,
    control_tasks,
    join,
    load_reward,
    oracle_classes,
    split_joint,
)
from ctrldiff.tilt import pair_terms, tilted_weights, weighted_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="single")
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--n", type=int, default=1000, help="base images per digit")
    parser.add_argument("--seed", type=int, default=300_000, help="first seed (the evaluation uses 1,000+)")
    parser.add_argument("--gammas", type=float, nargs="+", default=[0.0, 1.0, 10.0, 30.0, 100.0, 300.0])
    parser.add_argument("--cache", type=Path, help="an .npz of base images: read if present, else written")
    parser.add_argument(
        "--compare", type=Path, help="a method's samples folder (data/samples/ctrl): its log p̂ per (c, y)"
    )
    args = parser.parse_args()
    params = load_params("params.yaml")
    meta = json.loads((SETTINGS[args.setting].data / "meta.json").read_text())
    weights = params.multitask.weights if args.setting == "multitask" else None
    reward = load_reward(meta, args.models, weights)
    tasks, counts = control_tasks(meta), class_counts(meta)
    digit = Classifier.load(args.models / "classifier" / "digit")

    if args.cache and args.cache.is_file():
        cached = np.load(args.cache)
        c, pixels = cached["c"], cached["pixels"]
    else:
        base, step, _ = build("base", None, meta, args.models)
        req, pixels, _ = generate(base, step, None, params.sample, 1, args.n, args.seed, "base")
        c = req.c.to_numpy()
        if args.cache:
            np.savez_compressed(args.cache, c=c, pixels=pixels)
    with torch.no_grad():
        log_p = reward(to_model_space(pixels)).log_softmax(-1).numpy()  # (images, joint classes)
    truth = [oracle_classes(pixels, meta["tasks"][task])[1] for task in tasks]
    _, said_digit = features_and_predictions(digit, pixels)
    recognised = said_digit == c
    joint_y, joint_truth = np.arange(log_p.shape[1]), join(truth, counts)

    print(f"{len(c) // len(np.unique(c))} base images per digit; base c_accuracy {recognised.mean():.3f}")
    columns = [f"{t} acc / F1" for t in tasks] + (["joint acc / F1"] if len(tasks) > 1 else [])
    print(
        f"{'gamma':>6} "
        + " ".join(f"{h:>24}" for h in columns)
        + f" {'c_accuracy':>10} {'ESS':>6} {'E log p̂':>8} {'KL':>6} {'objective':>9}"
    )
    for gamma in args.gammas:
        w = tilted_weights(log_p, c, gamma)  # every (c, y) weighs the same
        figures = [
            weighted_scores(asked, got, w)
            for asked, got in zip(split_joint(joint_y, counts), truth, strict=True)
        ]
        if len(tasks) > 1:
            figures.append(weighted_scores(joint_y, joint_truth, w))
        c_acc = float(np.average(np.broadcast_to(recognised[:, None], w.shape), weights=w))
        # CTRL's own terms at this optimum, as its finetune log reads them: reward E log p̂ and KL, nats.
        reward_term, kl, ess = (a.mean() for a in pair_terms(log_p, c, w))
        row = " ".join(f"{f'{a:.3f} / {f:.3f}':>24}" for a, f in figures)
        print(
            f"{gamma:6g} {row} {c_acc:10.3f} {ess:6.1f} {reward_term:8.3f} {kl:6.2f} "
            f"{gamma * reward_term - kl:9.2f}"
        )
    print(f"at gamma {args.gammas[-1]:g}, per requested joint class: oracle accuracy | mean p̂(y | x)")
    print(" ".join(f"{np.average(joint_truth == y, weights=w[:, y]):.3f}" for y in joint_y), end=" | ")
    print(" ".join(f"{np.average(np.exp(log_p[:, y]), weights=w[:, y]):.2f}" for y in joint_y))
    if args.compare:
        compare(args.compare, reward, meta, log_p, c, params.gamma)


def compare(folder: Path, reward, meta: dict, log_p: np.ndarray, c: np.ndarray, gamma: float) -> None:
    """Mean log p̂(y | x) per (c, y): the target at the pipeline's γ beside a method's samples.

    Pairs the base serves (its tilted images sit in the class: E log p̂ > -1) are summarised apart
    from those it does not, where any reward gained is gained by leaving the base's images.
    """
    samples = pd.read_parquet(folder / "samples.parquet")
    images = table_images(samples, meta["resolution"], meta["channels"])
    s_c, s_y = samples["c"].to_numpy(), samples["y"].to_numpy()
    with torch.no_grad():
        s_lp = reward(to_model_space(images)).log_softmax(-1).numpy()[np.arange(len(s_y)), s_y]
    target, kl, _ = pair_terms(log_p, c, tilted_weights(log_p, c, gamma))
    digits, classes = np.unique(c), np.arange(log_p.shape[1])
    method = np.array([[s_lp[(s_c == k) & (s_y == y)].mean() for y in classes] for k in digits])
    print(f"\nmean log p̂(y | x) per (c, y), target at gamma {gamma:g} | {folder}:")
    print("c  " + " ".join(f"{f'y = {y}':>15}" for y in classes))
    for k, t_row, m_row in zip(digits, target, method, strict=True):
        print(f"{k:<2} " + " ".join(f"{f'{t:.2f} | {m:.2f}':>15}" for t, m in zip(t_row, m_row, strict=True)))
    served = target > -1.0
    for name, rows in (("served by the base", served), ("not served", ~served)):
        if rows.any():
            print(
                f"{rows.sum():3d} pairs {name}: target E log p̂ {target[rows].mean():.3f} at KL "
                f"{kl[rows].mean():.2f} nats; {folder.name} {method[rows].mean():.3f}"
            )


if __name__ == "__main__":
    main()
