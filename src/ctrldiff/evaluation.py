"""Judge generated images with the oracles, never with the classifier a method was trained on.

Control: each task's true score of each 8-bit image (JPEG size, ink coverage), binned at the
dataset's thresholds, against the requested y (per task, and jointly when y has several tasks).
Fidelity to c: the share of images the (separately trained) digit classifier assigns to the
requested c, and a Fréchet distance in its penultimate features to real digits of that class.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from scipy import linalg
from sklearn.metrics import confusion_matrix, f1_score

from ctrldiff.classifier import Classifier
from ctrldiff.data import table_images
from ctrldiff.oracles import to_model_space
from ctrldiff.tasks import class_counts, control_tasks, join, oracle_classes, split_joint


def task_metrics(
    requested: np.ndarray, achieved: np.ndarray, scores: np.ndarray | None, num_classes: int
) -> dict:
    """Accuracy, macro-F1, confusion (rows: requested, columns: achieved) and recall per class.

    ``mean_score_per_class`` (the oracle score's mean per requested class) when scores are given.
    """
    labels = list(range(num_classes))
    confusion = confusion_matrix(requested, achieved, labels=labels)
    asked = confusion.sum(1)
    metrics = {
        "accuracy": float((requested == achieved).mean()),
        "macro_f1": float(f1_score(requested, achieved, labels=labels, average="macro", zero_division=0)),
        "confusion": confusion.tolist(),
        "recall_per_class": [float(confusion[k, k] / asked[k]) if asked[k] else float("nan") for k in labels],
    }
    if scores is not None:
        metrics["mean_score_per_class"] = [
            float(scores[requested == k].mean()) if (requested == k).any() else float("nan") for k in labels
        ]
    return metrics


def control_metrics(pixels: np.ndarray, y: np.ndarray, label_meta: dict) -> dict[str, dict]:
    """``task_metrics`` of each control task by its oracle, plus ``joint`` when y has several tasks."""
    tasks, counts = control_tasks(label_meta), class_counts(label_meta)
    requested = split_joint(y, counts)
    out, achieved = {}, []
    for task, asked, k in zip(tasks, requested, counts, strict=True):
        scores, got = oracle_classes(pixels, label_meta["tasks"][task])
        out[task] = task_metrics(asked, got, scores, k)
        achieved.append(got)
    if len(tasks) > 1:
        out["joint"] = task_metrics(np.asarray(y), join(achieved, counts), None, int(np.prod(counts)))
    return out


def headline(label_meta: dict) -> str:
    """The entry of ``control_metrics`` that sums up the control: the task, or ``joint``."""
    tasks = control_tasks(label_meta)
    return tasks[0] if len(tasks) == 1 else "joint"


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows are samples)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b).real  # no `disp=`: newer SciPy removed it
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


@torch.no_grad()
def features_and_predictions(
    clf: Classifier, pixels: np.ndarray, batch: int = 500
) -> tuple[np.ndarray, np.ndarray]:
    feats, preds = [], []
    for i in range(0, len(pixels), batch):
        x = to_model_space(pixels[i : i + batch])
        f = clf.features(x)
        feats.append(f.numpy())
        preds.append(clf.net.head(f).argmax(-1).numpy())  # the temperature does not change the argmax
    return np.concatenate(feats), np.concatenate(preds)


def fidelity(
    digit_clf: Classifier,
    pixels: np.ndarray,
    c: np.ndarray,
    real_feats: np.ndarray,
    real_c: np.ndarray,
    y: np.ndarray | None = None,
) -> dict:
    """c_accuracy and the mean per-class Fréchet distance of generated images to real features.

    With the requested y, also c_accuracy per requested class: a control can cost fidelity in one
    class only (CTRL's most compressible class turns blank) and the overall figure hides which.
    """
    feats, preds = features_and_predictions(digit_clf, pixels)
    per_class = [frechet_distance(feats[c == k], real_feats[real_c == k]) for k in np.unique(c)]
    correct = preds == c
    out = {"c_accuracy": float(correct.mean()), "frechet": float(np.mean(per_class))}
    if y is not None:
        out["c_accuracy_per_y"] = [float(correct[y == k].mean()) for k in range(int(y.max()) + 1)]
    return out


def real_by_split(table: pd.DataFrame, label_meta: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The labelled table's real pixels and digit classes c per split: what fidelity compares with."""
    res, ch = label_meta["resolution"], label_meta["channels"]
    return {
        split: (table_images(part, res, ch), part["c"].to_numpy()) for split, part in table.groupby("split")
    }


def evaluate_samples(
    method: str,
    pixels: np.ndarray,
    c: np.ndarray,
    y: np.ndarray,
    label_meta: dict,
    digit_clf: Classifier | None,
    real: dict[str, tuple[np.ndarray, np.ndarray]] | None,
    cost: dict,
) -> dict:
    """The standard metrics record of one method (see README: every method fills this shape).

    ``real`` holds ('train' and 'val') real pixels and their c: generated images are compared with
    the training digits; the held-out digits against the same training digits give the reference.
    Without a c-classifier (paper scale: c is a prompt) fidelity is not measured and is None.
    """
    record = {
        "method": method,
        "n_per_class": int(len(y) // int(np.prod(class_counts(label_meta)))),
        "tasks": control_metrics(pixels, y, label_meta),
        "fidelity": None,
        "cost": cost,
    }
    if digit_clf is None or real is None:
        return record
    train_pixels, train_c = real["train"]
    train_feats, _ = features_and_predictions(digit_clf, train_pixels)  # once, for both comparisons
    fid = fidelity(digit_clf, pixels, c, train_feats, train_c, np.asarray(y))

    # Reference: as many held-out real digits per class as there are generated ones.
    val_pixels, val_c = real["val"]
    rng = np.random.default_rng(0)
    pick = np.concatenate(
        [
            rng.choice(np.flatnonzero(val_c == k), min((c == k).sum(), (val_c == k).sum()), replace=False)
            for k in np.unique(c)
        ]
    )
    ref = fidelity(digit_clf, val_pixels[pick], val_c[pick], train_feats, train_c)
    record["fidelity"] = fid | {
        "frechet_real_heldout": ref["frechet"],
        "c_accuracy_real_heldout": ref["c_accuracy"],
    }
    return record


def tuning_scores(
    pixels: np.ndarray, c: np.ndarray, y: np.ndarray, label_meta: dict, digit_clf: Classifier
) -> dict:
    """Oracle accuracy and macro-F1 of the control (joint, with several tasks), and c_accuracy."""
    task = control_metrics(pixels, y, label_meta)[headline(label_meta)]
    _, preds = features_and_predictions(digit_clf, pixels)
    return {
        "accuracy": task["accuracy"],
        "macro_f1": task["macro_f1"],
        "c_accuracy": float((preds == c).mean()),
    }


def pick_scale(results: list[dict], min_c_accuracy: float) -> dict:
    """The best macro-F1 among scales keeping c_accuracy >= the floor; else the most faithful scale."""
    faithful = [r for r in results if r["c_accuracy"] >= min_c_accuracy]
    if faithful:
        return max(faithful, key=lambda r: (r["macro_f1"], r["c_accuracy"]))
    return max(results, key=lambda r: (r["c_accuracy"], r["macro_f1"]))
