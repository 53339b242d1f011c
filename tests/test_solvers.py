"""The solvers of CTRL's RL step against a case with a known answer.

A one-dimensional Gaussian base with its exact denoiser: data N(MU, S^2), so E[eps | x_t] is affine
in x_t, and every DDIM step of the base is affine too. The reward log p̂(y | x) = -(x - m_y)^2 / 2R^2
tilts the base's x0 (exactly Gaussian: the chain is linear) into another Gaussian, in closed form.
The control is an affine correction a[k, y] + b[k, y] x of each step's noise prediction, which holds
the tilted kernel exactly. Each solver, run through its own code on this model, must reach the
tilted target's mean and variance.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from torch import nn

from ctrldiff.control import ControlledModel, ControlledStep, uncontrolled_from
from ctrldiff.ctrl import RolloutConfig
from ctrldiff.ddim import ddim_step, predicted_eps, timestep_pairs
from ctrldiff.objective import trajectory_kl
from ctrldiff.sampling import SamplerConfig, sample
from ctrldiff.solvers import Adjoint, Backprop, Weighted
from ctrldiff.tilt import base_trajectories

MU, S = 0.5, 0.3  # the base's data distribution N(MU, S^2)
TARGETS, R = [-0.2, 0.9], 0.5  # log p̂(y | x) = -(x - TARGETS[y])^2 / (2 R^2)
STEPS = 6


@dataclass
class Out:
    sample: torch.Tensor


class GaussianDenoiser(nn.Module):
    """The exact E[eps | x_t] of N(MU, S^2) data, plus a learnable affine control per (step, y)."""

    def __init__(self, scheduler: DDIMScheduler):
        super().__init__()
        self.scheduler = scheduler
        self.index = {t: k for k, (t, _) in enumerate(timestep_pairs(scheduler, STEPS))}
        self.a = nn.Parameter(torch.zeros(STEPS, len(TARGETS) + 1))
        self.b = nn.Parameter(torch.zeros(STEPS, len(TARGETS) + 1))
        self.enabled = True

    def forward(self, x, t, enc, class_labels=None):
        a = self.scheduler.alphas_cumprod[int(t[0])].to(x)
        eps = (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * S**2 + 1 - a)
        if self.enabled and class_labels is not None:
            k = self.index[int(t[0])]
            eps = eps + (self.a[k, class_labels] + self.b[k, class_labels] * x.flatten(1)[:, 0]).view(
                -1, 1, 1, 1
            )
        return Out(eps)


class NoClass(nn.Module):
    null_index = 1

    def forward(self, c):
        return torch.zeros(len(c), 1, 1)


class ToyBase:
    """Duck-types ctrldiff.base.BaseModel: one class c, pixel space, a 1x1x1 'image'."""

    classes = [0]
    sample_shape = (1, 1, 1)
    vae = None

    def __init__(self):
        self.scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
        self.unet = GaussianDenoiser(self.scheduler)
        self.encoder = NoClass()

    device = torch.device("cpu")

    def decode(self, x):
        return x

    def check_c(self, c):
        pass


class ToyControl:
    """Duck-types ControlledModel: y in {0, 1}, NULL = 2; the reference switches the control off."""

    is_off = ControlledModel.is_off

    def __init__(self, base_last_steps: int = 0):
        self.base, self.y_classes, self.y_null = ToyBase(), [0, 1], 2
        self.left = base_last_steps
        self.uncontrolled_t = uncontrolled_from(self.base.scheduler, STEPS, 1.0, base_last_steps)

    @contextmanager
    def reference(self):
        self.base.unet.enabled = False
        try:
            yield
        finally:
            self.base.unet.enabled = True


class GaussianReward(nn.Module):
    def forward(self, x):  # one score per class (CTRLLoss logs the argmax's accuracy)
        m = torch.tensor(TARGETS, dtype=x.dtype)
        return -(x.flatten(1)[:, :1] - m).pow(2) / (2 * R**2)

    def log_prob(self, x, y):
        m = torch.tensor(TARGETS, dtype=x.dtype)[y]
        return -(x.flatten(1)[:, 0] - m).pow(2) / (2 * R**2)


def base_chain_moments(scheduler: DDIMScheduler, eta: float) -> tuple[float, float]:
    """Mean and variance of the base chain's x0: each step is affine, so propagate them exactly."""
    return propagate(scheduler, eta, timestep_pairs(scheduler, STEPS), 0.0, 1.0)


