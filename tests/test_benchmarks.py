"""The benchmark scripts' measuring functions, on a micro model or fabricated numbers.

Their printed figures are not tested.
"""

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import f1_score

from benchmarks.control_window import windowed_sample
from benchmarks.gradient_coherence import continuation_gradients, signal_fraction
from benchmarks.kl_per_step import kl_per_step
from benchmarks.tilted_target import compare
from ctrldiff.control import add_control
from ctrldiff.ctrl import RolloutConfig, rollout
from ctrldiff.data import png_bytes
from ctrldiff.ddim import timestep_pairs
from ctrldiff.sampling import SamplerConfig, request_noise, sample
from ctrldiff.tilt import effective_size, tilted_kl, tilted_weights, weighted_scores
from tests.conftest import micro_base, micro_reward


def test_kl_per_step_matches_the_step_by_step_kl_of_the_control_window():
    model = add_control(micro_base(), [0, 1], lora_rank=2)
    with torch.no_grad():
        model.y_embedding.weight[0].normal_()  # a control that moves the means
    cfg = RolloutConfig(steps=4, grad_steps=4)
    c, seeds = torch.tensor([0, 1, 2]), [5, 6, 7]
    steps, pixels = kl_per_step(model, c, 0, seeds, cfg)
    assert len(steps) == cfg.steps - 1  # the last step is deterministic: no KL
    assert min(steps) > 0
    # the same trajectories through the sampler's step-by-step path, control on every step
    _, kl = windowed_sample(model, c, torch.zeros_like(c), seeds, SamplerConfig(steps=4), first=cfg.steps)
    torch.testing.assert_close(torch.tensor(steps), torch.tensor(kl.mean(0)), rtol=1e-5, atol=1e-6)
    assert pixels.shape[0] == 3 and pixels.dtype.name == "uint8"


def test_control_window_is_the_base_at_zero_steps_and_the_fine_tuned_model_at_all():
    base = micro_base()
    c, y, seeds = torch.tensor([0, 1, 2]), torch.tensor([1, 0, 1]), [5, 6, 7]
    cfg = SamplerConfig(steps=4)
    before = sample(base, c, seeds, cfg)  # the base model, no control attached yet
    model = add_control(base, [0, 1], lora_rank=2)
    with torch.no_grad():
        model.y_embedding.weight[:2].normal_()  # a control that moves the means
        for name, p in base.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    images, kl = windowed_sample(model, c, y, seeds, cfg, first=0)
    torch.testing.assert_close(images, before)
    assert kl.shape == (3, cfg.steps - 1) and (kl == 0).all()
    images, kl = windowed_sample(model, c, y, seeds, cfg, first=cfg.steps)
    torch.testing.assert_close(images, sample(base, c, seeds, cfg, y, model.y_null))
    noise = request_noise(seeds, base.sample_shape, cfg.steps)
    with torch.no_grad():
        _, _, kl_steps = rollout(model, c, y, noise, RolloutConfig(steps=4, grad_steps=4))
    torch.testing.assert_close(torch.tensor(kl), kl_steps, rtol=1e-5, atol=1e-6)
    _, kl = windowed_sample(model, c, y, seeds, cfg, first=2)
    assert (kl[:, :2] > 0).all() and (kl[:, 2:] == 0).all()


def test_signal_fraction_recovers_the_share_of_a_common_direction():
    gen = torch.Generator().manual_seed(0)
    m, n, d = 8, 40, 4000
    mean = torch.randn(1, n, d, generator=gen)
    noise = torch.randn(m, n, d, generator=gen)
    assert (signal_fraction(mean.expand(m, n, d)) - 1).abs().max() < 1e-5
    assert signal_fraction(noise).mean().abs() < 0.02
    share = 0.25  # ||E g||^2 / E||g||^2 = 1 / (1 + 3): noise with 3 times the mean's energy
    g = mean + 3**0.5 * noise
    assert abs(signal_fraction(g).mean().item() - share) < 0.02
    g[:, 0] = 0  # a state the reward is flat at: no gradient to split
    assert signal_fraction(g)[0].isnan() and not signal_fraction(g)[1:].isnan().any()


def test_continuation_gradients_agree_at_the_deterministic_last_step_and_not_from_x_T():
    base = micro_base()
    base.unet.requires_grad_(False)
    reward = micro_reward(num_classes=2).requires_grad_(False)
    c, y = torch.tensor([0, 1, 2]), torch.tensor([1, 0, 1])
    cfg = SamplerConfig(steps=4)
    out = continuation_gradients(base, reward, c, y, [5, 6, 7], cfg, m=4, seed=0)
    assert [t for t, _, _ in out] == [t for t, _ in timestep_pairs(base.scheduler, 4)]
    torch.testing.assert_close(out[-1][1], torch.ones(3))  # no noise after t = 0: all continuations agree
    assert (out[0][1] < 0.5).all()  # from x_T, three noisy steps decide most of the gradient
    assert all(norm > 0 for _, _, norm in out)


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
