"""Continuous y without retraining: a convex combination of CTRL's learned class embeddings.

The classes, sorted by their means in the labelled data, trace a path through embedding space:
position u = j + λ on it puts weight 1 - λ on the j-th class and λ on the (j+1)-th. At an integer u
the weights are one-hot, so the embedding is exactly that class's row. The path is calibrated with
what CTRL itself has, its model and its reward model: sample a grid of positions once (seeds disjoint
from the evaluation's), score the images with the reward model (``reward_scores``: a size model's
predicted bytes, or the score expected under p̂(y | x)), and pick u for a target s by one of two rules:

- ``class_means``: the grid is the classes' own rows; u is s's place between their measured means.
- ``calibrated``: a finer grid, which corrects the segments' non-linearity with a few hundred more
  images. Either way an increasing curve u -> mean score (isotonic regression) is fitted to the grid
  and inverted (``calibrated_positions``), so a pair of classes CTRL has not separated stays usable.

The oracle judges the result. Calibrating with the oracle instead puts ground truth inside the
method; the stage reports it beside, labelled as such, as the reference the reward's errors cost.

Targets beyond the range clamp to the path's ends (no extrapolation: the weights stay convex).
Classes whose achieved means tie (a CTRL that has not yet separated them) keep their label order on
the path, higher label (more compressible) first, with a warning: the path stays defined, and the
parity metrics then show how little control there is.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import r2_score

from ctrldiff.classifier import Classifier


def _sorted_means(class_means: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """The classes' order along the path (ascending achieved mean, ties by descending label) and
    their sorted means."""
    means = np.asarray(class_means, dtype=float)
    if len(np.unique(means)) != len(means):
        warnings.warn(
            f"class means {means.tolist()} are not distinct: tied classes follow their label order",
            stacklevel=3,
        )
    order = np.lexsort((-np.arange(len(means)), means))
    return order, means[order]


def path_weights(u: np.ndarray, class_means: list[float]) -> np.ndarray:
    """(N, K) convex weights for positions u in [0, K - 1] along the classes sorted by achieved mean."""
    order, _ = _sorted_means(class_means)
    u = np.clip(np.asarray(u, dtype=float), 0, len(order) - 1)
    j = np.minimum(np.floor(u).astype(int), len(order) - 2)  # the segment [j, j + 1] holding u
    upper = u - j  # weight on the segment's upper end
    weights = np.zeros((len(u), len(order)))
    rows = np.arange(len(u))
    weights[rows, order[j]] = 1.0 - upper
    weights[rows, order[j + 1]] += upper
    return weights


def class_mean_positions(targets: np.ndarray, class_means: list[float]) -> np.ndarray:
    """Positions of the ``class_means`` rule: each target's place between the neighbouring means."""
    _, sorted_means = _sorted_means(class_means)
    return np.interp(np.asarray(targets, dtype=float), sorted_means, np.arange(len(sorted_means)))


def calibration_grid(num_classes: int, points_per_segment: int) -> np.ndarray:
    """Positions along the path at which the ``calibrated`` rule measures the achieved score."""
    return np.linspace(0, num_classes - 1, (num_classes - 1) * points_per_segment + 1)


def calibrated_positions(targets: np.ndarray, grid: np.ndarray, grid_scores: np.ndarray) -> np.ndarray:
    """Positions u whose fitted score equals each target: the inverse of the increasing isotonic fit of
    the measured (u, mean score) pairs, linear between grid points, clamped to the grid's ends."""
    fitted = IsotonicRegression(increasing=True).fit_transform(grid, grid_scores)
    # flat stretches of the fit have no unique inverse: keep only the first u of each fitted value
    first = np.concatenate([[True], np.diff(fitted) > 0])
    return np.interp(np.asarray(targets, dtype=float), fitted[first], np.asarray(grid)[first])


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


@torch.no_grad()
def reward_scores(reward: Classifier, images: torch.Tensor, class_means: list[float]) -> np.ndarray:
    """The reward model's estimate of each image's score (e.g. JPEG bytes), images in [-1, 1].

    A size model (``net.size``, the DCT reward) predicts it directly; any other classifier gives the
    expectation of the classes' mean scores in the labelled data under p̂(y | x).
    """
    if hasattr(reward.net, "size"):
        return reward.net.size(images).cpu().numpy()
    probs = reward(images).softmax(-1).cpu().numpy()
    return probs @ np.asarray(class_means, dtype=float)
