"""The benchmark scripts' measuring functions, on a micro model (their printed figures are not tested)."""

import torch

from benchmarks.kl_per_step import kl_per_step
from ctrldiff.control import add_control
from ctrldiff.ctrl import RolloutConfig, rollout
from ctrldiff.sampling import request_noise
from tests.conftest import micro_base


def test_kl_per_step_adds_up_to_the_trajectory_kl_of_a_rollout():
    model = add_control(micro_base(), [0, 1], lora_rank=2)
    with torch.no_grad():
        model.y_embedding.weight[0].normal_()  # a control that moves the means
    cfg = RolloutConfig(steps=4, grad_steps=4)
    c, seeds = torch.tensor([0, 1, 2]), [5, 6, 7]
    steps, pixels = kl_per_step(model, c, 0, seeds, cfg)
    noise = request_noise(seeds, model.base.sample_shape, cfg.steps)
    with torch.no_grad():
        _, _, total = rollout(model, c, torch.zeros_like(c), noise, cfg)
    assert len(steps) == cfg.steps - 1  # the last step is deterministic: no KL
    assert sum(steps) > 0
    torch.testing.assert_close(torch.tensor(sum(steps)), total.mean(), rtol=1e-5, atol=1e-6)
    assert pixels.shape[0] == 3 and pixels.dtype.name == "uint8"
