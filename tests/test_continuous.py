import numpy as np
import pytest
import torch

from ctrldiff.continuous import (
    calibrated_positions,
    calibration_grid,
    class_mean_positions,
    parity_metrics,
    path_weights,
    spread_targets,
)
from ctrldiff.control import YEmbedding
from ctrldiff.sampling import SamplerConfig, sample

MEANS = [900.0, 820.0, 760.0, 700.0]  # class 0 = least compressible, as the label convention


def interpolation_weights(targets: np.ndarray, class_means: list[float]) -> np.ndarray:
    """The ``class_means`` rule's weights, as the `continuous` stage composes them."""
    return path_weights(class_mean_positions(targets, class_means), class_means)


def test_interpolation_at_a_class_mean_reproduces_its_embedding_exactly():
    emb = YEmbedding(4, 6)
    with torch.no_grad():
        emb.weight.normal_()
    weights = torch.as_tensor(interpolation_weights(np.array(MEANS), MEANS), dtype=torch.float32)
    assert torch.equal(emb(weights), emb(torch.arange(4)))


def test_interpolation_is_convex_linear_between_neighbours_and_clamped_outside():
    w = interpolation_weights(np.array([790.0, 1000.0, 600.0]), MEANS)
    assert w.sum(1) == pytest.approx([1, 1, 1]) and (w >= 0).all()
    assert w[0] == pytest.approx([0, 0.5, 0.5, 0])  # halfway between 820 and 760
    assert w[1] == pytest.approx([1, 0, 0, 0]) and w[2] == pytest.approx([0, 0, 0, 1])
    assert np.asarray(MEANS) @ w[0] == pytest.approx(790.0)


def test_tied_class_means_warn_and_keep_the_label_order_on_the_path():
    # classes 1 and 3 tie (as a CTRL that has not separated them can): the path is 2, 0, 3, 1
    means = [1511.2, 1513.1, 1503.0, 1513.1]
    with pytest.warns(UserWarning, match="not distinct"):
        w = path_weights(np.array([0.0, 1.0, 2.0, 3.0]), means)
    assert w.argmax(1).tolist() == [2, 0, 3, 1]
    with pytest.warns(UserWarning, match="not distinct"):
        w = interpolation_weights(np.array([1507.1, 1513.1, 1520.0]), means)
    assert w.sum(1) == pytest.approx([1, 1, 1]) and (w >= 0).all()
    assert np.asarray(means) @ w[0] == pytest.approx(1507.1)  # still linear below the tie
    assert np.asarray(means) @ w[1] == pytest.approx(1513.1) and w[2] == pytest.approx([0, 1, 0, 0])


def test_path_positions_run_through_the_classes_in_order_of_their_means():
    # sorted by mean the path is class 3 (700), 2 (760), 1 (820), 0 (900)
    w = path_weights(np.array([0.0, 1.5, 3.0, 7.0]), MEANS)
    assert w[0] == pytest.approx([0, 0, 0, 1]) and w[3] == pytest.approx([1, 0, 0, 0])
    assert w[1] == pytest.approx([0, 0.5, 0.5, 0])
    assert calibration_grid(4, 2).tolist() == [0, 0.5, 1, 1.5, 2, 2.5, 3]


def test_calibrated_positions_invert_the_measured_curve():
    grid = calibration_grid(4, 2)
    scores = 700 + 10 * grid**2  # a curve that rises faster than the class-mean rule assumes
    u = calibrated_positions(np.array([710.0, 716.25, 790.0, 600.0, 900.0]), grid, scores)
    # exact at grid points, linear between them (716.25 is halfway from 710 at 1.0 to 722.5 at 1.5)
    assert u == pytest.approx([1.0, 1.25, 3.0, 0.0, 3.0])


def test_calibrated_positions_follow_a_monotone_fit_of_a_noisy_curve():
    grid = calibration_grid(3, 2)  # 0, 0.5, 1, 1.5, 2
    scores = np.array([500.0, 560.0, 540.0, 600.0, 700.0])  # 560 then 540: noise, not a real dip
    u = calibrated_positions(np.array([550.0, 650.0]), grid, scores)
    # the isotonic fit pools 560 and 540 into 550 at u = 0.5 and 1.0; the inverse takes the first
    assert u == pytest.approx([0.5, 1.75])


def test_spread_targets_cover_the_achieved_range():
    assert spread_targets(MEANS, 5).tolist() == [700.0, 750.0, 800.0, 850.0, 900.0]


def test_parity_metrics_match_hand_computed_values():
    requested = np.array([1.0, 2.0, 3.0, 4.0])
    achieved = np.array([1.0, 3.0, 3.0, 5.0])
    m = parity_metrics(requested, achieved)
    # residuals 0, 1, 0, 1; achieved mean 3, total sum of squares 4 + 0 + 0 + 4 = 8
    assert m["r2"] == pytest.approx(1 - 2 / 8)
    assert m["mae"] == pytest.approx(0.5)
    assert m["rmse"] == pytest.approx(np.sqrt(0.5))
    assert m["n"] == 4


def test_sampling_with_one_hot_weights_equals_sampling_with_the_class(base):
    from ctrldiff.control import add_control

    model = add_control(base, [0, 1, 2, 3], lora_rank=2)
    with torch.no_grad():
        model.y_embedding.weight.normal_()
    cfg = SamplerConfig(steps=3, guidance_scale=2.0)
    c, y = torch.tensor([0, 1]), torch.tensor([2, 3])
    by_class = sample(base, c, [1, 2], cfg, y, model.y_null)
    by_weights = sample(base, c, [1, 2], cfg, torch.eye(4)[y], model.y_null)
    torch.testing.assert_close(by_weights, by_class)
