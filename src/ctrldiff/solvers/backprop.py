"""Direct back-propagation through the sampler (the paper's Algorithm 2): ctrl.CTRLLoss on rollouts
of the current model, gradients through the last K steps."""

from __future__ import annotations

import torch

from ctrldiff.control import ControlledModel
from ctrldiff.ctrl import CTRLLoss, LossTerms, RolloutConfig
from ctrldiff.sampling import request_noise


class Backprop:
    """-gamma log p̂(y | x0) + KL of the window, on a fresh rollout of each request."""

    def __init__(self, reward: torch.nn.Module, gamma: float, rollout: RolloutConfig, kl_reduction: str):
        self.loss = CTRLLoss(reward, gamma, rollout, kl_reduction)

    def __call__(
        self, model: ControlledModel, c: torch.Tensor, y: torch.Tensor, seeds: list[int], probing: bool
    ) -> tuple[torch.Tensor, LossTerms]:
        device = model.base.device
        noise = request_noise(seeds, model.base.sample_shape, self.loss.cfg.steps).to(device)
        # the whole trajectory's KL (the reference on every step) only at the probe updates
        return self.loss(model, c.to(device), y.to(device), noise, full_kl=probing)
