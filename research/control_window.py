"""What CTRL's control buys at each denoising step: the control on the first j steps, the base after.

Run after `dvc repro finetune`:
    python research/control_window.py [--models models] [--ctrl models/ctrl] [--first 10 9 8 6 4 2 0]

For each j it samples the `sample` stage's requests (same seeds, 10 digits x classes x
n_per_request) with the fine-tuned model on the first j DDIM steps and the frozen base (adapters off,
y = NULL) on the rest, and prints the oracle accuracy and macro-F1, c_accuracy, the reward's mean
log p̂(y | x0), and the KL_t of every stochastic step against the base (zero from step j on). KL
spent at a step that buys no reward is KL the objective pays for nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ctrldiff.base import load_base
from ctrldiff.classifier import Classifier
from ctrldiff.control import ControlledModel, load_control
from ctrldiff.ctrl import gaussian_kl
from ctrldiff.ddim import ddim_step, timestep_pairs
from ctrldiff.evaluation import control_metrics, features_and_predictions
from ctrldiff.methods import balanced_requests
from ctrldiff.oracles import to_uint8
from ctrldiff.params import load_params
from ctrldiff.sampling import SamplerConfig, guided_eps, sample
from ctrldiff.tasks import load_reward, num_joint_classes


class ControlWindow:
    """A sampling step running the control on the first ``first`` DDIM steps and the base after.

    ``kl`` collects each stochastic step's KL_t (summed over pixels) per image, in step order.
    """

    def __init__(self, model: ControlledModel, steps: int, first: int):
        self.model, self.first = model, first
        self.index = {t: k for k, (t, _) in enumerate(timestep_pairs(model.base.scheduler, steps))}
        self.kl: list[torch.Tensor] = []

    def __call__(self, base, x, t, t_prev, z, c, cfg, y, y_null, seeds=None):
        with self.model.reference():
            eps_ref = guided_eps(base, x, t, c, cfg.guidance_scale, torch.full_like(y, y_null), y_null)
        mean_ref, sigma, _ = ddim_step(base.scheduler, x, eps_ref, t, t_prev, cfg.eta)
        mean = mean_ref
        if self.index[t] < self.first:
            eps = guided_eps(base, x, t, c, cfg.guidance_scale, y, y_null)
            mean, _, _ = ddim_step(base.scheduler, x, eps, t, t_prev, cfg.eta)
        if sigma > 0:
            self.kl.append(gaussian_kl(mean, mean_ref, sigma, "sum"))  # zero where the base runs
        return mean + sigma * z


def windowed_sample(
    model: ControlledModel, c: torch.Tensor, y: torch.Tensor, seeds: list[int], cfg: SamplerConfig, first: int
) -> tuple[torch.Tensor, np.ndarray]:
    """Images in [-1, 1] with the control on the first ``first`` steps, and KL_t per image (N, steps - 1)."""
    step = ControlWindow(model, cfg.steps, first)
    images = sample(model.base, c, seeds, cfg, y, model.y_null, step)
    return images, torch.stack(step.kl, 1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--ctrl", type=Path, default=Path("models/ctrl"))
    parser.add_argument("--data", type=Path, default=Path("data/labelled"))
    parser.add_argument("--first", type=int, nargs="+", default=[10, 9, 8, 6, 4, 2, 0])
    args = parser.parse_args()
    params = load_params("params.yaml")
    meta = json.loads((args.data / "meta.json").read_text())
    model = load_control(load_base(args.models / "base"), args.ctrl)
    reward = load_reward(meta, args.models)
    digit = Classifier.load(args.models / "classifier" / "digit")
    s, ro = params.sample, params.finetune.rollout  # the requests of `sample`, CTRL's own sampler
    cfg = SamplerConfig(ro.steps, ro.eta, ro.guidance_scale)
    req = balanced_requests(len(model.base.classes), num_joint_classes(meta), s.n_per_request, s.seed)
    c, y = torch.tensor(req.c.to_numpy()), torch.tensor(req.y.to_numpy())
    print(f"control on the first j of {ro.steps} steps, the base after; the {len(req)} requests of `sample`")
    print("  j | accuracy | macro-F1 | c_acc | E log p̂ |  KL | KL_t per stochastic step")
    for first in args.first:
        batches = [slice(i, i + s.batch_size) for i in range(0, len(req), s.batch_size)]
        seeds = req.seed.tolist()
        parts = [windowed_sample(model, c[b], y[b], seeds[b], cfg, first) for b in batches]
        images = torch.cat([p[0] for p in parts])
        kl = np.concatenate([p[1] for p in parts]).mean(0)
        with torch.no_grad():
            log_p = reward.log_prob(images, y).mean().item()
        pixels = to_uint8(images)
        by_task = control_metrics(pixels, y.numpy(), meta)
        metrics = by_task.get("joint") or next(iter(by_task.values()))  # several tasks: the joint class
        _, pred = features_and_predictions(digit, pixels)
        c_acc = (pred == c.numpy()).mean()
        row = " ".join(f"{v:.1f}" for v in kl)
        print(
            f"{first:3d} | {metrics['accuracy']:8.3f} | {metrics['macro_f1']:8.3f} | {c_acc:5.3f} "
            f"| {log_p:7.3f} | {kl.sum():4.1f} | {row}",
            flush=True,
        )


if __name__ == "__main__":
    main()