def base_step(scheduler: DDIMScheduler, eta: float, t: int, t_prev: int) -> tuple[float, float, float]:
    """The base's step t -> t_prev as x_prev = slope x_t + offset + sigma z."""
    a = scheduler.alphas_cumprod[t].double()

    def step_mean(x):
        eps = (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * S**2 + 1 - a)
        return ddim_step(scheduler, x, predicted_eps(scheduler, eps, x, t), t, t_prev, eta)

    m0, sigma, _ = step_mean(torch.zeros((), dtype=torch.float64))
    return float(step_mean(torch.ones((), dtype=torch.float64))[0] - m0), float(m0), float(sigma)


def propagate(scheduler: DDIMScheduler, eta: float, pairs, mean: float, var: float) -> tuple[float, float]:
    for t, t_prev in pairs:
        slope, offset, sigma = base_step(scheduler, eta, t, t_prev)
        mean, var = slope * mean + offset, slope**2 * var + sigma**2
    return mean, var


def tilted(mean: float, var: float, y: int, gamma: float) -> tuple[float, float]:
    precision = 1 / var + gamma / R**2
    return (mean / var + gamma * TARGETS[y] / R**2) / precision, 1 / precision


def tilted_with_steps_left_to_the_base(scheduler: DDIMScheduler, y: int, gamma: float, left: int):
    """x0's mean and variance at the optimum when the last ``left`` stochastic steps keep the base's kernel.

    The control can only tilt x_m (the state those steps start from), by h(x_m) = E[p̂^gamma | x_m]:
    the base's steps from x_m are affine, x0 | x_m ~ N(A x_m + B, V), so h is Gaussian in A x_m + B with
    variance R^2 / gamma + V. The base's steps then carry the tilted x_m to x0.
    """
    pairs = timestep_pairs(scheduler, STEPS)
    stochastic = [k for k, (t, t_prev) in enumerate(pairs) if base_step(scheduler, 1.0, t, t_prev)[2] > 0]
    m = stochastic[-left]
    mean, var = propagate(scheduler, 1.0, pairs[:m], 0.0, 1.0)
    offset, noise = propagate(scheduler, 1.0, pairs[m:], 0.0, 0.0)
    slope = propagate(scheduler, 1.0, pairs[m:], 1.0, 0.0)[0] - offset
    v = R**2 / gamma + noise
    precision = 1 / var + slope**2 / v
    mean, var = (mean / var + slope * (TARGETS[y] - offset) / v) / precision, 1 / precision
    return propagate(scheduler, 1.0, pairs[m:], mean, var)


def draw(y: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    g = np.random.default_rng(seed)
    return torch.zeros(n, dtype=torch.long), torch.full((n,), y), g.integers(0, 2**62, n).tolist()


def fit(solver, model: ToyControl, updates: int, batch: int, lr: float) -> None:
    opt = torch.optim.Adam([model.base.unet.a, model.base.unet.b], lr=lr)
    decay = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda u: 1 - u / updates
    )  # the noise of the last steps shrinks
    for u in range(updates):
        c, _, seeds = draw(0, batch, 10_000 + u)
        y = torch.arange(batch) % 2
        loss, _ = solver(model, c, y, seeds, probing=False)
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()


def moments(model: ToyControl, y: int, n: int = 20_000) -> tuple[float, float]:
    c, yy, seeds = draw(y, n, 7)
    cfg = SamplerConfig(STEPS, 1.0, 1.0)
    x = sample(model.base, c, seeds, cfg, yy, model.y_null, ControlledStep(model)).flatten()
    return float(x.mean()), float(x.var())


GAMMA = 1.0


def assert_reaches_the_tilt(model: ToyControl, gamma: float = GAMMA) -> None:
    """The fitted chain's x0 has the tilted target's mean (within 0.03) and variance (10 %), per y;
    with steps left to the base, the optimum of that constrained chain."""
    base = base_chain_moments(model.base.scheduler, 1.0)
    for y in (0, 1):
        if model.uncontrolled_t is None:
            mean, var = tilted(*base, y, gamma)
        else:
            mean, var = tilted_with_steps_left_to_the_base(model.base.scheduler, y, gamma, model.left)
        got = moments(model, y)
        assert got[0] == pytest.approx(mean, abs=0.03), (y, got, (mean, var))
        assert got[1] == pytest.approx(var, rel=0.1), (y, got, (mean, var))


def test_the_toy_bases_chain_has_the_moments_propagated_in_closed_form():
    model = ToyControl()
    mean, var = base_chain_moments(model.base.scheduler, 1.0)
    got = moments(model, 0)
    assert got[0] == pytest.approx(mean, abs=0.01) and got[1] == pytest.approx(var, rel=0.03)


