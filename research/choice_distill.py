"""Distil the step-wise choice among the base's own candidates into CTRL's LoRA + y-embedding.

Run after `dvc repro base train_classifier@digit train_classifier@compressibility`:
    python research/choice_distill.py --per-pair 6 --candidates 16 --continuations 1 --batch 10 --keep last
    # the target low-passed to its 4 x 4 lowest DCT frequencies, at a tenth of the learning rates:
    python research/choice_distill.py --per-pair 6 --candidates 16 --continuations 1 --batch 10 --keep last \
        --lowpass 4 --lr-scale 0.1
    # twice the data (a second recording, cached in --out beside the first), the same number of updates:
    python research/choice_distill.py --per-pair 6 --candidates 16 --continuations 1 --batch 10 --keep last \
        --seed-starts 7000000 7001000 --epochs 4
    # no fit: where the target's energy lives, and whether the kept noise changes the kernel's variance
    python research/choice_distill.py --per-pair 6 --candidates 16 --continuations 1 --record-only

`research/mc_value.py` showed that a sampler which, at every stochastic step, draws K candidates
from the base's kernel and keeps one with probability ∝ ĥ (a Monte-Carlo estimate of the value
h(x') = E_base[p̂(y | x0)^γ | x'] from M continuations) keeps the digit (c_accuracy 0.93–0.98) and
approaches the optimum as K grows, where every gradient solver loses the digit (c_accuracy ≈ 0.81).
That sampler costs 10–25 s per image; this script asks whether its kernel survives distillation into
the Gaussian control a LoRA can hold, at a cost a CPU can pay once:

1. **Data.** Sample the resampler on requests from seeds 7,000,000+ (``--seed-starts``; disjoint
   from the evaluation's, the tuning's and the base rollouts'). At every controlled step record the
   state x_k, the base's guided mean μ_pre and σ_k, and the Rao–Blackwellised target
   u* = Σ_j w_j z_j: the candidates' noises weighted by their normalised ĥ. E[u* | x_k] is the tilted
   kernel's mean shift in units of σ_k (exact as K and M grow), and its noise is about 1/ESS per
   dimension instead of the one noise draw's 1.
2. **Fit.** Regress the controlled model's guided step mean onto it, as the adjoint solver regresses
   onto its lean adjoint: ‖(μ_θ(x_k) − μ_pre(x_k)) / σ_k − u*‖² / 2, averaged over dimensions, for
   ``--epochs`` passes over the recorded steps; 10 % of the trajectories are held out, and the held-out
   loss is printed against the zero control's (the fit's gain: negative when it fits noise), beside
   the gain on as many training rows. ``--keep best`` judges the best held-out epoch, ``--keep last``
   the last; ``--trainable embedding`` fits the y-embedding alone. ``--lowpass N`` regresses onto the
   target's projection onto its N × N lowest 2-D DCT frequencies instead: the noise of u* is spread
   evenly over every frequency (E[1/ESS] each), so if the signal lives in the low ones the projection
   keeps it and removes the rest of the noise; the printed spectrum measures where it lives.
3. **Judge.** Sample the `sample` stage's 320 evaluation requests with the distilled control (the
   last stochastic step the base's, as `finetune.base_last_steps: 1`), and print the oracle's accuracy,
   macro-F1, c_accuracy, E log p̂, the whole trajectory KL to the base (nats) and γ E log p̂ − KL: the
   figures `compare` reports for CTRL.

Classifier-free guidance as in the adjoint solver: μ_pre is the frozen base's guided mean (NULL y), μ_θ
the controlled model's guided mean (both branches through the LoRA, y against NULL y and NULL c).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ctrldiff.base import load_base
from ctrldiff.classifier import Classifier
from ctrldiff.control import ControlledModel, add_control, uncontrolled_from
from ctrldiff.ddim import ddim_step, timestep_pairs
from ctrldiff.evaluation import control_metrics, features_and_predictions
from ctrldiff.methods import balanced_requests
from ctrldiff.oracles import to_uint8
from ctrldiff.params import load_params
from ctrldiff.sampling import SamplerConfig, guided_eps, request_noise, sample
from ctrldiff.tasks import control_tasks, load_reward, num_joint_classes, oracle_classes

sys.path.insert(0, str(Path(__file__).parent))
from mc_value import ValueResampleStep, dct_basis, lowpass  # noqa: E402


class RecordingResampleStep(ValueResampleStep):
    """The resampler of `mc_value.py`, also recording each controlled step's regression target."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records: list[dict] = []

    @torch.no_grad()
    def candidates_log_h(self, model, cand, t_prev, c, y, cfg, seeds):
        """mc_value's continuations (candidate j of request i seeded by seed * 31 + j), in one batch."""
        k, n = cand.shape[:2]
        seeds_of = [int(s) * 31 + j for j in range(k) for s in seeds]
        flat = self.log_h(model, cand.flatten(0, 1), t_prev, c.repeat(k), y.repeat(k), cfg, seeds_of)
        return flat.view(k, n)

    def observe(self, x, t, t_prev, c, y, mean, sigma, noises, w) -> None:
        """Record the step's state and its Rao–Blackwellised target Σ_j w_j z_j."""
        target = (w.view(*w.shape, *[1] * (x.dim() - 1)) * noises).sum(0)
        self.records.append(
            {
                "x": x.cpu(),
                "t": t,
                "t_prev": t_prev,
                "c": c.cpu(),
                "y": y.cpu(),
                "mean": mean.cpu(),
                "sigma": float(sigma),
                "target": target.cpu(),
                "ess": (1.0 / w.pow(2).sum(0)).cpu(),
            }
        )


