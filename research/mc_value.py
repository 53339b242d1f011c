"""The tilted chain's kernel from a Monte-Carlo value: how close do step-wise choices get to the optimum?

Run after `dvc repro base train_classifier@digit train_classifier@compressibility`:
    python research/mc_value.py --continuations 2 --candidates 16 [--per-pair 1] [--min-t 100]
    python research/mc_value.py --continuations 8                  (the gradient form, --candidates 0)
    python research/mc_value.py --continuations 1 --candidates 16 --shift 4 [--pick]  (a Gaussian mean shift)
    python research/mc_value.py --continuations 1 --candidates 16 --min-t 500          (choose early only)

The optimum of CTRL's objective is the base's path measure tilted by p̂(y | x0)^γ. Its kernel at step
t -> t_prev is the base's N(μ, σ²) times the value h(x') = E_base[p̂(y | x0)^γ | x_t_prev = x']. This
script estimates h with M continuations of the base's own sampler from x' (fresh noise) and samples
with it in one of two ways, each the target a distilled control would fit:

- ``--candidates K`` (K > 0): draw K candidates from the base's kernel (candidate 0 the request's own
  noise) and keep one with probability ∝ ĥ = mean_m p̂(y | x0_m)^γ. Forward only; as K and M grow this
  draws the tilted kernel itself.
- ``--candidates 0``: the Gaussian linearisation μ + σ² ∇ log ĥ(μ), with the pathwise gradient
  ∇ log ĥ = Σ_m softmax_m(γ log p̂_m) ∇_x' γ log p̂(y | x0_m(x')), exact as M grows if log h is
  nearly linear over σ.

Steps with t <= min_t keep the base's kernel, as `finetune.base_last_steps` does, and so do steps with
t > max_t where ``--max-t`` is given (to ask which steps the choice acts on). Prints oracle
accuracy and macro-F1, c_accuracy, the reward's E log p̂, the path KL (gradient form: Σ σ²‖∇ log ĥ‖² / 2;
resampling: the selection's KL to the uniform choice, at most log K per step) and γ E log p̂ − KL, on
requests from seeds 5,000,000+ (disjoint from the evaluation's, the tuning's and the base rollouts').
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ctrldiff.base import BaseModel, load_base
from ctrldiff.classifier import Classifier
from ctrldiff.ddim import ddim_step, timestep_pairs
from ctrldiff.evaluation import control_metrics, features_and_predictions
from ctrldiff.methods import balanced_requests
from ctrldiff.oracles import to_uint8
from ctrldiff.params import load_params
from ctrldiff.sampling import SamplerConfig, ddim_cfg_step, guided_eps, sample
from ctrldiff.tasks import load_reward, num_joint_classes, oracle_classes


@functools.cache
def dct_basis(n: int) -> torch.Tensor:
    """The orthonormal n-point DCT-II matrix D: the 2-D transform of an n × n image X is D @ X @ D.T."""
    k = torch.arange(n, dtype=torch.float64)
    d = torch.cos((2 * k[None] + 1) * k[:, None] * math.pi / (2 * n)) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d.float()


def lowpass(x: torch.Tensor, keep: int) -> torch.Tensor:
    """x's projection onto its keep × keep lowest 2-D DCT frequencies, per channel."""
    d = dct_basis(x.shape[-1]).to(x)
    mask = torch.zeros(x.shape[-2:], dtype=x.dtype)
    mask[:keep, :keep] = 1
    return d.T @ ((d @ x @ d.T) * mask) @ d


