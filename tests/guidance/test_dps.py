import torch

from ctrldiff.guidance.dps import DPS
from tests.conftest import micro_base
from tests.guidance.common import mean_log_prob, run, sharp_reward


def test_scale_zero_is_the_base_sampler():
    base, reward = micro_base(), sharp_reward()
    torch.testing.assert_close(run(base, DPS(reward, 0.0)), run(base))


def test_positive_scale_raises_the_requested_log_probability():
    base, reward = micro_base(), sharp_reward()
    plain = mean_log_prob(reward, run(base))
    guided = mean_log_prob(reward, run(base, DPS(reward, 0.5)))
    assert guided > plain + 0.05
