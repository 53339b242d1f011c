import pandas as pd

from ctrldiff.guidance.reconstruction import ReconstructionGuidance
from ctrldiff.methods import balanced_requests, generate
from ctrldiff.params import SampleParams
from ctrldiff.sampling import ddim_cfg_step
from tests.conftest import micro_base, micro_reward

SAMPLER = SampleParams(steps=3, guidance_scale=2.0, batch_size=8)


def test_balanced_requests_cover_every_pair_with_consecutive_seeds():
    req = balanced_requests(num_c=3, num_y=2, n=2, seed=10)
    assert len(req) == 12 and req.seed.tolist() == list(range(10, 22))
    assert (req.groupby(["c", "y"]).size() == 2).all()


def test_generate_counts_denoiser_calls_and_the_back_propagated_ones():
    base = micro_base()
    req, pixels, cost = generate(base, ddim_cfg_step, 4, SAMPLER, 4, 1, 0, "base")
    assert isinstance(req, pd.DataFrame) and pixels.shape[0] == len(req) == 12
    assert cost["nfe_per_image"] == 3 * 2  # 3 steps, guided and NULL branches
    assert cost["backprop_nfe_per_image"] == 0

    guided = ReconstructionGuidance(micro_reward(), 1.0)
    _, _, cost = generate(base, guided, 4, SAMPLER, 4, 1, 0, "reconstruction")
    assert cost["nfe_per_image"] == 3 * 2 and cost["backprop_nfe_per_image"] == 3 * 2
