"""The benchmark scripts' measuring functions, on a micro model or fabricated numbers.

Their printed figures are not tested.
"""

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import f1_score

from benchmarks.tilted_target import compare
from ctrldiff.data import png_bytes
from ctrldiff.tilt import effective_size, tilted_kl, tilted_weights, weighted_scores


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


def test_tilted_kl_is_zero_for_the_base_and_log_n_for_one_image_of_n():
    assert tilted_kl(np.full(4, 0.25)) == pytest.approx(0.0, abs=1e-12)
    assert tilted_kl(np.array([1.0, 0.0, 0.0, 0.0])) == pytest.approx(np.log(4))
    w = np.array([0.5, 0.5, 0.0, 0.0])  # half the images, each twice as likely: log 2
    assert tilted_kl(w) == pytest.approx(np.log(2))


def test_compare_sets_a_methods_log_p_beside_the_target_and_splits_the_pairs_the_base_serves(
    tmp_path, capsys
):
    # Base images: digit 0 has one image per class; digit 1's best image for y = 1 has p̂ 0.1 only.
    log_p = np.log(np.array([[0.99, 0.01], [0.01, 0.99], [0.99, 0.01], [0.9, 0.1]]))
    c = np.array([0, 0, 1, 1])
    dark, bright = np.zeros((4, 4), np.uint8), np.full((4, 4), 255, np.uint8)
    folder = tmp_path / "ctrl"
    folder.mkdir()
    rows = [(0, 0, dark), (0, 1, bright), (1, 0, bright), (1, 1, dark)]
    pd.DataFrame([{"c": k, "y": y, "image": png_bytes(p)} for k, y, p in rows]).to_parquet(
        folder / "samples.parquet"
    )

    def reward(x):  # bright images are class 1, dark ones class 0, with log p̂ 0 or about -10
        m = x.mean((1, 2, 3))
        return torch.stack([-5 * m, 5 * m], 1)

    compare(folder, reward, {"resolution": 4, "channels": 1}, log_p, c, gamma=10.0)
    out = capsys.readouterr().out
    # Served: (0, 0), (0, 1) right (log p̂ 0) and (1, 0) wrong (-10): mean -3.333; (1, 1) is not served.
    # The target's (1, 0) weighs its images 0.72 / 0.28 (0.99^10 : 0.9^10): E log p̂ -0.037, mean -0.019.
    assert "3 pairs served by the base: target E log p̂ -0.019" in out and "ctrl -3.333" in out
    assert "1 pairs not served: target E log p̂ -2.303" in out and "ctrl -10.000" in out


def test_weighted_scores_match_sklearn_on_the_expanded_set():
    achieved = np.array([0, 1, 1])
    w = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])  # image i counted w[i, y] times as a request for y
    acc, f1 = weighted_scores(np.arange(2), achieved, w)
    asked, got = [0, 1, 1, 0, 1], [0, 1, 1, 1, 1]  # the same, expanded: image 1 twice for y 1
    assert acc == pytest.approx(4 / 5)
    assert f1 == pytest.approx(f1_score(asked, got, average="macro"))


def test_cross_machine_digest_is_the_same_on_two_runs_in_one_process():
    from benchmarks.cross_machine_bytes import measure

    first, second = measure(steps=1), measure(steps=1)
    for key in ("weights", "forward", "final_loss"):
        assert first[key] == second[key], key
    assert len(first["weights"]) == 16 and first["capability"]
