"""The one DDIM step: its Gaussian mean and standard deviation (Song et al. 2021, eq. 12).

Sampling draws ``x_prev = mean + sigma * z``; the CTRL trajectory KL compares two means on the same
x_t with the same sigma. Both use this function, so they can never disagree. The timestep grid and
the noise schedule come from diffusers' DDIMScheduler; only the step itself is written out here,
because diffusers returns the sample, not the mean and sigma we need for the KL.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler


def timestep_pairs(scheduler: DDIMScheduler, steps: int) -> list[tuple[int, int]]:
    """The (t, t_prev) pairs of a ``steps``-step DDIM run, using the scheduler's timestep spacing.

    t_prev = -1 marks the last step, into the clean image (alpha_bar = the scheduler's final value).
    """
    scheduler.set_timesteps(steps)
    ts = [int(t) for t in scheduler.timesteps]
    return list(zip(ts, ts[1:] + [-1], strict=True))


def alpha_bar(scheduler: DDIMScheduler, t: int) -> torch.Tensor:
    """Cumulative signal fraction at t; for t < 0 the scheduler's ``final_alpha_cumprod``: 1 with
    ``set_alpha_to_one`` (our embedded base), alpha_bar(0) without it (Stable Diffusion 1.5's config)."""
    return scheduler.alphas_cumprod[t] if t >= 0 else scheduler.final_alpha_cumprod


def _unsupported(kind: str) -> ValueError:
    return ValueError(f"scheduler prediction_type {kind!r} is not supported: epsilon, v_prediction or sample")


def predicted_eps(scheduler: DDIMScheduler, output: torch.Tensor, x_t: torch.Tensor, t: int) -> torch.Tensor:
    """The denoiser's output as a noise prediction, whatever it was trained to predict.

    ``scheduler.config.prediction_type``: epsilon (Stable Diffusion 1.5) is returned as is; v
    (Salimans & Ho 2022: v = sqrt(a) eps - sqrt(1 - a) x0) and sample (x0) are converted, so the
    step below, guidance and the KL all work in one parameterisation. The map is affine in the
    output, so classifier-free guidance may combine outputs before or after it.
    """
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return output
    a_t = alpha_bar(scheduler, t).to(x_t)
    if kind == "v_prediction":
        return a_t.sqrt() * output + (1 - a_t).sqrt() * x_t
    if kind == "sample":
        return (x_t - a_t.sqrt() * output) / (1 - a_t).sqrt()
    raise _unsupported(kind)


def training_target(
    scheduler: DDIMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """What the denoiser learns to predict from x_t = sqrt(a) x0 + sqrt(1 - a) noise at timesteps t."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise _unsupported(kind)


def step_sigma(scheduler: DDIMScheduler, t: int, t_prev: int, eta: float) -> torch.Tensor:
    """The DDIM transition's standard deviation: s^2 = eta^2 (1 - a_prev) / (1 - a_t) (1 - a_t / a_prev)."""
    a_t, a_prev = alpha_bar(scheduler, t), alpha_bar(scheduler, t_prev)
    return (eta**2 * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()


def control_is_off(scheduler: DDIMScheduler, t: int, t_prev: int, eta: float) -> bool:
    """True on a deterministic step (sigma = 0) of a stochastic chain (eta > 0): a controlled model
    takes the base's step there.

    Any change to a deterministic transition has infinite KL against the base's, so the path measure
    CTRL's objective is defined on keeps the base's. With ``set_alpha_to_one`` (the embedded base)
    the last step, into t = -1, is such a step: without this rule a control could move x0 there at
    no cost in the KL (measured on a Gaussian known-answer case in tests/test_solvers.py). A chain
    with eta = 0 is deterministic throughout; it has no KL to keep finite, and the control stays on.
    """
    return eta > 0 and float(step_sigma(scheduler, t, t_prev, eta)) == 0.0


def ddim_step(
    scheduler: DDIMScheduler, x_t: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int, eta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One DDIM transition t -> t_prev: returns (mean, sigma, x0_hat).

    x0   = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
    s^2  = eta^2 (1 - a_prev) / (1 - a_t) (1 - a_t / a_prev)
    mean = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps
    """
    a_t = alpha_bar(scheduler, t).to(x_t)
    a_prev = alpha_bar(scheduler, t_prev).to(x_t)
    x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    sigma = step_sigma(scheduler, t, t_prev, eta).to(x_t)
    mean = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
    return mean, sigma, x0
