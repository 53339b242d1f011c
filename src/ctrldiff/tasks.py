"""What y means: one labelled task, or the joint class of several labels from disjoint pair sets.

A dataset's ``meta.json`` lists its tasks; its optional ``control`` key names the tasks y is made
of (default: compressibility alone). With several, y is the joint class (y1, y2, ...) in row-major
order (the first task varies slowest), and because the labels are conditionally independent given
the image, log p̂(y1, y2 | x) = log p̂(y1 | x) + log p̂(y2 | x): one classifier per pair set suffices,
where classifier-free guidance would need images carrying every label at once.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from ctrldiff.classifier import Classifier
from ctrldiff.labels import bin_scores, quantile_thresholds
from ctrldiff.oracles import oracle_scores


@dataclass(frozen=True)
class Setting:
    """Where one control setting's labelled data, CTRL adapter, samples and metrics live."""

    name: str
    data: Path  # images.parquet + meta.json
    ctrl: Path  # the CTRL adapter; its checkpoint sits beside it with a `_checkpoint` suffix
    samples: Path  # <samples>/<method>/
    metrics: Path  # <metrics>/eval/<method>.json, <metrics>/tune/<method>.json

    @property
    def checkpoint(self) -> Path:
        return self.ctrl.with_name(self.ctrl.name + "_checkpoint")


SETTINGS = {
    "single": Setting(
        "single", Path("data/labelled"), Path("models/ctrl"), Path("data/samples"), Path("metrics")
    ),
    "multitask": Setting(
        "multitask",
        Path("data/multitask"),
        Path("models/ctrl_multitask"),
        Path("data/samples_multitask"),
        Path("metrics/multitask"),
    ),
}


def control_tasks(meta: dict) -> list[str]:
    """The tasks y is made of, in joint order."""
    return list(meta.get("control", ["compressibility"]))


def class_counts(meta: dict) -> list[int]:
    """Number of classes of each control task."""
    return [len(meta["tasks"][t]["classes"]) for t in control_tasks(meta)]


def num_joint_classes(meta: dict) -> int:
    return int(np.prod(class_counts(meta)))


def split_joint(y: np.ndarray, counts: list[int]) -> list[np.ndarray]:
    """Joint class indices -> one array of class indices per task."""
    return list(np.unravel_index(np.asarray(y), counts))


def join(ys: list[np.ndarray], counts: list[int]) -> np.ndarray:
    """Per-task class indices -> joint class indices (inverse of ``split_joint``)."""
    return np.ravel_multi_index([np.asarray(y) for y in ys], counts)


def oracle_classes(pixels: np.ndarray, spec: dict) -> tuple[np.ndarray, np.ndarray]:
    """(oracle score, class) of each uint8 image for one task of ``meta.json``."""
    scores = oracle_scores(pixels, spec)
    return scores, bin_scores(scores, spec["thresholds"])


class JointReward(nn.Module):
    """log p̂(y1, ..., yn | x) = sum_i w_i log p̂_i(y_i | x), over the joint classes.

    Behaves like a ``Classifier`` for CTRL and the guidance baselines: ``forward`` gives one
    (weighted) log-probability per joint class, ``log_prob`` that of the requested joint class.
    """

    def __init__(self, classifiers: list[Classifier], weights: list[float]):
        super().__init__()
        if len(classifiers) != len(weights):
            raise ValueError(f"{len(classifiers)} classifiers but {len(weights)} reward weights")
        self.classifiers = nn.ModuleList(classifiers)
        self.weights = list(weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        joint = x.new_zeros(len(x), 1)
        for clf, w in zip(self.classifiers, self.weights, strict=True):
            log_p = clf(x).log_softmax(-1)
            joint = (joint[:, :, None] + w * log_p[:, None, :]).flatten(1)
        return joint

    def log_prob(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self(x).gather(1, y[:, None]).squeeze(1)


def load_reward(meta: dict, models: Path = Path("models"), weights: list[float] | None = None) -> nn.Module:
    """The calibrated reward of a dataset's control: its classifier, or the joint of several.

    Each classifier is checked against the task's classes and thresholds in ``meta``.
    """
    tasks = control_tasks(meta)
    classifiers = []
    for task in tasks:
        clf = Classifier.load(models / "classifier" / task)
        clf.check_classes(meta["tasks"][task]["classes"], meta["tasks"][task].get("thresholds"))
        classifiers.append(clf)
    if len(tasks) == 1:
        return classifiers[0]
    return JointReward(classifiers, weights or [1.0] * len(tasks))


def second_task(meta: dict) -> str:
    """The name of the label made on the other half of the images (ink, aesthetic)."""
    return next(t for t in meta["tasks"] if t not in ("compressibility", "compressibility_half", "digit"))


def multitask_labels(
    table: pd.DataFrame, meta: dict, compressibility_classes: int, thresholds: list[float] | None = None
) -> tuple[pd.DataFrame, dict, dict]:
    """The multi-task dataset: compressibility on its own half only, the second label on the other.

    Compressibility is cut at ``thresholds`` (bytes) if given, else at its own half's quantiles.
    Returns (table with a ``y_compressibility_half`` column, -1 off its half; meta whose control is
    (compressibility_half, second); metrics with how many images carry both labels, which is zero).
    """
    half = (table["half"] == "compressibility").to_numpy()
    sizes = table["jpeg_bytes"].to_numpy()
    binning = "thresholds" if thresholds else "quantile"
    if thresholds:
        thresholds = sorted(thresholds, reverse=True)
    else:
        thresholds = quantile_thresholds(sizes[half], compressibility_classes)
    table = table.assign(y_compressibility_half=np.where(half, bin_scores(sizes, thresholds), -1))
    meta = copy.deepcopy(meta)
    source = meta["tasks"]["compressibility"]
    meta["tasks"]["compressibility_half"] = {
        "column": "y_compressibility_half",
        "score": "jpeg_bytes",
        "oracle": source["oracle"],
        "jpeg_quality": source["jpeg_quality"],
        "binning": binning,
        "thresholds": thresholds,
        "classes": list(range(compressibility_classes)),
    }
    meta["control"] = ["compressibility_half", second_task(meta)]
    labelled = {t: (table[meta["tasks"][t]["column"]] >= 0).to_numpy() for t in meta["control"]}
    metrics = {
        "tasks": meta["control"],
        "labelled": {t: int(m.sum()) for t, m in labelled.items()},
        "images_with_both_labels": int(np.logical_and(*labelled.values()).sum()),
        "thresholds": {t: meta["tasks"][t]["thresholds"] for t in meta["control"]},
        "counts": {
            t: np.bincount(
                table.loc[m, meta["tasks"][t]["column"]], minlength=len(meta["tasks"][t]["classes"])
            )
            .astype(int)
            .tolist()
            for t, m in labelled.items()
        },
    }
    return table, meta, metrics
