"""Continuous y without retraining: a convex combination of CTRL's learned class embeddings.

Rule: each class k has an achieved oracle mean m_k, measured on CTRL's own samples of class k. A
target s lying between the two neighbouring means m_a and m_b (sorted along the score axis) gets
weight (s - m_b) / (m_a - m_b) on class a and the rest on class b: piecewise-linear interpolation
of the embedding along the path the classes trace. Targets beyond the achieved range clamp to the
end class (no extrapolation: the weights stay convex). At s = m_k the weights are one-hot, so the
embedding is exactly class k's row.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import r2_score


def interpolation_weights(targets: np.ndarray, class_means: list[float]) -> np.ndarray:
    """(N, K) convex weights over the K classes for each target score."""
    means = np.asarray(class_means, dtype=float)
    if len(np.unique(means)) != len(means):
        raise ValueError(f"class means {means.tolist()} are not distinct: no path to interpolate along")
    order = np.argsort(means)
    sorted_means = means[order]
    targets = np.clip(np.asarray(targets, dtype=float), sorted_means[0], sorted_means[-1])
    # the segment [sorted_means[j], sorted_means[j + 1]] that holds each target
    j = np.clip(np.searchsorted(sorted_means, targets, side="right") - 1, 0, len(means) - 2)
    lo, hi = sorted_means[j], sorted_means[j + 1]
    upper = (targets - lo) / (hi - lo)  # weight on the segment's upper end
    weights = np.zeros((len(targets), len(means)))
    rows = np.arange(len(targets))
    weights[rows, order[j]] = 1.0 - upper
    weights[rows, order[j + 1]] += upper
    return weights


def spread_targets(class_means: list[float], n: int) -> np.ndarray:
    """n targets evenly spread over the achieved range, from the lowest class mean to the highest."""
    return np.linspace(min(class_means), max(class_means), n)


def parity_metrics(requested: np.ndarray, achieved: np.ndarray) -> dict:
    """R² of the achieved scores predicted by the requested ones (the identity line, not a fitted
    one: 1 - sum (achieved - requested)² / sum (achieved - mean achieved)²), MAE and RMSE."""
    requested, achieved = np.asarray(requested, dtype=float), np.asarray(achieved, dtype=float)
    residual = achieved - requested
    return {
        "r2": float(r2_score(achieved, requested)),
        "mae": float(np.abs(residual).mean()),
        "rmse": float(np.sqrt((residual**2).mean())),
        "n": int(len(requested)),
    }
