"""Turn raw oracle scores into classes, and split the labelled table.

Convention for every label: class 0 holds the highest scores (for JPEG size: the least
compressible images, as in the paper), class K-1 the lowest.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ctrldiff.data import png_bytes, read_source
from ctrldiff.oracles import oracle_scores
from ctrldiff.params import Params


def quantile_thresholds(scores: np.ndarray, num_classes: int) -> list[float]:
    """K-1 cut points at the dataset quantiles, in descending order, giving near-equal classes."""
    qs = [(num_classes - i) / num_classes for i in range(1, num_classes)]
    return [float(t) for t in np.quantile(np.asarray(scores, dtype=float), qs)]


def bin_scores(scores: np.ndarray, thresholds: list[float]) -> np.ndarray:
    """Class of each score: the number of thresholds it falls below (ties go to the higher class)."""
    cuts = np.sort(np.asarray(thresholds, dtype=float))[::-1]
    return (np.asarray(scores, dtype=float)[:, None] < cuts[None, :]).sum(axis=1)


def stratified_split(strata: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """A seeded train/val split that keeps each stratum's share: returns 'train'/'val' per item."""
    rng = np.random.default_rng(seed)
    split = np.full(len(strata), "train", dtype=object)
    for value in np.unique(strata):
        idx = np.flatnonzero(strata == value)
        rng.shuffle(idx)
        split[idx[: int(round(val_fraction * len(idx)))]] = "val"
    return split


def disjoint_halves(n: int, seed: int, names: tuple[str, str]) -> np.ndarray:
    """Assign each of n items to one of two named halves (seeded), so no item carries both labels."""
    order = np.random.default_rng(seed).permutation(n)
    half = np.empty(n, dtype=object)
    half[order[: n // 2]] = names[0]
    half[order[n // 2 :]] = names[1]
    return half


def second_task_spec(params: Params) -> dict:
    """The second label's entry of ``meta.json`` (thresholds are filled in once scores exist)."""
    second = params.label.second
    spec: dict = {"column": f"y_{second.property}", "score": second.property}
    if second.property == "ink":
        spec["oracle"] = "share of pixels >= 128"
    else:
        spec["oracle"] = "LAION aesthetic predictor on open_clip image features"
        spec |= {"clip": params.aesthetic.clip, "head": params.aesthetic.head}
        spec["batch_size"] = params.aesthetic.batch_size
    spec |= {"binning": second.binning, "thresholds": [], "classes": list(range(second.num_classes))}
    return spec


def build_table(params: Params) -> tuple[pd.DataFrame, dict, dict]:
    """Read the source, compute oracle scores and classes, split; return (table, meta, metrics).

    ``meta`` travels with the table (what each task's label means: column, classes, thresholds);
    ``metrics`` is the human summary for ``metrics/label.json``.
    """
    data, lab = params.data, params.label
    records, skipped = read_source(data, params.seed)
    pixels = [r.pixels for r in records]
    c = np.array([r.c for r in records])
    jpeg = oracle_scores(pixels, {"score": "jpeg_bytes", "jpeg_quality": lab.jpeg_quality}).astype(int)

    if lab.binning == "quantile":
        y_thresholds = quantile_thresholds(jpeg, lab.num_classes)
    else:
        y_thresholds = sorted(lab.thresholds, reverse=True)
    y = bin_scores(jpeg, y_thresholds)

    # The second label exists only on its own half, so no image carries both labels.
    name = lab.second.property
    second_spec = second_task_spec(params)
    half = disjoint_halves(len(records), params.seed, ("compressibility", name))
    on_half = half == name
    # A cheap oracle is recorded on every image (for analysis); the CLIP scorer runs on its half only.
    scored = np.ones(len(records), bool) if name == "ink" else on_half
    second = np.full(len(records), np.nan)
    second[scored] = oracle_scores([p for p, s in zip(pixels, scored, strict=True) if s], second_spec)
    if lab.second.binning == "quantile":
        second_spec["thresholds"] = quantile_thresholds(second[on_half], lab.second.num_classes)
    else:
        second_spec["thresholds"] = sorted(lab.second.thresholds, reverse=True)
    y_second = np.where(on_half, bin_scores(np.nan_to_num(second), second_spec["thresholds"]), -1)

    digits = np.unique(c)
    table = pd.DataFrame(
        {
            "id": [r.id for r in records],
            "image": [None if r.path else png_bytes(p) for r, p in zip(records, pixels, strict=True)],
            "path": [r.path for r in records],
            "c": c,
            "jpeg_bytes": jpeg,
            "y_compressibility": y,
            name: second,
            f"y_{name}": y_second,
            "half": half,
            "split": stratified_split(y, lab.val_fraction, params.seed),
        }
    )
    extras = pd.DataFrame([r.extra for r in records])
    if not extras.empty:
        table = pd.concat([table, extras], axis=1)

    meta = {
        "source": data.source,
        "resolution": data.resolution,
        "channels": data.channels,
        "tasks": {
            "compressibility": {
                "column": "y_compressibility",
                "score": "jpeg_bytes",
                "oracle": f"JPEG size in bytes at quality {lab.jpeg_quality}",
                "jpeg_quality": lab.jpeg_quality,
                "binning": lab.binning,
                "thresholds": y_thresholds,
                "classes": list(range(lab.num_classes)),
            },
            name: second_spec,
            "digit": {"column": "c", "classes": [int(d) for d in digits]},
        },
    }
    metrics = {
        "source": data.source,
        "resolution": data.resolution,
        "n_images": len(table),
        "n_skipped": len(skipped),
        "skipped": [{"file": s.file, "reason": s.reason} for s in skipped],
        "compressibility": {
            "thresholds_bytes": y_thresholds,
            "counts": np.bincount(y, minlength=lab.num_classes).tolist(),
            "bytes_min": int(jpeg.min()),
            "bytes_max": int(jpeg.max()),
            "counts_per_digit": {
                int(d): np.bincount(y[c == d], minlength=lab.num_classes).tolist() for d in digits
            },
        },
        name: {
            "thresholds": second_spec["thresholds"],
            "counts": np.bincount(y_second[on_half], minlength=lab.second.num_classes).tolist(),
            "n_labelled": int(on_half.sum()),
        },
        "split": {"train": int((table.split == "train").sum()), "val": int((table.split == "val").sum())},
    }
    return table, meta, metrics