def test_weighted_reaches_the_tilted_targets_mean_and_variance():
    model = ToyControl()
    c, _, seeds = draw(0, 4000, 1)
    traj = base_trajectories(model.base, c, seeds, SamplerConfig(STEPS, 1.0, 1.0), 4000)
    rollout = RolloutConfig(STEPS, 1.0, 1.0, grad_steps=1)
    solver = Weighted(GaussianReward(), GAMMA, rollout, "sum", traj, model)
    fit(solver, model, updates=300, batch=256, lr=0.02)
    assert_reaches_the_tilt(model)


def test_backprop_reaches_the_tilted_targets_mean_and_variance():
    model = ToyControl()
    solver = Backprop(GaussianReward(), GAMMA, RolloutConfig(STEPS, 1.0, 1.0, grad_steps=STEPS), "sum")
    fit(solver, model, updates=300, batch=128, lr=0.02)
    assert_reaches_the_tilt(model)


def test_adjoint_matching_reaches_the_tilted_targets_mean_and_variance():
    model = ToyControl()
    solver = Adjoint(GaussianReward(), GAMMA, RolloutConfig(STEPS, 1.0, 1.0, grad_steps=STEPS), "sum")
    fit(solver, model, updates=300, batch=128, lr=0.02)
    assert_reaches_the_tilt(model)


def test_weighted_at_gamma_zero_leaves_the_model_at_the_base():
    model = ToyControl()
    c, _, seeds = draw(0, 4000, 1)
    traj = base_trajectories(model.base, c, seeds, SamplerConfig(STEPS, 1.0, 1.0), 4000)
    solver = Weighted(GaussianReward(), 0.0, RolloutConfig(STEPS, 1.0, 1.0, grad_steps=1), "sum", traj, model)
    fit(solver, model, updates=200, batch=256, lr=0.02)
    c, y, seeds = draw(0, 2000, 5)
    kl = trajectory_kl(model, c, y % 2, seeds, RolloutConfig(STEPS, 1.0, 1.0, grad_steps=1))
    assert float(kl.mean()) < 0.01  # nats: 0.001 measured; the gamma = 1 fit spends 0.065
    mean, var = base_chain_moments(model.base.scheduler, 1.0)
    got = moments(model, 0)
    assert got[0] == pytest.approx(mean, abs=0.02) and got[1] == pytest.approx(var, rel=0.05)


# Two steps left to the base (t = 332 -> 166 -> 0): the last alone moves the toy's optimum by < 0.002.
LEFT, GAMMA_LEFT = 2, 4.0


def test_the_constrained_optimum_is_not_the_tilt_nor_the_base():
    scheduler = ToyBase().scheduler
    base = base_chain_moments(scheduler, 1.0)
    for y in (0, 1):
        free = tilted(*base, y, GAMMA_LEFT)
        left = tilted_with_steps_left_to_the_base(scheduler, y, GAMMA_LEFT, LEFT)
        assert abs(left[0] - free[0]) > 0.06 and left[1] > free[1] * 1.2  # twice the test's tolerances
        assert abs(left[0] - base[0]) > 0.015  # the control still moves x0


@pytest.mark.parametrize("solver", [Backprop, Adjoint])
def test_a_solver_with_the_last_steps_left_to_the_base_reaches_that_chains_optimum(solver):
    model = ToyControl(base_last_steps=LEFT)
    rollout = RolloutConfig(STEPS, 1.0, 1.0, grad_steps=STEPS)
    fit(solver(GaussianReward(), GAMMA_LEFT, rollout, "sum"), model, 300, 128, 0.02)
    assert_reaches_the_tilt(model, GAMMA_LEFT)
    ts = [t for t, _ in timestep_pairs(model.base.scheduler, STEPS)]
    for k in range(len(ts)):  # no gradient reached a step left to the base
        if ts[k] <= model.uncontrolled_t:
            assert (
                float((model.base.unet.a[k].abs().max() + model.base.unet.b[k].abs().max()).detach()) == 0.0
            )


def test_weighted_with_the_last_steps_left_to_the_base_reaches_that_chains_optimum():
    model = ToyControl(base_last_steps=LEFT)
    c, _, seeds = draw(0, 4000, 1)
    traj = base_trajectories(model.base, c, seeds, SamplerConfig(STEPS, 1.0, 1.0), 4000)
    rollout = RolloutConfig(STEPS, 1.0, 1.0, grad_steps=1)
    fit(Weighted(GaussianReward(), GAMMA_LEFT, rollout, "sum", traj, model), model, 300, 256, 0.02)
    assert_reaches_the_tilt(model, GAMMA_LEFT)
