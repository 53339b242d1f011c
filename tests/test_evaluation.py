import numpy as np
import pytest
import torch

from ctrldiff.classifier import Classifier, SmallCNN
from ctrldiff.evaluation import (
    control_metrics,
    features_and_predictions,
    fidelity,
    frechet_distance,
    task_metrics,
)
from ctrldiff.tasks import oracle_classes


def test_task_metrics_match_hand_computed_values():
    requested = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    achieved = np.array([0, 0, 1, 1, 1, 2, 2, 0])
    scores = np.arange(8, dtype=float)
    m = task_metrics(requested, achieved, scores, num_classes=3)
    assert m["accuracy"] == pytest.approx(5 / 8)
    # per class F1: class 0: P=2/3 R=2/3; class 1: P=2/3 R=2/3; class 2: P=1/2 R=1/2
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 2) / 3)
    assert m["confusion"] == [[2, 1, 0], [0, 2, 1], [1, 0, 1]]
    assert m["mean_score_per_class"] == pytest.approx([1.0, 4.0, 6.5])
    assert m["recall_per_class"] == pytest.approx([2 / 3, 2 / 3, 1 / 2])


def test_frechet_is_zero_for_identical_sets_and_grows_with_a_shift():
    a = np.random.default_rng(0).normal(size=(500, 4))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + 2.0) == pytest.approx(16.0, rel=1e-6)  # |shift|^2 = 4 * 2^2


def test_compressibility_oracle_bins_true_sizes():
    rng = np.random.default_rng(0)
    flat = np.zeros((2, 16, 16), dtype=np.uint8)
    noisy = rng.integers(0, 256, (2, 16, 16), dtype=np.uint8)
    spec = {"score": "jpeg_bytes", "jpeg_quality": 95, "thresholds": [400.0]}
    sizes, classes = oracle_classes(np.concatenate([flat, noisy]), spec)
    assert classes.tolist() == [1, 1, 0, 0]
    assert sizes[0] < sizes[2]


def test_joint_control_is_scored_per_task_and_jointly_by_the_oracles():
    """y = (compressibility, ink) in row-major order; each task is judged by its own oracle."""
    rng = np.random.default_rng(0)
    blank = np.zeros((16, 16), dtype=np.uint8)  # compressible (class 1), no ink (class 1)
    noise = rng.integers(0, 256, (16, 16), dtype=np.uint8)  # incompressible (0), half ink (0)
    meta = {
        "control": ["size", "ink"],
        "tasks": {
            "size": {"score": "jpeg_bytes", "jpeg_quality": 95, "thresholds": [400.0], "classes": [0, 1]},
            "ink": {"score": "ink", "thresholds": [0.25], "classes": [0, 1]},
        },
    }
    pixels = np.stack([blank, noise, blank, noise])
    y = np.array([3, 0, 0, 1])  # joint (1, 1), (0, 0), (0, 0), (0, 1)
    m = control_metrics(pixels, y, meta)
    assert m["size"]["accuracy"] == pytest.approx(3 / 4)  # the third asked 0 and got 1
    assert m["ink"]["accuracy"] == pytest.approx(2 / 4)  # the third and fourth miss
    assert m["joint"]["accuracy"] == pytest.approx(2 / 4)
    assert m["joint"]["confusion"][0] == [1, 0, 0, 1]
    assert "mean_score_per_class" not in m["joint"]


def test_fidelity_reports_c_accuracy_per_requested_class():
    torch.manual_seed(0)
    arch = {"in_channels": 1, "num_classes": 3, "width": 8}
    digit = Classifier(SmallCNN(**arch), arch).eval()
    pixels = np.random.default_rng(0).integers(0, 256, (60, 16, 16), dtype=np.uint8)
    feats, preds = features_and_predictions(digit, pixels)
    y = np.repeat([0, 1], 30)
    c = np.where(y == 0, preds, (preds + 1) % 3)  # every y = 0 image recognised, no y = 1 image
    real_c = np.arange(60) % 3  # every class has real features to compare with
    fid = fidelity(digit, pixels, c, feats, real_c, y)
    assert fid["c_accuracy"] == pytest.approx(0.5)
    assert fid["c_accuracy_per_y"] == pytest.approx([1.0, 0.0])
    assert "c_accuracy_per_y" not in fidelity(digit, pixels, c, feats, real_c)
