"""Sampling throughput of the trained base model at the default DDIM settings (images per second).

Run after `dvc repro base`:  python benchmarks/sampling_throughput.py [--batch 80] [--repeats 2]
Prints one row per configuration, side by side, from one run on the same machine.
"""

from __future__ import annotations

import argparse
import time

import torch

from ctrldiff.base import load_base
from ctrldiff.params import load_params
from ctrldiff.sampling import SamplerConfig, nfe_per_image, sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    params = load_params("params.yaml")
    model = load_base("models/base")
    default = SamplerConfig(params.sample.steps, params.sample.eta, params.sample.guidance_scale)
    configs = {
        "default (CFG)": default,
        "no guidance": SamplerConfig(default.steps, default.eta, 1.0),
        "half the steps": SamplerConfig(max(1, default.steps // 2), default.eta, default.guidance_scale),
    }
    c = torch.arange(args.batch) % len(model.classes)
    print(f"torch threads: {torch.get_num_threads()}, batch {args.batch}, {model.sample_shape}")
    print(f"{'configuration':<16} {'steps':>5} {'NFE/img':>8} {'img/s':>8} {'ms/img':>8}")
    for name, cfg in configs.items():
        sample(model, c[:4], list(range(4)), cfg)  # warm-up
        start = time.perf_counter()
        for r in range(args.repeats):
            sample(model, c, list(range(r * args.batch, (r + 1) * args.batch)), cfg)
        per_image = (time.perf_counter() - start) / (args.repeats * args.batch)
        nfe = nfe_per_image(cfg)
        print(f"{name:<16} {cfg.steps:>5} {nfe:>8} {1 / per_image:>8.1f} {1000 * per_image:>8.1f}")


if __name__ == "__main__":
    main()