class ValueGradientStep:
    """A sampling step: the base's mean plus σ² times the M-continuation estimate of ∇ log h."""

    def __init__(self, reward: Classifier, gamma: float, continuations: int, min_t: int, chunk: int = 48):
        self.reward, self.gamma, self.m, self.min_t, self.chunk = reward, gamma, continuations, min_t, chunk
        self.max_t: int | None = None  # steps out of t > max_t keep the base's kernel too (None: none)
        self.kl: list[torch.Tensor] = []

    def continuations(self, model: BaseModel, x: torch.Tensor, t_prev: int, cfg: SamplerConfig, seeds):
        """The base's steps from t_prev on, and each request's M continuation noises, (M * n, steps, ...):
        row j * n + i is continuation j of request i, seeded by (the request's seed, t_prev)."""
        pairs = timestep_pairs(model.scheduler, cfg.steps)
        rest = pairs[[t for t, _ in pairs].index(t_prev) :]
        gens = [torch.Generator().manual_seed(int(s) * 7_919 + t_prev) for s in seeds]
        noise = torch.stack([torch.randn((self.m, len(rest), *x.shape[1:]), generator=g) for g in gens], 1)
        return rest, noise.flatten(0, 1).to(x)

    def end_log_p(self, model: BaseModel, x, rest, c, y, cfg: SamplerConfig, noise) -> torch.Tensor:
        """γ log p̂(y | x0) at the end of the base's chain from x over the steps ``rest``."""
        for k, (t, tp) in enumerate(rest):
            x = ddim_cfg_step(model, x, t, tp, noise[:, k], c, cfg)
        return self.gamma * self.reward.log_prob(model.decode(x).clamp(-1, 1), y)

    def grad_log_h(self, model: BaseModel, x: torch.Tensor, t_prev: int, c, y, cfg, seeds) -> torch.Tensor:
        rest, noise = self.continuations(model, x, t_prev, cfg, seeds)
        m, n = self.m, len(x)
        xs, cs, ys = x.repeat(m, 1, 1, 1), c.repeat(m), y.repeat(m)
        grads, logps = [], []
        for i in range(0, m * n, self.chunk):  # chunks of continuations: the graph of all M at once is large
            sl = slice(i, i + self.chunk)
            start = xs[sl].clone().requires_grad_(True)
            lp = self.end_log_p(model, start, rest, cs[sl], ys[sl], cfg, noise[sl])
            grads.append(torch.autograd.grad(lp.sum(), start)[0])
            logps.append(lp.detach())
        g, lp = torch.cat(grads).view(m, n, *x.shape[1:]), torch.cat(logps).view(m, n)
        w = lp.softmax(0).view(m, n, *[1] * (x.dim() - 1))
        return (w * g).sum(0)

    @torch.no_grad()
    def base_kernel(self, model: BaseModel, x, t: int, t_prev: int, c, cfg: SamplerConfig) -> tuple:
        """(mean, σ, whether this step keeps the base's kernel) of the base's guided step."""
        eps = guided_eps(model, x, t, c, cfg.guidance_scale)
        mean, sigma, _ = ddim_step(model.scheduler, x, eps, t, t_prev, cfg.eta)
        late = self.max_t is not None and t > self.max_t
        return mean, sigma, float(sigma) == 0.0 or t <= self.min_t or late

    def __call__(self, model, x, t, t_prev, z, c, cfg, y, y_null=None, seeds=None):
        mean, sigma, off = self.base_kernel(model, x, t, t_prev, c, cfg)
        if off:
            return mean + sigma * z
        with torch.enable_grad():
            shift = sigma**2 * self.grad_log_h(model, mean, t_prev, c, y, cfg, seeds)
        self.kl.append(shift.pow(2).flatten(1).sum(1) / (2 * sigma**2))
        return mean + shift + sigma * z


