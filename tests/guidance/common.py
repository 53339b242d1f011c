"""Shared by the guidance tests: requests, a sampler and the mean log-probability a method reaches."""

import torch

from ctrldiff.sampling import SamplerConfig, sample

CFG = SamplerConfig(steps=4, eta=1.0, guidance_scale=2.0)
C = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
Y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
SEEDS = list(range(100, 108))


def sharp_reward():
    """The micro reward with a low temperature: a random classifier is nearly uniform otherwise."""
    from tests.conftest import micro_reward

    reward = micro_reward()
    reward.temperature.fill_(0.05)
    return reward


def run(base, step=None) -> torch.Tensor:
    """Images for the fixed requests with ``step`` (None: the plain base sampler)."""
    if step is None:
        return sample(base, C, SEEDS, CFG, Y, y_null=4)
    return sample(base, C, SEEDS, CFG, Y, y_null=4, step=step)


def mean_log_prob(reward, images: torch.Tensor) -> float:
    with torch.no_grad():
        return reward.log_prob(images, Y).mean().item()
