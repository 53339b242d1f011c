"""Reconstruction guidance: add the reward's gradient, taken through the denoiser's x̂0, to the score.

    eps' = eps - scale * sqrt(1 - a_t) * d/dx_t log p̂(y | x̂0(x_t))

(the score is -eps / sqrt(1 - a_t), so this adds scale * gradient to the score). Scale 0 is the
base sampler. Cost per step: the guided denoiser call plus one backward pass through it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctrldiff.base import BaseModel
from ctrldiff.classifier import Classifier
from ctrldiff.ddim import alpha_bar, ddim_step
from ctrldiff.guidance import tweedie_log_prob
from ctrldiff.sampling import SamplerConfig


@dataclass
class ReconstructionGuidance:
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
        eps, _, grad = tweedie_log_prob(model, self.reward, x, t, t_prev, c, y, cfg)
        eps = eps - self.scale * (1 - alpha_bar(model.scheduler, t)).sqrt() * grad
        mean, sigma, _ = ddim_step(model.scheduler, x, eps, t, t_prev, cfg.eta)
        return mean + sigma * z
