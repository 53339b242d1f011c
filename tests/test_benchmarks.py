"""The benchmark scripts' measuring functions, on a micro model or fabricated numbers.

Their printed figures are not tested.
"""

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from benchmarks.kl_per_step import kl_per_step
from benchmarks.tilted_target import effective_size, tilted_weights, weighted_scores
from ctrldiff.control import add_control
from ctrldiff.ctrl import RolloutConfig, rollout
from ctrldiff.sampling import request_noise
from tests.conftest import micro_base


def test_kl_per_step_adds_up_to_the_trajectory_kl_of_a_rollout():
    model = add_control(micro_base(), [0, 1], lora_rank=2)
    with torch.no_grad():
        model.y_embedding.weight[0].normal_()  # a control that moves the means
    cfg = RolloutConfig(steps=4, grad_steps=4)
    c, seeds = torch.tensor([0, 1, 2]), [5, 6, 7]
    steps, pixels = kl_per_step(model, c, 0, seeds, cfg)
    noise = request_noise(seeds, model.base.sample_shape, cfg.steps)
    with torch.no_grad():
        _, _, total = rollout(model, c, torch.zeros_like(c), noise, cfg)
    assert len(steps) == cfg.steps - 1  # the last step is deterministic: no KL
    assert sum(steps) > 0
    torch.testing.assert_close(torch.tensor(sum(steps)), total.mean(), rtol=1e-5, atol=1e-6)
    assert pixels.shape[0] == 3 and pixels.dtype.name == "uint8"


def test_tilted_weights_are_uniform_at_gamma_zero_and_pick_the_best_image_at_large_gamma():
    log_p = np.log(np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.5, 0.5]]))
    c = np.array([0, 0, 1, 1])
    w0 = tilted_weights(log_p, c, 0.0)
    np.testing.assert_allclose(w0, 0.5)  # normalised within each digit: two images each
    w = tilted_weights(log_p, c, 200.0)
    np.testing.assert_allclose(w[:, 0], [1, 0, 0, 1], atol=1e-12)  # y = 0: image 0 for c 0, image 3 for c 1
    np.testing.assert_allclose(w[:, 1], [0, 1, 1, 0], atol=1e-12)
    np.testing.assert_allclose(tilted_weights(log_p, c, 1.0)[:2, 0], [0.6, 0.4])  # ∝ p̂, (0.9, 0.6)
    assert effective_size(w0[:2, 0]) == 2.0 and abs(effective_size(w[:2, 0]) - 1.0) < 1e-9


def test_weighted_scores_match_sklearn_on_the_expanded_set():
    achieved = np.array([0, 1, 1])
    w = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])  # image i counted w[i, y] times as a request for y
    acc, f1 = weighted_scores(np.arange(2), achieved, w)
    asked, got = [0, 1, 1, 0, 1], [0, 1, 1, 1, 1]  # the same, expanded: image 1 twice for y 1
    assert acc == pytest.approx(4 / 5)
    assert f1 == pytest.approx(f1_score(asked, got, average="macro"))