def record(base, reward, gamma, args, cfg, num_y, seed_start: int) -> dict:
    """Resampler trajectories on seeds seed_start+: per controlled step, stacked tensors."""
    step = RecordingResampleStep(reward, gamma, args.continuations, args.candidates, args.min_t)
    req = balanced_requests(len(base.classes), num_y, args.per_pair, seed_start)
    if args.limit:  # a smoke run: a random few of the requests
        req = req.sample(n=args.limit, random_state=0).reset_index(drop=True)
    c, y, seeds = torch.tensor(req.c.to_numpy()), torch.tensor(req.y.to_numpy()), req.seed.tolist()
    images, kls = [], []
    for i in tqdm(range(0, len(req), args.batch), desc="record the resampler"):
        sl = slice(i, i + args.batch)
        step.kl = []
        images.append(sample(base, c[sl], seeds[sl], cfg, y[sl], num_y, step))
        kls.append(torch.stack(step.kl, 1))
    images = torch.cat(images)
    traj = torch.arange(len(req))
    out = {key: [] for key in ["x", "t", "t_prev", "c", "y", "mean", "sigma", "target", "ess", "traj"]}
    per_batch = -(-len(req) // args.batch)
    steps_per_batch = len(step.records) // per_batch
    for b in range(per_batch):
        ids = traj[b * args.batch : (b + 1) * args.batch]
        for r in step.records[b * steps_per_batch : (b + 1) * steps_per_batch]:
            m = len(r["x"])
            for key in ["x", "c", "y", "mean", "target", "ess"]:
                out[key].append(r[key])
            out["t"].append(torch.full((m,), r["t"]))
            out["t_prev"].append(torch.full((m,), r["t_prev"]))
            out["sigma"].append(torch.full((m,), r["sigma"]))
            out["traj"].append(ids)
    data = {key: torch.cat(v) for key, v in out.items()}
    with torch.no_grad():
        data["sampler_log_p"] = reward.log_prob(images, y).mean()
    data["sampler_kl"] = torch.cat(kls).sum(1).mean()
    data["sampler_images"], data["sampler_c"], data["sampler_y"] = images, c, y
    return data


def merge(parts: list[dict]) -> dict:
    """One data set from several recordings: trajectories renumbered, the sampler's KL averaged."""
    offset, out = 0, []
    for d in parts:
        out.append(d | {"traj": d["traj"] + offset})
        offset += int(d["traj"].max()) + 1
    n = [len(d["sampler_images"]) for d in parts]
    merged = {
        k: torch.cat([d[k] for d in out]) for k in out[0] if torch.is_tensor(out[0][k]) and out[0][k].dim()
    }
    merged["sampler_kl"] = sum(float(d["sampler_kl"]) * m for d, m in zip(parts, n, strict=True)) / sum(n)
    merged["seconds"] = sum(float(d["seconds"]) for d in parts)
    return merged


def band_energy(x: torch.Tensor, edges: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Tensor], str]:
    """x's energy per 2-D DCT coefficient (rows, n, n; mean over channels), the masks of the bands
    max(i, j) ∈ [edges[b], edges[b + 1]) (the last band up to n), and a header naming them."""
    n = x.shape[-1]
    d = dct_basis(n)
    ij = torch.arange(n)
    band_of = torch.maximum(ij[:, None], ij[None])
    bounds = [*edges, n]
    pairs = list(zip(bounds, bounds[1:], strict=False))
    bands = [(band_of >= a) & (band_of < b) for a, b in pairs]
    return (d @ x @ d.T).pow(2).mean(1), bands, " | ".join(f"[{a},{b})" for a, b in pairs)