class ValueResampleStep(ValueGradientStep):
    """A sampling step: K candidates from the base's kernel, one kept with probability ∝ ĥ(candidate).

    ĥ is the M-continuation Monte-Carlo mean of p̂(y | x0)^γ (forward only). With exact h and many
    candidates this draws the tilted kernel itself, with no Gaussian approximation. ``kl`` collects the
    selection's KL to the uniform choice, Σ_j w_j log(K w_j) per step, the path KL of the reweighted
    candidates (at most log K per step).
    """

    def __init__(self, reward: Classifier, gamma: float, continuations: int, candidates: int, min_t: int):
        super().__init__(reward, gamma, continuations, min_t)
        self.k = candidates

    @torch.no_grad()
    def log_h(self, model: BaseModel, x: torch.Tensor, t_prev: int, c, y, cfg, seeds) -> torch.Tensor:
        """log ĥ(x) = log mean_m p̂(y | x0_m)^γ over the M continuations of each state in x."""
        rest, noise = self.continuations(model, x, t_prev, cfg, seeds)
        m = self.m
        lp = self.end_log_p(model, x.repeat(m, 1, 1, 1), rest, c.repeat(m), y.repeat(m), cfg, noise)
        return lp.view(m, len(x)).logsumexp(0) - torch.log(torch.tensor(float(m)))

    @torch.no_grad()
    def candidates_log_h(self, model: BaseModel, cand: torch.Tensor, t_prev: int, c, y, cfg, seeds):
        """log ĥ of each candidate, (K, n); candidate j of request i continues with noise of its own,
        seeded by (seed * 31 + j, t_prev)."""
        seeds_of = [[int(s) * 31 + j for s in seeds] for j in range(self.k)]
        return torch.stack(
            [self.log_h(model, cand[j], t_prev, c, y, cfg, seeds_of[j]) for j in range(self.k)]
        )

    def observe(self, x, t, t_prev, c, y, mean, sigma, noises, w) -> None:
        """Called at each controlled step with the candidates' noises (K, n, ...) and weights (K, n)."""

    def choose(self, w: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
        """The candidate each request keeps, drawn ∝ its weights w (K, n) with its generator; collects
        the selection's KL to the uniform choice in ``kl``."""
        self.kl.append((w * (self.k * w).clamp(min=1e-30).log()).sum(0))
        u = torch.stack([torch.rand((), generator=g) for g in gens]).to(w)
        return (w.cumsum(0) < u).sum(0).clamp(max=self.k - 1)

    @torch.no_grad()
    def __call__(self, model, x, t, t_prev, z, c, cfg, y, y_null=None, seeds=None):
        mean, sigma, off = self.base_kernel(model, x, t, t_prev, c, cfg)
        if off:
            return mean + sigma * z
        gens = [torch.Generator().manual_seed(int(s) * 1_000_003 + t) for s in seeds]
        extra = torch.stack([torch.randn((self.k - 1, *z.shape[1:]), generator=g) for g in gens], 1).to(z)
        noises = torch.cat([z[None], extra])  # (K, n, ...); candidate 0 the request's own noise
        cand = mean + sigma * noises
        w = self.candidates_log_h(model, cand, t_prev, c, y, cfg, seeds).softmax(0)
        self.observe(x, t, t_prev, c, y, mean, sigma, noises, w)
        return cand[self.choose(w, gens), torch.arange(len(x), device=x.device)]


class ValueShiftStep(ValueResampleStep):
    """A sampling step in CTRL's own policy class: the base's kernel with its mean shifted, same σ.

    The shift is the mean of the resampler's tilted kernel, Σ_j w_j σ z_j over K candidates drawn
    from the base's kernel (weights ∝ ĥ, as ValueResampleStep), projected onto the ``keep`` × ``keep``
    lowest DCT frequencies (keep = the image's size: no projection), then the step adds fresh noise
    σ z. So it asks whether a Gaussian mean shift, the only move a LoRA + y-embedding control makes,
    reaches what the choice among candidates reaches. The estimated shift carries the weights' noise,
    about 1 / ESS per coefficient kept, hence the projection. ``kl`` collects ‖shift‖² / 2σ² per step:
    the path KL of a Gaussian step with that mean, an upper bound on the mixture's over the candidates.

    ``pick=True`` is the control for that question: one candidate drawn by its weight (a choice, not a
    mean), kept in the same band, the fresh noise σ z above it; keep = the image's size is the
    resampler. ``kl`` then collects the selection's KL, Σ_j w_j log(K w_j), as ValueResampleStep's.
    """

    def __init__(
        self, reward, gamma: float, continuations: int, candidates: int, min_t: int, keep: int, pick=False
    ):
        super().__init__(reward, gamma, continuations, candidates, min_t)
        self.keep, self.pick = keep, pick

    @torch.no_grad()
    def __call__(self, model, x, t, t_prev, z, c, cfg, y, y_null=None, seeds=None):
        mean, sigma, off = self.base_kernel(model, x, t, t_prev, c, cfg)
        if off:
            return mean + sigma * z
        # candidates from noise of their own (not the request's z, which is the step's fresh noise)
        gens = [torch.Generator().manual_seed(int(s) * 1_000_003 + t) for s in seeds]
        noises = torch.stack([torch.randn((self.k, *z.shape[1:]), generator=g) for g in gens], 1).to(z)
        w = self.candidates_log_h(model, mean + sigma * noises, t_prev, c, y, cfg, seeds).softmax(0)
        if self.pick:
            gens = [torch.Generator().manual_seed(int(s) * 1_000_033 + t) for s in seeds]
            chosen = noises[self.choose(w, gens), torch.arange(len(x))]
            return mean + sigma * (lowpass(chosen, self.keep) + z - lowpass(z, self.keep))
        u = (w.view(*w.shape, *[1] * (z.dim() - 1)) * noises).sum(0)
        shift = sigma * lowpass(u, self.keep)
        self.kl.append(shift.pow(2).flatten(1).sum(1) / (2 * sigma**2))
        return mean + shift + sigma * z


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--data", type=Path, default=Path("data/labelled"))
    parser.add_argument("--continuations", type=int, default=8)
    parser.add_argument("--per-pair", type=int, default=2, help="images per (c, y)")
    parser.add_argument(
        "--min-t", type=int, default=100, help="steps out of t <= this keep the base's kernel"
    )
    parser.add_argument(
        "--max-t", type=int, default=None, help="steps out of t > this keep the base's kernel too"
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--candidates", type=int, default=0, help="> 0: resample K base candidates by ĥ instead"
    )
    parser.add_argument(
        "--shift",
        type=int,
        default=0,
        help="> 0 (with --candidates K): shift the mean by the candidates' tilted mean, low-passed to N x N",
    )
    parser.add_argument(
        "--pick", action="store_true", help="with --shift N: a weighted choice of one candidate, in that band"
    )
    args = parser.parse_args()
    params = load_params("params.yaml")
    meta = json.loads((args.data / "meta.json").read_text())
    base = load_base(args.models / "base")
    reward = load_reward(meta, args.models)
    digit = Classifier.load(args.models / "classifier" / "digit")
    for p in [*base.unet.parameters(), *reward.net.parameters()]:
        p.requires_grad_(False)
    ro = params.finetune.rollout
    cfg = SamplerConfig(ro.steps, ro.eta, ro.guidance_scale)
    num_y = num_joint_classes(meta)
    req = balanced_requests(len(base.classes), num_y, args.per_pair, 5_000_000)
    c, y, seeds = torch.tensor(req.c.to_numpy()), torch.tensor(req.y.to_numpy()), req.seed.tolist()
    if args.candidates > 0 and args.shift > 0:
        step = ValueShiftStep(
            reward, params.gamma, args.continuations, args.candidates, args.min_t, args.shift, args.pick
        )
    elif args.candidates > 0:
        step = ValueResampleStep(reward, params.gamma, args.continuations, args.candidates, args.min_t)
    else:
        step = ValueGradientStep(reward, params.gamma, args.continuations, args.min_t)
    step.max_t = args.max_t
    start, images, kls = time.perf_counter(), [], []
    shift = f"{args.shift}{' pick' if args.pick else ''}" if args.shift else "none"
    desc = f"MC value, M = {args.continuations}, K = {args.candidates}, shift {shift}"
    for i in tqdm(range(0, len(req), args.batch), desc=desc):
        sl = slice(i, i + args.batch)
        step.kl = []
        images.append(sample(base, c[sl], seeds[sl], cfg, y[sl], num_y, step))
        kls.append(torch.stack(step.kl, 1))
    images, kl, seconds = torch.cat(images), torch.cat(kls), time.perf_counter() - start
    with torch.no_grad():
        log_p = reward.log_prob(images, y).mean().item()
    pixels = to_uint8(images)
    metrics = control_metrics(pixels, y.numpy(), meta)
    metrics = metrics.get("joint") or next(iter(metrics.values()))
    _, pred = features_and_predictions(digit, pixels)
    c_acc = float((pred == c.numpy()).mean())
    total_kl = kl.sum(1).mean().item()
    print(
        f"M = {args.continuations}, K = {args.candidates}, {len(req)} images, control on t > {args.min_t}"
        f"{'' if args.max_t is None else f' and t <= {args.max_t}'}: "
        f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}, c_accuracy {c_acc:.3f}, "
        f"E log p̂ {log_p:.3f}, KL {total_kl:.2f} (per step {[round(v, 2) for v in kl.mean(0).tolist()]}), "
        f"objective {params.gamma * log_p - total_kl:.2f}, {seconds / len(req):.1f} s / image"
    )
    per_y = [(pred[y.numpy() == k] == c.numpy()[y.numpy() == k]).mean() for k in range(int(y.max()) + 1)]
    print("c_accuracy per requested y:", [round(float(v), 3) for v in per_y])
    got = oracle_classes(pixels, meta["tasks"]["compressibility"])[1]
    ys = y.numpy()
    print("accuracy per requested y:", [round(float((got[ys == k] == k).mean()), 3) for k in range(num_y)])


if __name__ == "__main__":
    main()
