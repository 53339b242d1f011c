"""Where CTRL spends its trajectory KL: per requested class y, per denoising step.

Run after `dvc repro finetune`:
    python research/kl_per_step.py [--models models] [--ctrl models/ctrl] [--n 40]

For each requested class y it rolls out ``--n`` trajectories (digits c = 0..9 in turn, fixed seeds)
with the `sample` section's sampler, as `finetune` does, and prints the mean KL_t of every
stochastic step (t -> t_prev), its sum, the share of inked pixels (> 128), and the digit classifier's
c_accuracy on those images. A control exercised at the last stochastic steps changes texture; one
exercised at the first steps changes the structure (for instance, erases the digit).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ctrldiff.base import load_base
from ctrldiff.classifier import Classifier
from ctrldiff.control import load_control
from ctrldiff.ctrl import RolloutConfig, rollout
from ctrldiff.ddim import timestep_pairs
from ctrldiff.evaluation import features_and_predictions
from ctrldiff.oracles import to_uint8
from ctrldiff.params import load_params
from ctrldiff.sampling import request_noise


def kl_per_step(model, c: torch.Tensor, y: int, seeds: list[int], cfg: RolloutConfig) -> tuple:
    """(mean KL of each stochastic step over the trajectories, the images), as ``rollout`` computes them."""
    noise = request_noise(seeds, model.base.sample_shape, cfg.steps)
    with torch.no_grad():
        images, _, kl_steps = rollout(model, c, torch.full_like(c, y), noise, cfg)
    return kl_steps.mean(0).tolist(), to_uint8(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--ctrl", type=Path, default=Path("models/ctrl"))
    parser.add_argument("--n", type=int, default=40, help="trajectories per requested class")
    args = parser.parse_args()
    params = load_params("params.yaml")
    model = load_control(load_base(args.models / "base"), args.ctrl)
    digit = Classifier.load(args.models / "classifier" / "digit")
    s = params.finetune.rollout  # the sampler CTRL was trained with
    cfg = RolloutConfig(s.steps, s.eta, s.guidance_scale, grad_steps=s.steps)
    pairs = [p for p in timestep_pairs(model.base.scheduler, s.steps) if p[1] >= 0]
    c = torch.arange(args.n) % len(model.base.classes)
    seeds = [7_000_000 + i for i in range(args.n)]  # disjoint from the stages' seeds
    print("KL_t (nats, summed over pixels), mean over trajectories, step t -> t_prev:")
    print("y  | " + " ".join(f"{t}>{tp}".rjust(7) for t, tp in pairs) + " |   total | inked | c_acc")
    for y in range(len(model.y_classes)):
        steps, pixels = kl_per_step(model, c, y, seeds, cfg)
        _, pred = features_and_predictions(digit, pixels)
        inked = float((pixels > 128).mean())
        c_acc = float((pred == c.numpy()).mean())
        row = " ".join(f"{v:7.1f}" for v in steps)
        print(f"{y:<2} | {row} | {np.sum(steps):7.1f} | {inked:5.3f} | {c_acc:5.3f}")


if __name__ == "__main__":
    main()
