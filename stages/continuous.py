"""Stage `continuous`: a continuous target compressibility from CTRL's class embeddings, no retraining.

The targets are spread evenly over the range CTRL's classes achieve (their oracle mean JPEG sizes
in metrics/eval/ctrl.json); each is requested for every digit c by a convex combination of the
learned class embeddings (`ctrldiff.continuous`). Each image's true JPEG size against its target
gives R², MAE and RMSE, per image and per target (mean of its images), and a parity plot.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from ctrldiff.base import default_device
from ctrldiff.continuous import interpolation_weights, parity_metrics, spread_targets
from ctrldiff.io import read_json, write_json
from ctrldiff.methods import build
from ctrldiff.oracles import to_uint8
from ctrldiff.params import load_params
from ctrldiff.plots import parity_plot
from ctrldiff.sampling import SamplerConfig, sample_requests
from ctrldiff.tasks import oracle_classes


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    params = load_params("params.yaml")
    cont, sampler = params.continuous, params.sample
    label_meta = read_json("data/labelled/meta.json")
    spec = label_meta["tasks"]["compressibility"]
    means = read_json("metrics/eval/ctrl.json")["tasks"]["compressibility"]["mean_score_per_class"]
    targets = spread_targets(means, cont.num_targets)

    base, _, y_null = build("ctrl", None, label_meta, device=default_device())
    # every target for every digit c, per_digit times; request i uses seed + i
    target_idx, c = np.meshgrid(np.arange(len(targets)), np.arange(len(base.classes)), indexing="ij")
    target_idx, c = np.repeat(target_idx.ravel(), cont.per_digit), np.repeat(c.ravel(), cont.per_digit)
    requested = targets[target_idx]
    weights = torch.tensor(interpolation_weights(requested, means), dtype=torch.float32)
    images, seconds = sample_requests(
        base,
        torch.tensor(c),
        (cont.seed + np.arange(len(c))).tolist(),
        SamplerConfig(sampler.steps, sampler.eta, sampler.guidance_scale),
        sampler.batch_size,
        weights,
        y_null,
        desc="continuous",
    )
    achieved, _ = oracle_classes(to_uint8(images), spec)
    per_target = np.array([achieved[target_idx == i].mean() for i in range(len(targets))])
    metrics = {
        "rule": "piecewise-linear between the neighbouring classes' achieved means, clamped",
        "class_means_bytes": means,
        "targets_bytes": targets.tolist(),
        "n_images": len(c),
        "per_image": parity_metrics(requested, achieved),
        "per_target": parity_metrics(targets, per_target),
        "achieved_mean_per_target_bytes": per_target.tolist(),
        "seconds_per_image": seconds,
    }
    write_json("metrics/continuous.json", metrics)
    img, tgt = metrics["per_image"], metrics["per_target"]
    parity_plot(
        "metrics/continuous_parity.png",
        requested,
        achieved,
        "JPEG bytes",
        f"continuous y: R² {img['r2']:.3f} per image, {tgt['r2']:.3f} per target mean",
    )
    print(
        f"continuous: {len(c)} images; per image R² {img['r2']:.3f}, MAE {img['mae']:.1f} B, "
        f"RMSE {img['rmse']:.1f} B; per target R² {tgt['r2']:.3f}, MAE {tgt['mae']:.1f} B"
    )


if __name__ == "__main__":
    main()