def spectrum(data: dict, edges: tuple[int, ...] = (0, 2, 4, 8, 14)) -> None:
    """Where the target's signal lives: its mean energy per DCT coefficient, by band and by step.

    If the weights did not depend on the candidates' noise, every coefficient of u* would have the
    energy E[Σ_j w_j²] = E[1/ESS]; the excess over that floor is the signal's energy (and the
    estimator's covariance with the weights). Bands are max(i, j) ∈ [edges[b], edges[b + 1]) of the
    2-D DCT coefficient (i, j), the last band up to n.
    """
    target = data["target"]
    energy, bands, header = band_energy(target, edges)
    print(f"target energy per coefficient / E[1/ESS], by band max(i, j) ∈ {header}; ± 2 s.e. of the first")
    for t in [*data["t"].unique().flip(0).tolist(), None]:
        rows = data["t"] == t if t is not None else torch.ones(len(target), dtype=torch.bool)
        floor = (1 / data["ess"][rows]).mean()
        per_row = [energy[rows][:, band].mean(1) / floor for band in bands]
        se = 2 * per_row[0].std() / math.sqrt(len(per_row[0]))
        label = f"t = {t}" if t is not None else "all steps"
        cells = " | ".join(f"{float(r.mean()):.3f}" for r in per_row)
        print(f"  {label:>10}: {cells}  (± {float(se):.3f}; {int(rows.sum())} rows)")


