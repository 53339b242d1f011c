"""Run by `torchrun --nproc_per_node 2` (gloo on CPU): a few CTRL updates on a micro base (or, with a
second argument, a tiny Stable Diffusion folder), after which every rank writes its trainable
parameters for the test to compare."""

import sys
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import set_seed
from safetensors.torch import save_file

from ctrldiff.base import load_stable_diffusion
from ctrldiff.control import add_control
from ctrldiff.finetune import finetune
from tests.conftest import LABEL_META, micro_base, micro_finetune, micro_reward


class NanOnRank1:
    """Wraps a reward: rank 1's log-probabilities are NaN (a loss that goes non-finite on one rank)."""

    def __init__(self, reward):
        self.reward = reward

    def __getattr__(self, name):
        return getattr(self.reward, name)

    def __call__(self, x):
        return self.reward(x)

    def log_prob(self, x, y):
        log_p = self.reward.log_prob(x, y)
        return log_p * float("nan") if PartialState().process_index == 1 else log_p


def main(out: Path, sd: str | None = None) -> None:
    nan_on_rank1 = sd == "--nan-on-rank1"
    sd = None if nan_on_rank1 else sd
    if sd is None:
        base, reward = micro_base(), micro_reward()
    else:  # latent rollouts, VAE decode before the reward, prompts as c
        base, reward = load_stable_diffusion(sd, ["a cat", "a dog"]), micro_reward(in_channels=3)
    set_seed(0)
    model = add_control(base, [0, 1, 2, 3], lora_rank=2)
    cfg = micro_finetune(updates=3, probe_every=100, checkpoint_every=100)
    finetune(model, NanOnRank1(reward) if nan_on_rank1 else reward, 10.0, cfg, LABEL_META, 0, out / "ckpt")
    state = PartialState()  # initialised by finetune's Accelerator
    params = {n: p.detach().contiguous() for n, p in model.base.unet.named_parameters() if p.requires_grad}
    save_file(params, out / f"rank{state.process_index}.safetensors")


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
