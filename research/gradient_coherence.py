"""How much of the reward's gradient at x_t the noise drawn after step t decides.

Run after `dvc repro finetune` (or before it, on the base alone):
    python research/gradient_coherence.py [--models models] [--ctrl models/ctrl] [--n 20] [--m 6]

CTRL's pathwise gradient reaches the control at step t through d log p̂(y | x0) / d x_t, taken
along one draw of the later noise. For n of the `sample` stage's requests (their seeds) this holds
x_t fixed after k DDIM transitions, draws m continuations and takes each one's
g = d log p̂(y | x0) / d x_t. The signal fraction ||E g||^2 / E ||g||^2 is the part of that
gradient the later noise leaves alone: 1 at the last (deterministic) step, near 0 where a
trajectory's gradient is mostly the luck of its continuation, so a control acting there learns
from it only on average over many trajectories.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ctrldiff.base import BaseModel, load_base
from ctrldiff.control import load_control
from ctrldiff.ddim import timestep_pairs
from ctrldiff.methods import balanced_requests
from ctrldiff.params import load_params
from ctrldiff.sampling import SamplerConfig, ddim_cfg_step, sample
from ctrldiff.tasks import load_reward, num_joint_classes


def signal_fraction(g: torch.Tensor) -> torch.Tensor:
    """(m, n, ...) gradients of m continuations of n states -> per state ||E g||^2 / E ||g||^2.

    ||mean g||^2 estimates ||E g||^2 + tr Cov / m and mean ||g||^2 estimates ||E g||^2 + tr Cov;
    their ratio is s + (1 - s) / m, solved here for s. NaN for a state whose every gradient is zero
    (its image sits where the reward is flat, or clipped): it has no gradient to split.
    """
    m, g = g.shape[0], g.flatten(2)
    coherence = g.mean(0).pow(2).sum(-1) / g.pow(2).sum(-1).mean(0)
    return (coherence - 1 / m) / (1 - 1 / m)


def continuation_gradients(
    base: BaseModel,
    reward: torch.nn.Module,
    c: torch.Tensor,
    y: torch.Tensor,
    seeds: list[int],
    cfg: SamplerConfig,
    m: int,
    seed: int,
    y_null: int | None = None,
) -> list[tuple[int, torch.Tensor, float]]:
    """For each DDIM step k: (t, signal fraction per request, mean |g|) of the gradient at x_t.

    The sampler is the base (``y_null`` None) or, with its control attached, the fine-tuned model
    asked for y. The requests' own rollouts (noise from ``seeds``) give the states; m continuations
    of each follow, with fresh noise drawn from ``seed``.
    """
    y_in = None if y_null is None else y
    states: list[torch.Tensor] = []

    def record(model: BaseModel, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        states.append(x)
        return ddim_cfg_step(model, x, *args, **kwargs)

    with torch.no_grad():
        sample(base, c, seeds, cfg, y_in, y_null, record)
    gen = torch.Generator().manual_seed(seed)
    pairs = timestep_pairs(base.scheduler, cfg.steps)
    cm, ym = c.repeat(m), y.repeat(m)
    ym_in = None if y_in is None else ym
    out = []
    for k, state in enumerate(states):
        x_k = state.repeat(m, *[1] * (state.dim() - 1)).requires_grad_(True)
        x = x_k
        for t, t_prev in pairs[k:]:
            z = torch.randn(x.shape, generator=gen)
            x = ddim_cfg_step(base, x, t, t_prev, z, cm, cfg, ym_in, y_null)
        log_p = reward.log_prob(base.decode(x).clamp(-1, 1), ym)
        (g,) = torch.autograd.grad(log_p.sum(), x_k)
        g = g.view(m, len(c), -1)
        out.append((pairs[k][0], signal_fraction(g), g.norm(dim=-1).mean().item()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--ctrl", type=Path, help="a fine-tuned control (default: the base alone)")
    parser.add_argument("--data", type=Path, default=Path("data/labelled"))
    parser.add_argument("--n", type=int, default=20, help="requests, spread over the (c, y) pairs")
    parser.add_argument("--m", type=int, default=6, help="continuations of each state")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    params = load_params("params.yaml")
    meta = json.loads((args.data / "meta.json").read_text())
    base = load_base(args.models / "base")
    y_null = None if args.ctrl is None else load_control(base, args.ctrl).y_null
    base.unet.requires_grad_(False)  # only d/dx_t is wanted
    reward = load_reward(meta, args.models).requires_grad_(False)
    s = params.sample
    cfg = SamplerConfig(s.steps, s.eta, s.guidance_scale)
    req = balanced_requests(len(base.classes), num_joint_classes(meta), 1, s.seed)
    req = req.iloc[torch.linspace(0, len(req) - 1, args.n).round().long().numpy()]
    c, y = torch.tensor(req.c.to_numpy()), torch.tensor(req.y.to_numpy())
    sampler = f"fine-tuned {args.ctrl}" if args.ctrl else "base"
    print(f"{sampler}: {args.n} requests x {args.m} continuations")
    print("     t | signal fraction: mean (quartiles) | mean |g| | requests with no gradient")
    seeds = req.seed.tolist()
    for t, frac, norm in continuation_gradients(base, reward, c, y, seeds, cfg, args.m, args.seed, y_null):
        q = torch.nanquantile(frac, torch.tensor([0.25, 0.5, 0.75]))
        quartiles = " ".join(f"{v:5.2f}" for v in q)
        flat = int(frac.isnan().sum())
        print(f"{t:6d} | {frac.nanmean():5.2f} ({quartiles})        | {norm:8.1f} | {flat}", flush=True)


if __name__ == "__main__":
    main()