def chosen_noise(data: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise each recorded step kept, z = (x_next - μ_pre) / σ, from the trajectory's next state,
    and the rows it belongs to (a step whose next state was not recorded, the last controlled one, has
    none)."""
    row_of = {(int(r), int(t)): i for i, (r, t) in enumerate(zip(data["traj"], data["t"], strict=True))}
    pairs = [
        (i, row_of[(int(r), int(tp))])
        for i, (r, tp) in enumerate(zip(data["traj"], data["t_prev"], strict=True))
        if (int(r), int(tp)) in row_of
    ]
    rows, nxt = (torch.tensor(v) for v in zip(*pairs, strict=True))
    sigma = data["sigma"][rows].view(-1, *[1] * (data["x"].dim() - 1))
    return (data["x"][nxt] - data["mean"][rows]) / sigma, rows


def chosen_spectrum(data: dict, edges: tuple[int, ...] = (0, 2, 4, 8, 14, 20)) -> None:
    """Is the choice a mean shift or a change of the kernel's variance? Per requested y and DCT band.

    The kept noise's energy per coefficient minus 1 is, in expectation, the tilted kernel's variance
    change plus its mean's energy (0 for the base's kernel, exactly). The target's excess over E[1/ESS]
    estimates the mean's energy alone. If the first exceeds the second, or goes below 0, the choice
    changes the variance, which no mean shift (a LoRA's control) can do. s.e. from the rows' spread.
    """
    z, rows = chosen_noise(data)
    kept, bands, header = band_energy(z, edges)
    mean2 = band_energy(data["target"][rows], edges)[0] - (1 / data["ess"][rows]).view(-1, 1, 1)
    print(f"kept noise's energy per coefficient - 1 (the mean's energy), by band max(i, j) ∈ {header}")
    y = data["y"][rows]
    for k in [*y.unique().tolist(), None]:
        sel = y == k if k is not None else torch.ones(len(y), dtype=torch.bool)
        cells = []
        for band in bands:
            e, m2 = kept[sel][:, band].mean(1) - 1, mean2[sel][:, band].mean(1)
            cells.append(
                f"{float(e.mean()):+.3f} ± {float(e.std() / math.sqrt(len(e))):.3f} ({float(m2.mean()):+.3f})"
            )
        label = f"y = {k}" if k is not None else "all y"
        print(f"  {label:>6}: " + " | ".join(cells) + f"  ({int(sel.sum())} steps)")


def load_inputs(models: Path, data: Path) -> tuple:
    """(params, label meta, reward, digit classifier, number of y classes) for a research run."""
    params = load_params("params.yaml")
    meta = json.loads((data / "meta.json").read_text())
    return (
        params,
        meta,
        load_reward(meta, models),
        Classifier.load(models / "classifier" / "digit"),
        num_joint_classes(meta),
    )


def new_control(models: Path, num_y: int, ft) -> ControlledModel:
    """A fresh base with finetune's LoRA + y-embedding attached (``ft``: the finetune params)."""
    base = load_base(models / "base")
    ro = ft.rollout
    off = uncontrolled_from(base.scheduler, ro.steps, ro.eta, ft.base_last_steps)
    return add_control(base, list(range(num_y)), ft.lora_rank, ft.lora_targets, off)


def step_mean(model: ControlledModel, x, t: int, t_prev: int, c, y, cfg: SamplerConfig, reference: bool):
    base = model.base
    if reference:
        with model.reference():
            eps = guided_eps(
                base, x, t, c, cfg.guidance_scale, torch.full_like(y, model.y_null), model.y_null
            )
    else:
        eps = guided_eps(base, x, t, c, cfg.guidance_scale, y, model.y_null)
    return ddim_step(base.scheduler, x, eps, t, t_prev, cfg.eta)[0]


def regression_loss(model, data, idx, cfg) -> torch.Tensor:
    """Mean over the rows idx (all of one timestep) of ‖(μ_θ − μ_pre)/σ − u*‖² / 2 per dimension."""
    t, t_prev = int(data["t"][idx[0]]), int(data["t_prev"][idx[0]])
    mean = step_mean(model, data["x"][idx], t, t_prev, data["c"][idx], data["y"][idx], cfg, reference=False)
    residual = (mean - data["mean"][idx]) / data["sigma"][idx].view(-1, 1, 1, 1) - data["target"][idx]
    return residual.pow(2).flatten(1).mean(1).div(2).mean()


def batches(data, rows: torch.Tensor, size: int, g: torch.Generator | None) -> list[torch.Tensor]:
    """Minibatches of rows that share a timestep (one UNet call each), shuffled when g is given."""
    out = []
    for t in data["t"][rows].unique():
        r = rows[data["t"][rows] == t]
        if g is not None:
            r = r[torch.randperm(len(r), generator=g)]
        out += list(r.split(size))
    if g is not None:
        out = [out[i] for i in torch.randperm(len(out), generator=g)]
    return out


@torch.no_grad()
def mean_loss(model, data, rows: torch.Tensor, cfg) -> float:
    parts = [
        (regression_loss(model, data, idx, cfg).item(), len(idx)) for idx in batches(data, rows, 64, None)
    ]
    return sum(v * n for v, n in parts) / sum(n for _, n in parts)


def fit(model: ControlledModel, data: dict, args, cfg, params) -> list[dict]:
    n_traj = int(data["traj"].max()) + 1
    g = torch.Generator().manual_seed(0)
    held = torch.randperm(n_traj, generator=g)[: max(1, n_traj // 10)]
    is_held = torch.isin(data["traj"], held)
    train_rows, held_rows = torch.nonzero(~is_held).flatten(), torch.nonzero(is_held).flatten()
    # as many training rows as held-out ones, to show whether a fit that does not generalise fits noise
    train_probe = train_rows[torch.randperm(len(train_rows), generator=g)[: len(held_rows)]]
    ft = params.finetune
    lora, emb = model.trainable_parameters()
    if args.trainable == "embedding":  # the y-embedding alone: far fewer parameters to fit the noise with
        for p in lora:
            p.requires_grad_(False)
        groups = [{"params": emb, "lr": ft.lr_embedding * args.lr_scale}]
    else:
        groups = [
            {"params": lora, "lr": ft.lr_lora * args.lr_scale},
            {"params": emb, "lr": ft.lr_embedding * args.lr_scale},
        ]
    trained = [p for group in groups for p in group["params"]]
    print(f"fitting {sum(p.numel() for p in trained):,} parameters to {len(train_rows)} recorded steps")
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    base_lrs = [group["lr"] for group in opt.param_groups]
    history, update = [], 0
    best, best_state = math.inf, None
    for epoch in range(args.epochs + 1):
        if epoch:  # epoch 0 only measures the zero control
            for idx in tqdm(batches(data, train_rows, args.fit_batch, g), desc=f"fit epoch {epoch}"):
                scale = min(1.0, (update + 1) / ft.warmup_updates)
                for group, lr in zip(opt.param_groups, base_lrs, strict=True):
                    group["lr"] = lr * scale
                loss = regression_loss(model, data, idx, cfg)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trained, ft.clip_grad_norm)
                opt.step()
                update += 1
        held_loss, train_loss = (
            mean_loss(model, data, held_rows, cfg),
            mean_loss(model, data, train_probe, cfg),
        )
        if epoch == 0:
            held_zero, train_zero = held_loss, train_loss
        gain, train_gain = held_zero - held_loss, train_zero - train_loss
        history.append(
            {
                "epoch": epoch,
                "updates": update,
                "held_out_loss": held_loss,
                "gain": gain,
                "train_gain": train_gain,
            }
        )
        print(
            f"epoch {epoch}: held-out loss {held_loss:.5f} (zero control {held_zero:.5f}, gain {gain:+.5f}); "
            f"gain on as many training rows {train_gain:+.5f}"
        )
        if args.keep == "last" or held_loss < best:
            best = held_loss
            best_state = {
                k: v.detach().clone() for k, v in model.base.unet.named_parameters() if v.requires_grad
            }
    if best_state is not None:  # keep the epoch with the best held-out loss (or the last, --keep last)
        with torch.no_grad():
            for k, v in model.base.unet.named_parameters():
                if k in best_state:
                    v.copy_(best_state[k])
    return history


@torch.no_grad()
def judge(model: ControlledModel, reward, digit, meta, params, cfg, num_y, per_pair: int = 0) -> dict:
    """The sample stage's requests sampled with the control; the oracle's figures and the path KL."""
    sp = params.sample
    req = balanced_requests(len(model.base.classes), num_y, per_pair or sp.n_per_request, sp.seed)
    c, y, seeds = torch.tensor(req.c.to_numpy()), torch.tensor(req.y.to_numpy()), req.seed.tolist()
    base = model.base
    pairs = timestep_pairs(base.scheduler, cfg.steps)
    images, kls = [], []
    for i in tqdm(range(0, len(req), 40), desc="judge"):
        sl = slice(i, i + 40)
        noise = request_noise(seeds[sl], base.sample_shape, cfg.steps)
        x, kl = noise[:, 0], torch.zeros(len(noise))
        for k, (t, t_prev) in enumerate(pairs):
            ref = step_mean(model, x, t, t_prev, c[sl], y[sl], cfg, reference=True)
            sigma = ddim_step(base.scheduler, x, torch.zeros_like(x), t, t_prev, cfg.eta)[1]
            if model.is_off(base.scheduler, t, t_prev, cfg.eta):
                mean = ref
            else:
                mean = step_mean(model, x, t, t_prev, c[sl], y[sl], cfg, reference=False)
                kl += (mean - ref).pow(2).flatten(1).sum(1) / (2 * sigma**2)
            x = mean + sigma * noise[:, k + 1]
        images.append(base.decode(x).clamp(-1, 1))
        kls.append(kl)
    images, kl = torch.cat(images), torch.cat(kls)
    return figures(images, c, y, kl, reward, digit, meta, params.gamma)


def figures(images, c, y, kl, reward, digit, meta, gamma) -> dict:
    """The oracle's figures and CTRL's terms, overall and per requested y (``*_per_y``)."""
    with torch.no_grad():
        log_p_each = reward.log_prob(images, y)
    log_p = log_p_each.mean().item()
    pixels = to_uint8(images)
    m = control_metrics(pixels, y.numpy(), meta)
    m = m.get("joint") or next(iter(m.values()))
    _, pred = features_and_predictions(digit, pixels)
    ys = [y == k for k in range(int(y.max()) + 1)]
    total_kl = float(kl.mean())
    out = {
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
        "c_accuracy": float((pred == c.numpy()).mean()),
        "c_accuracy_per_y": [float((pred[r.numpy()] == c.numpy()[r.numpy()]).mean()) for r in ys],
        "log_p": log_p,
        "kl": total_kl,
        "objective": gamma * log_p - total_kl,
        "log_p_per_y": [float(log_p_each[r].mean()) for r in ys],
        "kl_per_y": [float(kl[r].mean()) for r in ys],
        "images": len(images),
    }
    if control_tasks(meta) == ["compressibility"]:  # the single-task setting: y is the oracle's class
        got = oracle_classes(pixels, meta["tasks"]["compressibility"])[1]
        out["accuracy_per_y"] = [float((got[r.numpy()] == k).mean()) for k, r in enumerate(ys)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--data", type=Path, default=Path("data/labelled"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/choice_distill"))
    parser.add_argument("--per-pair", type=int, default=6, help="resampler trajectories per (c, y)")
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--continuations", type=int, default=1)
    parser.add_argument(
        "--min-t", type=int, default=100, help="steps out of t <= this keep the base's kernel"
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--fit-batch", type=int, default=16)
    parser.add_argument("--trainable", choices=["all", "embedding"], default="all")
    parser.add_argument("--keep", choices=["best", "last"], default="best", help="which epoch is judged")
    parser.add_argument(
        "--seed-starts",
        type=int,
        nargs="+",
        default=[7_000_000],
        help="one recording of --per-pair trajectories per (c, y) from each seed start, fitted together",
    )
    parser.add_argument(
        "--lowpass",
        type=int,
        default=0,
        help="> 0: regress onto the target's projection onto its N × N lowest 2-D DCT frequencies",
    )
    parser.add_argument("--lr-scale", type=float, default=1.0, help="times finetune's learning rates")
    parser.add_argument("--record-only", action="store_true", help="record (and cache) the data, no fit")
    parser.add_argument("--limit", type=int, default=0, help="> 0: record only this many requests (smoke)")
    parser.add_argument("--judge-per-pair", type=int, default=0, help="> 0: judge on fewer requests (smoke)")
    args = parser.parse_args()
    params, meta, reward, digit, num_y = load_inputs(args.models, args.data)
    ro = params.finetune.rollout
    cfg = SamplerConfig(ro.steps, ro.eta, ro.guidance_scale)
    args.out.mkdir(parents=True, exist_ok=True)
    base = load_base(args.models / "base")
    for p in [*base.unet.parameters(), *reward.net.parameters()]:
        p.requires_grad_(False)
    parts = []
    for seed_start in args.seed_starts:
        name = (
            f"data_K{args.candidates}_M{args.continuations}_n{args.per_pair}_l{args.limit}_s{seed_start}.pt"
        )
        if (args.out / name).is_file():
            parts.append(torch.load(args.out / name))
            continue
        start = time.perf_counter()
        parts.append(record(base, reward, params.gamma, args, cfg, num_y, seed_start))
        parts[-1]["seconds"] = time.perf_counter() - start
        torch.save(parts[-1], args.out / name)
    data = merge(parts)
    if args.record_only:
        spectrum(data)
        chosen_spectrum(data)
        return
    n_img = len(data["sampler_images"])
    sampler = figures(
        data["sampler_images"],
        data["sampler_c"],
        data["sampler_y"],
        torch.full((n_img,), float(data["sampler_kl"])),
        reward,
        digit,
        meta,
        params.gamma,
    )
    print(
        f"resampler, K = {args.candidates}, M = {args.continuations}, {n_img} trajectories "
        f"({float(data['seconds']) / n_img:.1f} s each): {sampler} (KL: the selection's, an upper bound)"
    )
    ess = data["ess"]
    print(
        f"{len(ess)} recorded steps; ESS among the candidates: mean {ess.mean():.2f}, "
        f"median {ess.median():.2f}; target per-dimension mean square {data['target'].pow(2).mean():.4f}"
    )

    spectrum(data)
    if args.lowpass:
        data["target"] = lowpass(data["target"], args.lowpass)
        print(
            f"target projected onto its {args.lowpass} × {args.lowpass} lowest DCT frequencies: "
            f"per-dimension mean square {data['target'].pow(2).mean():.4f}"
        )

    model = new_control(args.models, num_y, params.finetune)  # a fresh copy of the base
    start = time.perf_counter()
    history = fit(model, data, args, cfg, params)
    fit_minutes = (time.perf_counter() - start) / 60
    run = (
        f"{args.trainable}_{args.keep}_lp{args.lowpass}_lr{args.lr_scale:g}"
        f"_e{args.epochs}_s{len(args.seed_starts)}"
    )
    model.save(args.out / f"ctrl_{run}")
    result = judge(model, reward, digit, meta, params, cfg, num_y, args.judge_per_pair)
    result.update(
        {
            "fit_minutes": fit_minutes,
            "history": history,
            "sampler": sampler,
            "args": vars(args) | {"out": str(args.out), "models": str(args.models), "data": str(args.data)},
        }
    )
    (args.out / f"result_{run}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        "distilled control on the evaluation requests:",
        {k: v for k, v in result.items() if k not in ("history", "args")},
    )


if __name__ == "__main__":
    main()
