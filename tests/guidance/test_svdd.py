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


def test_candidate_noise_follows_each_requests_own_seed_not_its_batch():
    """The same request sampled alone or inside a batch gets the same image (before, the candidate
    noise came from (0, t) and the batch's shape, so it depended on the batch)."""
    from ctrldiff.sampling import sample
    from tests.guidance.common import CFG, SEEDS, C, Y

    base, reward = micro_base(), sharp_reward()
    step = SVDD(reward, candidates=4, temperature=1.0)
    batch = sample(base, C, SEEDS, CFG, Y, y_null=4, step=step)
    alone = sample(base, C[1:2], SEEDS[1:2], CFG, Y[1:2], y_null=4, step=step)
    torch.testing.assert_close(alone[0], batch[1])
