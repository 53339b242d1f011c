"""Training-free and training-based baselines CTRL is compared with (one method per module).

Each method is a sampling step with the signature of ``ctrldiff.sampling.ddim_cfg_step``, so it
runs inside the same seeded DDIM loop, on the same noise, as the base model and CTRL. The
gradient-based ones share ``tweedie_log_prob``: the reward classifier's log p̂(y | x̂0(x_t)) and its
gradient with respect to x_t, through the denoiser.
"""

from __future__ import annotations

import torch

from ctrldiff.base import BaseModel
from ctrldiff.classifier import Classifier
from ctrldiff.ddim import ddim_step
from ctrldiff.sampling import SamplerConfig, guided_eps


def tweedie_log_prob(
    model: BaseModel,
    reward: Classifier,
    x: torch.Tensor,
    t: int,
    t_prev: int,
    c: torch.Tensor,
    y: torch.Tensor,
    cfg: SamplerConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(guided eps, log p̂(y | decode(x̂0)), d log p̂ / d x_t), the eps and log p̂ detached.

    x̂0 is not clamped here: clamping would zero the gradient wherever the estimate overshoots.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        eps = guided_eps(model, x, t, c, cfg.guidance_scale)
        _, _, x0 = ddim_step(model.scheduler, x, eps, t, t_prev, cfg.eta)
        log_p = reward.log_prob(model.decode(x0), y)
        (grad,) = torch.autograd.grad(log_p.sum(), x)
    return eps.detach(), log_p.detach(), grad
