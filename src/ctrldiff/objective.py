"""CTRL's objective measured on a model's own samples: γ E log p̂(y | x0) − E KL(trajectory ‖ base)."""

from __future__ import annotations

import torch

from ctrldiff.control import ControlledModel
from ctrldiff.ctrl import RolloutConfig, rollout
from ctrldiff.sampling import request_noise


@torch.no_grad()
def trajectory_kl(
    model: ControlledModel,
    c: torch.Tensor,
    y: torch.Tensor,
    seeds: list[int],
    cfg: RolloutConfig,
    kl_reduction: str = "sum",
    batch_size: int = 80,
) -> torch.Tensor:
    """Each request's whole-trajectory KL to the base, on the very trajectory ``sampling.sample``
    draws for its seed: the KL term of CTRL's objective, measured on the evaluation's own images."""
    out = []
    device = model.base.device
    for i in range(0, len(c), batch_size):
        noise = request_noise(seeds[i : i + batch_size], model.base.sample_shape, cfg.steps).to(device)
        _, _, kl_steps = rollout(
            model,
            c[i : i + batch_size].to(device),
            y[i : i + batch_size].to(device),
            noise,
            cfg,
            kl_reduction,
        )
        out.append(kl_steps.sum(1).cpu())
    return torch.cat(out)
