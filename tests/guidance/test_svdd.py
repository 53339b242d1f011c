import torch

from ctrldiff.guidance.svdd import SVDD
from tests.conftest import micro_base
from tests.guidance.common import mean_log_prob, run, sharp_reward


def test_one_candidate_is_the_base_sampler():
    base, reward = micro_base(), sharp_reward()
    torch.testing.assert_close(run(base, SVDD(reward, candidates=1)), run(base))


def test_more_candidates_raise_the_requested_log_probability():
    base, reward = micro_base(), sharp_reward()
    plain = mean_log_prob(reward, run(base))
    greedy = run(base, SVDD(reward, candidates=8))
    assert mean_log_prob(reward, greedy) > plain + 0.05
    torch.testing.assert_close(greedy, run(base, SVDD(reward, candidates=8)))  # reproducible
    soft = run(base, SVDD(reward, candidates=8, temperature=1.0))
    assert soft.shape == greedy.shape
