from dataclasses import replace

import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from ctrldiff.classifier import Classifier, SmallCNN
from ctrldiff.control import add_control
from ctrldiff.ctrl import CTRLLoss, RolloutConfig, gaussian_kl, rollout
from ctrldiff.sampling import request_noise
from tests.conftest import micro_base

CFG = RolloutConfig(steps=4, eta=1.0, guidance_scale=2.0, grad_steps=2)


def reward(num_classes=4):
    torch.manual_seed(3)
    arch = {"in_channels": 1, "num_classes": num_classes, "width": 8}
    return Classifier(SmallCNN(**arch), arch).eval().requires_grad_(False)


def test_kl_matches_torch_distributions():
    a, b, sigma = torch.randn(2, 1, 2, 3), torch.randn(2, 1, 2, 3), torch.tensor(0.7)
    d = a[0].numel()
    expected = torch.stack(
        [
            kl_divergence(
                MultivariateNormal(a[i].flatten(), sigma**2 * torch.eye(d)),
                MultivariateNormal(b[i].flatten(), sigma**2 * torch.eye(d)),
            )
            for i in range(2)
        ]
    )
    torch.testing.assert_close(gaussian_kl(a, b, sigma, "sum"), expected)
    torch.testing.assert_close(gaussian_kl(a, b, sigma, "mean"), expected / d)


def test_kl_is_zero_at_initialisation():
    model = add_control(micro_base(), [0, 1, 2, 3], lora_rank=4)
    noise = request_noise([1, 2, 3], (1, 8, 8), CFG.steps)
    with torch.no_grad():
        _, kl_window, kl_steps = rollout(model, torch.tensor([0, 1, 2]), torch.tensor([3, 0, 1]), noise, CFG)
    assert kl_steps.shape == (3, CFG.steps - 1)  # the last step is deterministic: no KL
    assert kl_steps.abs().max() < 1e-8 and kl_window.abs().max() < 1e-8


def test_a_deterministic_sampler_has_no_kl_steps():
    model = add_control(micro_base(), [0, 1], lora_rank=2)
    noise = request_noise([1, 2], (1, 8, 8), CFG.steps)
    with torch.no_grad():
        _, kl_window, kl_steps = rollout(
            model, torch.tensor([0, 1]), torch.tensor([1, 0]), noise, replace(CFG, eta=0.0)
        )
    assert kl_steps.shape == (2, 0) and (kl_window == 0).all()


def test_gradients_reach_lora_and_embedding_but_not_frozen_weights():
    model = add_control(micro_base(), [0, 1, 2, 3], lora_rank=4)
    loss_fn = CTRLLoss(reward(), gamma=10.0, cfg=CFG)
    noise = request_noise([1, 2, 3, 4], (1, 8, 8), CFG.steps)
    loss, terms = loss_fn(model, torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 2, 3]), noise)
    stats = terms.stats()
    loss.backward()
    lora, emb = model.trainable_parameters()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    assert emb[0].grad[:4].abs().sum() > 0 and torch.equal(emb[0].grad[4], torch.zeros_like(emb[0].grad[4]))
    frozen = [p for n, p in model.base.unet.named_parameters() if "lora_" not in n and "class_emb" not in n]
    assert all(p.grad is None for p in frozen)
    assert all(p.grad is None for p in model.base.encoder.parameters())
    assert set(stats) >= {"reward", "kl", "kl_window", "kl_last_step", "accuracy_reward_clf"}


def test_the_last_steps_kl_is_logged_as_a_part_of_the_trajectory_kl():
    model = add_control(micro_base(), [0, 1], lora_rank=2)
    with torch.no_grad():
        model.y_embedding.weight[:2].normal_()  # a control that moves the means at every step
    noise = request_noise([1, 2, 3], (1, 8, 8), CFG.steps)
    c, y = torch.tensor([0, 1, 2]), torch.tensor([1, 0, 1])
    stats = CTRLLoss(reward(2), 1.0, CFG)(model, c, y, noise)[1].stats()
    with torch.no_grad():
        _, _, kl_steps = rollout(model, c, y, noise, CFG)
    assert 0 < stats["kl_last_step"] < stats["kl"]
    torch.testing.assert_close(torch.tensor(stats["kl_last_step"]), kl_steps[:, -1].mean())


