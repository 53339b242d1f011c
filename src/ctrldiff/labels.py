"""Turn raw oracle scores into classes, and split the labelled table.

Convention for every label: class 0 holds the highest scores (for JPEG size: the least
compressible images, as in the paper), class K-1 the lowest.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ctrldiff.data import png_bytes, read_source
from ctrldiff.oracles import ink_coverage, jpeg_size
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


def build_table(params: Params) -> tuple[pd.DataFrame, dict, dict]:
    """Read the source, compute oracle scores and classes, split; return (table, meta, metrics).

    ``meta`` travels with the table (what each task's label means: column, classes, thresholds);
    ``metrics`` is the human summary for ``metrics/label.json``.
    """
    data, lab = params.data, params.label
    records, skipped = read_source(data, params.seed)
    pixels = [r.pixels for r in records]
    c = np.array([r.c for r in records])
    jpeg = np.array([jpeg_size(p, lab.jpeg_quality) for p in pixels])
    ink = np.array([ink_coverage(p) for p in pixels])

    if lab.binning == "quantile":
        y_thresholds = quantile_thresholds(jpeg, lab.num_classes)
    else:
        y_thresholds = sorted(lab.thresholds, reverse=True)
    y = bin_scores(jpeg, y_thresholds)

    # The second label exists only on its own half, so no image carries both labels.
    half = disjoint_halves(len(records), params.seed, ("compressibility", "ink"))
    ink_half = half == "ink"
    ink_thresholds = quantile_thresholds(ink[ink_half], lab.second.num_classes)
    y_ink = np.where(ink_half, bin_scores(ink, ink_thresholds), -1)

    digits = np.unique(c)
    table = pd.DataFrame(
        {
            "id": [r.id for r in records],
            "image": [None if r.path else png_bytes(p) for r, p in zip(records, pixels, strict=True)],
            "path": [r.path for r in records],
            "c": c,
            "jpeg_bytes": jpeg,
            "y_compressibility": y,
            "ink": ink,
            "y_ink": y_ink,
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
            "ink": {
                "column": "y_ink",
                "score": "ink",
                "oracle": "share of pixels >= 128",
                "binning": "quantile",
                "thresholds": ink_thresholds,
                "classes": list(range(lab.second.num_classes)),
            },
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
        "ink": {
            "thresholds": ink_thresholds,
            "counts": np.bincount(y_ink[ink_half], minlength=lab.second.num_classes).tolist(),
            "n_labelled": int(ink_half.sum()),
        },
        "split": {"train": int((table.split == "train").sum()), "val": int((table.split == "val").sum())},
    }
    return table, meta, metrics
