"""CTRL's RL step by the score-function (policy-gradient) estimator: does a solver that never takes the
reward's gradient keep the digit where back-propagation erases it?

Run after `dvc repro base_rollouts` (it needs the base and the reward):
    python research/policy_gradient.py [--updates 60] [--requests 8] [--group 4] [--out /tmp/pg]

Back-propagation and adjoint matching both follow the reward's pathwise gradient, which at the late steps
points at texture (research/gradient_coherence.py) and costs the digit (c_accuracy 0.82 against the
optimum's 0.97). This estimator uses the reward's value only. Each update draws ``requests`` (c, y),
rolls each out ``group`` times from the current model, and minimises the surrogate

    sum_k mean_n [ -A_nk log pi_theta(x_{k+1} | x_k) + KL_k(mu_theta(x_k), mu_pre(x_k)) ],

the exact gradient of -(gamma E log p̂(y | x0) - E sum_k KL_k) for the Gaussian DDIM chain: x_k and x_{k+1}
are the rollout's (detached), log pi_theta = -||x_{k+1} - mu_theta(x_k)||^2 / 2 sigma_k^2, and A_nk the
reward-to-go gamma log p̂ - sum_{j>k} KL_j minus its leave-one-out mean over the request's group. Steps
the model leaves to the base (``finetune.base_last_steps``) carry no control and no term. Then it samples
the `sample` stage's 320 requests (its seeds) and prints what `compare` prints for CTRL.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ctrldiff.base import load_base
from ctrldiff.classifier import Classifier
from ctrldiff.control import ControlledModel, ControlledStep, add_control, uncontrolled_from
from ctrldiff.ctrl import RolloutConfig, gaussian_kl
from ctrldiff.ddim import ddim_step, timestep_pairs
from ctrldiff.evaluation import control_metrics, features_and_predictions
from ctrldiff.finetune import draw_batch
from ctrldiff.methods import balanced_requests
from ctrldiff.objective import trajectory_kl
from ctrldiff.oracles import to_uint8
from ctrldiff.params import load_params
from ctrldiff.sampling import SamplerConfig, guided_eps, request_noise, sample
from ctrldiff.tasks import load_reward, num_joint_classes


def policy_gradient_loss(
    model: ControlledModel, reward, gamma: float, c, y, seeds: list[int], cfg: RolloutConfig, group: int
) -> tuple[torch.Tensor, dict]:
    """The surrogate above on one batch of ``len(c)`` trajectories (consecutive blocks of ``group``
    share a request); returns (loss, batch statistics)."""
    base = model.base
    pairs = timestep_pairs(base.scheduler, cfg.steps)
    noise = request_noise(seeds, base.sample_shape, cfg.steps)
    y_null = torch.full_like(y, model.y_null)
    x = noise[:, 0]
    means, actions, sigmas, kls = [], [], [], []
    for k, (t, t_prev) in enumerate(pairs):
        if model.is_off(base.scheduler, t, t_prev, cfg.eta):
            with torch.no_grad(), model.reference():
                eps = guided_eps(base, x, t, c, cfg.guidance_scale, y_null, model.y_null)
            mean, sigma, _ = ddim_step(base.scheduler, x, eps, t, t_prev, cfg.eta)
            x = mean + sigma * noise[:, k + 1]
            continue
        eps = guided_eps(base, x, t, c, cfg.guidance_scale, y, model.y_null)  # with grad; x is detached
        mean, sigma, _ = ddim_step(base.scheduler, x, eps, t, t_prev, cfg.eta)
        with torch.no_grad(), model.reference():
            eps_ref = guided_eps(base, x, t, c, cfg.guidance_scale, y_null, model.y_null)
        mean_ref, _, _ = ddim_step(base.scheduler, x, eps_ref, t, t_prev, cfg.eta)
        x = (mean.detach() + sigma * noise[:, k + 1]).detach()
        means.append(mean)
        actions.append(x)
        sigmas.append(sigma)
        kls.append(gaussian_kl(mean, mean_ref, sigma, "sum"))
    with torch.no_grad():
        x0 = base.decode(x).clamp(-1, 1)
        log_p = reward.log_prob(x0, y)
        correct = (reward(x0).argmax(-1) == y).float()
    kl = torch.stack([k.detach() for k in kls], 1)  # (N, controlled steps)
    # reward-to-go of step k's action: the reward and the KL of the steps after it
    later_kl = kl.flip(1).cumsum(1).flip(1) - kl
    returns = gamma * log_p[:, None] - later_kl
    blocks = returns.view(-1, group, returns.shape[1])
    loo = (blocks.sum(1, keepdim=True) - blocks) / (group - 1)
    advantage = (blocks - loo).view_as(returns)
    loss = x.new_zeros(())
    for k, (mean, action, sigma) in enumerate(zip(means, actions, sigmas, strict=True)):
        log_pi = -(action - mean).pow(2).flatten(1).sum(1) / (2 * sigma**2)
        loss = loss + (-advantage[:, k] * log_pi + kls[k]).mean()
    stats = {
        "reward": log_p.mean().item(),
        "kl": kl.sum(1).mean().item(),
        "objective": (gamma * log_p - kl.sum(1)).mean().item(),
        "accuracy_reward_clf": correct.mean().item(),
    }
    return loss, stats


def evaluate(model: ControlledModel, reward, digit: Classifier, params, meta: dict, gamma: float) -> dict:
    """The `sample` stage's requests and seeds, CTRL's own sampler; the oracle and digit classifier judge."""
    s, ro = params.sample, params.finetune.rollout
    req = balanced_requests(len(model.base.classes), num_joint_classes(meta), s.n_per_request, s.seed)
    c, y = torch.tensor(req.c.to_numpy()), torch.tensor(req.y.to_numpy())
    seeds = req.seed.tolist()
    cfg = SamplerConfig(ro.steps, ro.eta, ro.guidance_scale)
    with torch.no_grad():
        images = torch.cat(
            [
                sample(
                    model.base,
                    c[i : i + s.batch_size],
                    seeds[i : i + s.batch_size],
                    cfg,
                    y[i : i + s.batch_size],
                    model.y_null,
                    ControlledStep(model),
                )
                for i in range(0, len(req), s.batch_size)
            ]
        )
        log_p = reward.log_prob(images, y).mean().item()
    kl = trajectory_kl(model, c, y, seeds, RolloutConfig(ro.steps, ro.eta, ro.guidance_scale, grad_steps=1))
    pixels = to_uint8(images)
    by_task = control_metrics(pixels, y.numpy(), meta)
    metrics = by_task.get("joint") or next(iter(by_task.values()))
    _, pred = features_and_predictions(digit, pixels)
    return {
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "c_accuracy": float((pred == c.numpy()).mean()),
        "reward_log_p": log_p,
        "kl": kl.mean().item(),
        "objective": gamma * log_p - kl.mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--updates", type=int, default=60)
    parser.add_argument("--requests", type=int, default=8, help="distinct (c, y) per update")
    parser.add_argument("--group", type=int, default=4, help="rollouts per request (leave-one-out baseline)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/pg"))
    args = parser.parse_args()
    params = load_params("params.yaml")
    meta = json.loads(Path("data/labelled/meta.json").read_text())
    reward = load_reward(meta)
    reward.requires_grad_(False)
    digit = Classifier.load(Path("models/classifier/digit"))
    base = load_base("models/base")
    torch.manual_seed(params.seed)
    ft, ro = params.finetune, params.finetune.rollout
    off = uncontrolled_from(base.scheduler, ro.steps, ro.eta, ft.base_last_steps)
    model = add_control(base, list(range(num_joint_classes(meta))), ft.lora_rank, ft.lora_targets, off)
    lora, emb = model.trainable_parameters()
    opt = torch.optim.AdamW([{"params": lora, "lr": ft.lr_lora}, {"params": emb, "lr": ft.lr_embedding}])
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: min(1.0, (u + 1) / ft.warmup_updates))
    cfg = RolloutConfig(ro.steps, ro.eta, ro.guidance_scale)
    log = []
    start = time.perf_counter()
    for update in (bar := tqdm(range(args.updates), desc="policy gradient", unit="update")):
        c, y, seeds = draw_batch(
            update, 0, params.seed, args.requests, len(base.classes), len(model.y_classes)
        )
        c, y = c.repeat_interleave(args.group), y.repeat_interleave(args.group)
        seeds = [s + j for s in seeds for j in range(args.group)]
        loss, stats = policy_gradient_loss(model, reward, params.gamma, c, y, seeds, cfg, args.group)
        loss.backward()
        stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(lora + emb, ft.clip_grad_norm))
        opt.step()
        opt.zero_grad(set_to_none=True)
        warmup.step()
        log.append({"update": update + 1} | stats)
        bar.set_postfix({k: f"{stats[k]:.2f}" for k in ("reward", "kl", "objective")}, refresh=False)
    minutes = (time.perf_counter() - start) / 60
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "history.json").write_text(json.dumps(log))
    for block in range(0, len(log), 10):
        part = log[block : block + 10]
        print(
            f"updates {block + 1}-{block + len(part)}: "
            + ", ".join(
                f"{k} {np.mean([r[k] for r in part]):.2f}" for k in ("reward", "kl", "objective", "grad_norm")
            )
        )
    result = evaluate(model, reward, digit, params, meta, params.gamma)
    result |= {
        "updates": args.updates,
        "trajectories": args.updates * args.requests * args.group,
        "train_minutes": round(minutes, 1),
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
