import numpy as np
import pytest

from ctrldiff.evaluation import compressibility_oracle, frechet_distance, task_metrics


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


def test_frechet_is_zero_for_identical_sets_and_grows_with_a_shift():
    a = np.random.default_rng(0).normal(size=(500, 4))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + 2.0) == pytest.approx(16.0, rel=1e-6)  # |shift|^2 = 4 * 2^2


def test_compressibility_oracle_bins_true_sizes():
    rng = np.random.default_rng(0)
    flat = np.zeros((2, 16, 16), dtype=np.uint8)
    noisy = rng.integers(0, 256, (2, 16, 16), dtype=np.uint8)
    sizes, classes = compressibility_oracle(np.concatenate([flat, noisy]), [400.0], quality=95)
    assert classes.tolist() == [1, 1, 0, 0]
    assert sizes[0] < sizes[2]