def test_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = add_control(micro_base(), [0, 1], lora_rank=2)
        cfg = RolloutConfig(steps=4, grad_steps=3, checkpointing=ckpt)
        noise = request_noise([5, 6], (1, 8, 8), cfg.steps)
        loss, _ = CTRLLoss(reward(2), 5.0, cfg)(model, torch.tensor([0, 1]), torch.tensor([1, 0]), noise)
        loss.backward()
        grads.append(model.trainable_parameters()[1][0].grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("k", [1, 4])
def test_truncation_limits_which_steps_get_gradients(k):
    model = add_control(micro_base(), [0, 1], lora_rank=2)
    cfg = RolloutConfig(steps=4, grad_steps=k)
    noise = request_noise([5, 6], (1, 8, 8), cfg.steps)
    x0, kl_window, _ = rollout(model, torch.tensor([0, 1]), torch.tensor([1, 0]), noise, cfg)
    assert x0.requires_grad and kl_window.requires_grad == (k > 1)  # the last step has no KL term


@pytest.mark.parametrize("checkpointing", [False, True])
def test_kl_gradient_is_the_pathwise_derivative_of_the_trajectory_kl(checkpointing):
    """Central finite differences in float64: x_t depends on the parameters, and so does the reference
    mean evaluated at x_t; dropping that dependence gave a gradient of the wrong sign (8439 vs -70)."""
    torch.manual_seed(0)
    base = micro_base()
    base.encoder.double()
    model = add_control(base, [0, 1], lora_rank=2)
    model.base.unet.double()
    w = model.y_embedding.weight
    with torch.no_grad():
        w.normal_(0, 0.5)
    cfg = RolloutConfig(steps=4, grad_steps=4, checkpointing=checkpointing)
    noise = request_noise([5, 6, 7], (1, 8, 8), cfg.steps).double()
    c, y = torch.tensor([0, 1, 2]), torch.tensor([1, 0, 1])

    def trajectory_kl() -> torch.Tensor:
        _, kl_window, kl_steps = rollout(model, c, y, noise, cfg, "sum")
        return (kl_window if torch.is_grad_enabled() else kl_steps).sum()

    trajectory_kl().backward()
    direction = torch.randn_like(w)
    direction[2] = 0  # the NULL row is held at zero
    h = 1e-5
    with torch.no_grad():
        w += h * direction
        up = trajectory_kl()
        w -= 2 * h * direction
        down = trajectory_kl()
    torch.testing.assert_close((w.grad * direction).sum(), (up - down) / (2 * h), rtol=1e-6, atol=1e-8)


def test_without_full_kl_the_reference_runs_in_the_window_only():
    """Same window KL and gradient; the steps before the window are not evaluated (NaN, not logged)."""
    model = add_control(micro_base(), [0, 1], lora_rank=2)
    with torch.no_grad():
        model.y_embedding.weight[:2].normal_()
    cfg = RolloutConfig(steps=4, grad_steps=2)
    noise = request_noise([1, 2], (1, 8, 8), cfg.steps)
    c, y = torch.tensor([0, 1]), torch.tensor([1, 0])
    calls = []
    handle = model.base.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    results = {}
    for full in (True, False):
        calls.clear()
        loss, terms = CTRLLoss(reward(2), 5.0, cfg)(model, c, y, noise, full_kl=full)
        loss.backward()
        grad = model.y_embedding.weight.grad.clone()
        model.y_embedding.weight.grad = None
        results[full] = (len(calls), terms, grad)
    handle.remove()
    (n_full, t_full, g_full), (n_win, t_win, g_win) = results[True], results[False]
    assert n_full - n_win == 2  # two stochastic steps before the window: one guided reference call each
    torch.testing.assert_close(g_full, g_win)
    torch.testing.assert_close(t_full.kl_window, t_win.kl_window)
    assert t_win.kl_steps[:, :2].isnan().all() and not t_win.kl_steps[:, 2:].isnan().any()
    assert "kl" in t_full.stats() and "kl" not in t_win.stats()
    torch.testing.assert_close(t_win.kl_steps[:, 2:], t_full.kl_steps[:, 2:])


def test_the_reward_classifiers_accuracy_is_scored_on_the_clamped_image_without_a_graph():
    model = add_control(micro_base(), [0, 1], lora_rank=2)
    cfg = RolloutConfig(steps=3, grad_steps=1)
    noise = 3 * request_noise([1, 2, 3, 4], (1, 8, 8), cfg.steps)  # far outside [-1, 1] after decoding
    seen = []
    clf = reward(2)
    clf.register_forward_pre_hook(
        lambda m, a: seen.append((a[0].abs().max().item(), torch.is_grad_enabled()))
    )
    CTRLLoss(clf, 1.0, cfg)(model, torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 0, 1]), noise)
    assert seen and all(m <= 1.0 for m, _ in seen)
    assert seen[-1][1] is False  # the accuracy's pass builds no autograd graph
