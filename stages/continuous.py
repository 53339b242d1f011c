"""Stage `continuous`: a continuous target compressibility from CTRL's class embeddings, no retraining.

The targets are spread evenly over the range CTRL's classes achieve (their oracle mean JPEG sizes
in metrics/eval/ctrl.json); each is requested for every digit c by a convex combination of the
learned class embeddings (`ctrldiff.continuous`); with `continuous.rule: calibrated` the weights come
from a calibration pass along the class path on seeds of its own. Each image's true JPEG size against
its target gives R², MAE and RMSE, per image and per target (mean of its images), and a parity plot.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from ctrldiff.base import BaseModel, default_device
from ctrldiff.continuous import (
    calibrated_positions,
    calibration_grid,
    class_mean_positions,
    parity_metrics,
    path_weights,
    spread_targets,
)
from ctrldiff.io import read_json, write_json
from ctrldiff.methods import build
from ctrldiff.oracles import to_uint8
from ctrldiff.params import SampleParams, load_params
from ctrldiff.plots import parity_plot
from ctrldiff.sampling import SamplerConfig, sample_requests
from ctrldiff.tasks import oracle_classes

RULES = {
    "class_means": "piecewise-linear between the neighbouring classes' achieved means, clamped",
    "calibrated": "inverse of an isotonic fit of the score measured along the class path, clamped",
}


def _sample_positions(
    base: BaseModel,
    y_null: int,
    u: np.ndarray,
    means: list[float],
    per_digit: int,
    seed: int,
    sampler: SampleParams,
    spec: dict,
    desc: str,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Sample every (position u on the class path, digit c) per_digit times (image i uses seed + i);
    returns each image's index into u, its oracle JPEG size and the seconds per image."""
    u_idx, c = np.meshgrid(np.arange(len(u)), np.arange(len(base.classes)), indexing="ij")
    u_idx, c = np.repeat(u_idx.ravel(), per_digit), np.repeat(c.ravel(), per_digit)
    images, seconds = sample_requests(
        base,
        torch.tensor(c),
        (seed + np.arange(len(c))).tolist(),
        SamplerConfig(sampler.steps, sampler.eta, sampler.guidance_scale),
        sampler.batch_size,
        torch.tensor(path_weights(u[u_idx], means), dtype=torch.float32),
        y_null,
        desc=desc,
    )
    sizes, _ = oracle_classes(to_uint8(images), spec)
    return u_idx, sizes, seconds


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    params = load_params("params.yaml")
    cont, sampler = params.continuous, params.sample
    label_meta = read_json("data/labelled/meta.json")
    spec = label_meta["tasks"]["compressibility"]
    means = read_json("metrics/eval/ctrl.json")["tasks"]["compressibility"]["mean_score_per_class"]
    targets = spread_targets(means, cont.num_targets)
    base, _, y_null = build("ctrl", None, label_meta, device=default_device())

    calibration = None
    if cont.rule == "calibrated":
        grid = calibration_grid(len(means), cont.calibration_points)
        n_cal = len(grid) * len(base.classes) * cont.calibration_per_digit
        n_eval = len(targets) * len(base.classes) * cont.per_digit
        if cont.calibration_seed < cont.seed + n_eval and cont.seed < cont.calibration_seed + n_cal:
            raise ValueError(
                f"params.yaml: continuous.calibration_seed {cont.calibration_seed} (+{n_cal} images) "
                f"overlaps continuous.seed {cont.seed} (+{n_eval}); move one of them so that the "
                "calibration never sees the evaluation's noise"
            )
        u_idx, sizes, _ = _sample_positions(
            base,
            y_null,
            grid,
            means,
            cont.calibration_per_digit,
            cont.calibration_seed,
            sampler,
            spec,
            "calibration",
        )
        grid_scores = np.array([sizes[u_idx == i].mean() for i in range(len(grid))])
        positions = calibrated_positions(targets, grid, grid_scores)
        calibration = {"positions": grid.tolist(), "mean_bytes": grid_scores.tolist(), "n_images": n_cal}
    else:
        positions = class_mean_positions(targets, means)

    target_idx, achieved, seconds = _sample_positions(
        base, y_null, positions, means, cont.per_digit, cont.seed, sampler, spec, "continuous"
    )
    requested = targets[target_idx]
    per_target = np.array([achieved[target_idx == i].mean() for i in range(len(targets))])
    metrics = {
        "rule": RULES[cont.rule],
        "class_means_bytes": means,
        "targets_bytes": targets.tolist(),
        "positions": positions.tolist(),
        "calibration": calibration,
        "n_images": len(target_idx),
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
        f"continuous y ({cont.rule}): R² {img['r2']:.3f} per image, {tgt['r2']:.3f} per target mean",
    )
    print(
        f"continuous ({cont.rule}): {len(target_idx)} images; per image R² {img['r2']:.3f}, "
        f"MAE {img['mae']:.1f} B, RMSE {img['rmse']:.1f} B; "
        f"per target R² {tgt['r2']:.3f}, MAE {tgt['mae']:.1f} B"
    )


if __name__ == "__main__":
    main()
