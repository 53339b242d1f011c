"""Diffusion posterior sampling (Chung et al. 2023) with a classifier as the measurement model.

After the plain DDIM step, move x_t_prev along the gradient (with respect to x_t, through the
denoiser, as in DPS) of log p̂(y | x̂0(x_t)), with DPS's step-size normalisation by the residual
norm. Reading -log p̂ as ||residual||² / 2, the residual norm is sqrt(-2 log p̂) and

    x_t_prev = x'_t_prev + scale * sqrt(2 / -log p̂) * d/dx_t log p̂(y | x̂0(x_t))

Scale 0 is the base sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctrldiff.base import BaseModel
from ctrldiff.classifier import Classifier
from ctrldiff.ddim import ddim_step
from ctrldiff.guidance import tweedie_log_prob
from ctrldiff.sampling import SamplerConfig


@dataclass
class DPS:
    reward: Classifier
    scale: float

    def __call__(
        self,
        model: BaseModel,
        x: torch.Tensor,
        t: int,
        t_prev: int,
        z: torch.Tensor,
        c: torch.Tensor,
        cfg: SamplerConfig,
        y: torch.Tensor,
        y_null: int | None = None,
        seeds: list[int] | None = None,
    ) -> torch.Tensor:
        eps, log_p, grad = tweedie_log_prob(model, self.reward, x, t, t_prev, c, y, cfg)
        mean, sigma, _ = ddim_step(model.scheduler, x, eps, t, t_prev, cfg.eta)
        step = self.scale * (2 / (-log_p).clamp(min=1e-6)).sqrt()
        return mean + sigma * z + step.view(-1, *[1] * (x.dim() - 1)) * grad
