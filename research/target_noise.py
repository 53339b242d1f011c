"""How noisy is the resampler's regression target, and does sharing the continuations' noise cut it?

Run after `python research/choice_distill.py --per-pair 6 --candidates 16 --continuations 1 --record-only`
(its recording, cached in /tmp/choice_distill, supplies the states):
    python research/target_noise.py --steps 700 400 200

`research/choice_distill.py` regresses CTRL's control onto u* = Σ_j w_j z_j: K candidate noises from the
base's kernel at a state, weighted by ĥ (one continuation of the base's sampler each, as `mc_value.py`).
E[u* | state] is the tilted kernel's mean shift in units of σ; the entry "2026-12-07 (fifth session)"
found it about 0.003 per coefficient under a noise of about 0.5. This script measures both directly, at
recorded resampler states, for three estimators of the same quantity:

- ``independent``: each candidate continues with noise of its own (mc_value's estimator);
- ``common``: every candidate of a state continues with the same noise (common random numbers), so
  the weights differ only through the candidates, not through the continuations' luck;
- ``antithetic``: ``common`` with candidates in pairs z, −z, so that a weight's dependence on z that is
  even in z (it moves the weights, not the mean) cancels.

With R independent replicates u_1 … u_R of an estimator at each state, the signal per coefficient is
mean_{r < r'} u_r · u_r' / d (unbiased for ‖E u*‖² / d), the noise E‖u‖² / d minus it. The cosine
between two estimators' means (from cross-replicate products) says whether sharing the noise changes
what is estimated: the ratio of expectations is not the expectation of ratios, so ``common`` is biased,
by an amount this measures rather than assumes.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from ctrldiff.base import load_base
from ctrldiff.sampling import SamplerConfig

sys.path.insert(0, str(Path(__file__).parent))
from choice_distill import load_inputs  # noqa: E402
from mc_value import ValueResampleStep  # noqa: E402

ESTIMATORS = ("independent", "common", "antithetic")


def candidate_noises(k: int, shape: tuple, seeds: list[int], antithetic: bool) -> torch.Tensor:
    """(K, n, *shape) candidate noises, request i's from its own seed; antithetic: z then −z."""
    half = k // 2 if antithetic else k
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    z = torch.stack([torch.randn((half, *shape), generator=g) for g in gens], 1)
    return torch.cat([z, -z]) if antithetic else z


def target(value: ValueResampleStep, model, row: dict, estimator: str, rep: int, cfg) -> tuple:
    """u* = Σ_j w_j z_j at each of the rows' states, and the weights' ESS, for one replicate."""
    k, n = value.k, len(row["x"])
    base_seeds = [int(s) * 1_009 + rep for s in row["seed"]]
    z = candidate_noises(k, tuple(row["x"].shape[1:]), base_seeds, estimator == "antithetic")
    sigma = row["sigma"].view(-1, *[1] * (row["x"].dim() - 1))
    cand = (row["mean"] + sigma * z).flatten(0, 1)  # candidate j of request i at row j * n + i
    if estimator == "independent":
        cont = [s * 31 + j for j in range(k) for s in base_seeds]
    else:
        cont = [s for _ in range(k) for s in base_seeds]
    log_h = value.log_h(model, cand, row["t_prev"], row["c"].repeat(k), row["y"].repeat(k), cfg, cont)
    w = log_h.view(k, n).softmax(0)
    u = (w.view(k, n, *[1] * (z.dim() - 2)) * z).sum(0)
    return u, 1.0 / w.pow(2).sum(0)


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Each state's a · b per coefficient: (n, *shape) × (n, *shape) -> (n,)."""
    return (a * b).flatten(1).mean(1)


def rows_at(data: dict, t: int, per_y: int) -> dict:
    """per_y recorded states at step t for each requested y, from distinct trajectories."""
    idx = []
    for y in data["y"].unique().tolist():
        hits = ((data["t"] == t) & (data["y"] == y)).nonzero().flatten()
        idx.append(hits[torch.randperm(len(hits), generator=torch.Generator().manual_seed(t))[:per_y]])
    idx = torch.cat(idx)
    (t_prev,) = data["t_prev"][idx].unique().tolist()
    return {
        "x": data["x"][idx],
        "mean": data["mean"][idx],
        "sigma": data["sigma"][idx],
        "c": data["c"][idx],
        "y": data["y"][idx],
        "t_prev": int(t_prev),
        "seed": (data["traj"][idx] * 100 + t).tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--data", type=Path, default=Path("data/labelled"))
    parser.add_argument(
        "--recording", type=Path, default=Path("/tmp/choice_distill/data_K16_M1_n6_l0_s7000000.pt")
    )
    parser.add_argument("--steps", type=int, nargs="+", default=[700, 400, 200])
    parser.add_argument("--per-y", type=int, default=10, help="states per requested y and step")
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--replicates", type=int, default=3)
    parser.add_argument("--estimators", nargs="+", choices=ESTIMATORS, default=list(ESTIMATORS))
    args = parser.parse_args()
    params, _, reward, _, _ = load_inputs(args.models, args.data)
    base = load_base(args.models / "base")
    for p in [*base.unet.parameters(), *reward.net.parameters()]:
        p.requires_grad_(False)
    ro = params.finetune.rollout
    cfg = SamplerConfig(ro.steps, ro.eta, ro.guidance_scale)
    value = ValueResampleStep(reward, params.gamma, 1, args.candidates, -1)
    data = torch.load(args.recording)
    for t in args.steps:
        row = rows_at(data, t, args.per_y)
        u, ess = {}, {}
        jobs = list(itertools.product(args.estimators, range(args.replicates)))
        for est, rep in tqdm(jobs, desc=f"targets at t = {t}"):
            u[est, rep], ess[est, rep] = target(value, base, row, est, rep, cfg)
        print(f"t = {t} ({len(row['x'])} states, K = {args.candidates}, {args.replicates} replicates):")
        signal = {}
        pairs = list(itertools.combinations(range(args.replicates), 2))
        for est in args.estimators:
            prods = torch.stack([dot(u[est, a], u[est, b]) for a, b in pairs])
            energy = torch.stack([dot(u[est, r], u[est, r]) for r in range(args.replicates)])
            signal[est] = prods.mean()
            noise = energy.mean() - signal[est]
            se = prods.mean(0).std() / len(row["x"]) ** 0.5
            mean_ess = torch.stack([ess[est, r] for r in range(args.replicates)]).mean()
            print(
                f"  {est:>11}: signal {float(signal[est]):+.4f} ± {float(se):.4f} per coefficient, "
                f"noise {float(noise):.4f}, ratio {float(signal[est] / noise):+.4f}, "
                f"ESS {float(mean_ess):.2f}"
            )
        for a, b in itertools.combinations(args.estimators, 2):
            cross = torch.stack(
                [
                    dot(u[a, r], u[b, s]).mean()
                    for r in range(args.replicates)
                    for s in range(args.replicates)
                    if r != s
                ]
            ).mean()
            both = signal[a] > 0 and signal[b] > 0
            cos = f"{float(cross / (signal[a] * signal[b]).sqrt()):+.2f}" if both else "undefined"
            print(f"  {a} · {b} across replicates: {float(cross):+.4f} per coefficient (cosine {cos})")


if __name__ == "__main__":
    main()
