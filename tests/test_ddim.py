import pytest
import torch
from diffusers import DDIMScheduler

from ctrldiff.ddim import control_is_off, ddim_step, predicted_eps, timestep_pairs, training_target


@pytest.fixture
def scheduler():
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)


def test_grid_is_leading_and_ends_on_the_clean_image(scheduler):
    pairs = timestep_pairs(scheduler, 10)
    assert pairs[0] == (900, 800) and pairs[-1] == (0, -1)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_mean_plus_sigma_noise_is_diffusers_ddim_step(scheduler, eta):
    g = torch.Generator().manual_seed(0)
    x, eps, z = (torch.randn(2, 1, 4, 4, generator=g) for _ in range(3))
    for t, t_prev in timestep_pairs(scheduler, 10):
        mean, sigma, _ = ddim_step(scheduler, x, eps, t, t_prev, eta)
        expected = scheduler.step(eps, t, x, eta=eta, variance_noise=z).prev_sample
        torch.testing.assert_close(mean + sigma * z, expected, atol=1e-5, rtol=1e-5)
        if eta == 0.0 or t_prev < 0:
            assert float(sigma) == 0.0


def test_the_last_step_follows_set_alpha_to_one_false_as_in_stable_diffusion():
    """SD-1.5's scheduler config has set_alpha_to_one False: the step into t < 0 lands on alpha_bar(0),
    not 1, and is then still stochastic (a small sigma), exactly as diffusers' own step."""
    sd = DDIMScheduler(
        beta_schedule="scaled_linear", set_alpha_to_one=False, steps_offset=1, clip_sample=False
    )
    g = torch.Generator().manual_seed(0)
    x, eps, z = (torch.randn(2, 4, 4, 4, generator=g) for _ in range(3))
    t, t_prev = timestep_pairs(sd, 50)[-1]
    assert t_prev == -1
    mean, sigma, _ = ddim_step(sd, x, eps, t, t_prev, 1.0)
    expected = sd.step(eps, t, x, eta=1.0, variance_noise=z).prev_sample
    torch.testing.assert_close(mean + sigma * z, expected, atol=1e-5, rtol=1e-5)
    assert float(sigma) > 0


def test_x0_prediction_inverts_the_forward_process(scheduler):
    x0, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = 600
    x_t = scheduler.add_noise(x0, eps, torch.tensor([t]))
    _, _, x0_hat = ddim_step(scheduler, x_t, eps, t, 500, 1.0)
    torch.testing.assert_close(x0_hat, x0, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_each_prediction_type_trains_and_steps_like_diffusers(kind):
    """The training target, read back as a noise prediction, is the noise; the step matches diffusers'."""
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, prediction_type=kind
    )
    g = torch.Generator().manual_seed(1)
    x0, noise, z = (torch.randn(2, 1, 4, 4, generator=g) for _ in range(3))
    for t, t_prev in timestep_pairs(scheduler, 10):
        x_t = scheduler.add_noise(x0, noise, torch.tensor([t]))
        target = training_target(scheduler, x0, noise, torch.tensor([t]))
        eps = predicted_eps(scheduler, target, x_t, t)
        torch.testing.assert_close(eps, noise, atol=1e-4, rtol=1e-4)
        mean, sigma, _ = ddim_step(scheduler, x_t, eps, t, t_prev, 1.0)
        expected = scheduler.step(target, t, x_t, eta=1.0, variance_noise=z).prev_sample
        torch.testing.assert_close(mean + sigma * z, expected, atol=1e-4, rtol=1e-4)


def test_an_unknown_prediction_type_is_named():
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    scheduler.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="flow"):
        predicted_eps(scheduler, torch.zeros(1), torch.zeros(1), 10)


def test_the_control_is_off_exactly_on_the_deterministic_steps_of_a_stochastic_chain(scheduler):
    pairs = timestep_pairs(scheduler, 10)
    assert [control_is_off(scheduler, t, tp, 1.0) for t, tp in pairs] == [False] * 9 + [True]
    assert not any(control_is_off(scheduler, t, tp, 0.0) for t, tp in pairs)  # eta = 0: the control stays on
    sd = DDIMScheduler(
        beta_schedule="scaled_linear", set_alpha_to_one=False, steps_offset=1, clip_sample=False
    )
    assert not any(control_is_off(sd, t, tp, 1.0) for t, tp in timestep_pairs(sd, 50))  # sigma > 0 throughout
