"""Back-propagation with a control of another design: restricted to the lowest frequencies, or with feedback.

Run after `dvc repro base train_classifier@digit train_classifier@compressibility`:
    python research/lowpass_control.py --keep 4    # the control's shift in the 4 x 4 lowest DCT frequencies
    python research/lowpass_control.py --keep 28   # the whole image: plain back-propagation, for comparison
    python research/lowpass_control.py --feedback  # the y-embedding also reads the reward at x0-hat

Every gradient solver measured on the embedded benchmark (backprop, adjoint, policy gradient) loses the
digit (c_accuracy ≈ 0.81) and spends 7–20 times the optimum's KL, and `research/choice_distill.py`
found that the step-wise choice which does approach the optimum moves each step's mean only in the
4 lowest 2-D DCT frequencies of the 28 × 28 image: the optimum chooses *which* digit the base draws
(its size, slant, weight), never its texture. This changes the model instead of the estimator: the
controlled step's mean is the base's plus the controlled model's shift projected onto the N × N lowest
DCT frequencies,

    μ_ctrl(x_k) = μ_pre(x_k) + P_N (μ_θ(x_k) − μ_pre(x_k)),

with the same σ_k. The path KL is then ‖P_N Δ‖² / 2σ_k² (the projected shift is the whole shift), and
no control of this family can edit texture, at any price. P_N is linear and the DDIM mean is affine in
the noise prediction, so the projection acts on the guided ε's difference. Everything else is
`finetune`'s default (backprop through all 10 steps, γ = 10, DCT reward, 100 updates of 16, LoRA rank 4
+ y-embedding, `base_last_steps: 1`): the function is the package's own `finetune`, with the guided
noise prediction it calls replaced by the band-limited one. Judged as `research/choice_distill.py`
judges: the `sample` stage's 320 requests, oracle accuracy, macro-F1, c_accuracy, E log p̂, path KL and
γ E log p̂ − KL. Costs 1.5 times finetune (the reference is evaluated once more per step).

``--feedback`` changes the model another way. Per requested y, back-propagation reaches the extreme
classes (whose reward is monotone in the digit's ink: an open-loop push works) and misses the middle
ones, where the push must depend on the state: more ink for a draw that reads light, less for one that
reads heavy. The y-embedding is one constant per y, so all of that has to come from the LoRA through
noisy gradients. With ``--feedback`` the embedding also gets a learned (zero-initialised) linear map of
the reward classifier's probabilities at the frozen base's guided x̂0 of the current step, so "add ink
where it reads as the most compressible class" is linear in the control's input. The reward is the
method's own (the user's classifier), not the oracle.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import ctrldiff.ctrl
import ctrldiff.finetune
import ctrldiff.sampling
from ctrldiff.control import ControlledModel, YEmbedding
from ctrldiff.data import table_images
from ctrldiff.ddim import alpha_bar
from ctrldiff.evaluation import features_and_predictions
from ctrldiff.finetune import finetune
from ctrldiff.oracles import to_model_space
from ctrldiff.sampling import SamplerConfig
from ctrldiff.tasks import num_joint_classes, oracle_classes
from ctrldiff.tilt import pair_terms, reward_log_probs, tilted_weights

sys.path.insert(0, str(Path(__file__).parent))
import choice_distill  # noqa: E402
from choice_distill import judge, load_inputs, lowpass, new_control  # noqa: E402


def band_limited(guided_eps, model: ControlledModel, keep: int):
    """``guided_eps`` whose controlled predictions differ from the frozen base's only in the keep × keep
    lowest DCT frequencies. Calls with y all NULL are the reference's (inside ``model.reference()``)."""

    def eps(base, x, t, c, scale, y=None, y_null=None):
        out = guided_eps(base, x, t, c, scale, y, y_null)
        if y is None or y.is_floating_point() or bool((y == model.y_null).all()) or keep >= x.shape[-1]:
            return out
        with model.reference():
            ref = guided_eps(base, x, t, c, scale, torch.full_like(y, model.y_null), y_null)
        return ref + lowpass(out - ref, keep)

    return eps


class FeedbackEmbedding(YEmbedding):
    """The y-embedding plus a learned linear map of ``context``: per row, the reward classifier's
    probabilities at the frozen base's x̂0 of the current step (zero for the NULL-y branch).
    Zero-initialised, so the control starts at the base."""

    def __init__(self, num_classes: int, dim: int, num_features: int):
        super().__init__(num_classes, dim)
        self.feedback = torch.nn.Linear(num_features, dim)
        torch.nn.init.zeros_(self.feedback.weight)
        torch.nn.init.zeros_(self.feedback.bias)
        self.context: torch.Tensor | None = None

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        out = super().forward(labels)
        if self.context is None:
            return out
        ctx = self.context
        if len(ctx) < len(out):  # classifier-free guidance: the rows after the first B are the NULL branch
            ctx = torch.cat([ctx, torch.zeros(len(out) - len(ctx), ctx.shape[1]).to(ctx)])
        return out + self.feedback(ctx) * (labels != self.null_index)[:, None]


def with_feedback(guided_eps, model: ControlledModel, reward):
    """``guided_eps`` whose controlled calls first read the state: the frozen base's guided x̂0 at this
    step, classified by the reward (detached), is the FeedbackEmbedding's context for the call."""
    emb = model.y_embedding

    def eps(base, x, t, c, scale, y=None, y_null=None):
        if y is None or y.is_floating_point() or bool((y == model.y_null).all()):
            return guided_eps(base, x, t, c, scale, y, y_null)
        with torch.no_grad(), model.reference():
            ref = guided_eps(base, x, t, c, scale, torch.full_like(y, model.y_null), y_null)
            a_t = alpha_bar(base.scheduler, t).to(x)
            x0 = base.decode((x - (1 - a_t).sqrt() * ref) / a_t.sqrt()).clamp(-1, 1)
            emb.context = reward(x0).softmax(-1)
        try:
            return guided_eps(base, x, t, c, scale, y, y_null)
        finally:
            emb.context = None

    return eps


def optimum_per_y(rollouts: Path, reward, digit, meta: dict, gamma: float) -> dict:
    """The `optimum` stage's figures per requested y, from the base's own images (`base_rollouts`)."""
    samples = pd.read_parquet(rollouts / "samples.parquet")
    pixels = table_images(samples, meta["resolution"], meta["channels"])
    c = samples["c"].to_numpy()
    log_p = reward_log_probs(reward, to_model_space(pixels), num_joint_classes(meta)).numpy()
    w = tilted_weights(log_p, c, gamma)  # (images, y), normalised within (c, y)
    reward_term, kl, ess = pair_terms(log_p, c, w)  # (c, y)
    recognised = features_and_predictions(digit, pixels)[1] == c
    got = oracle_classes(pixels, meta["tasks"]["compressibility"])[1]
    ys = range(log_p.shape[1])
    return {
        "accuracy_per_y": [float(np.average(got == k, weights=w[:, k])) for k in ys],
        "c_accuracy_per_y": [float(np.average(recognised, weights=w[:, k])) for k in ys],
        "log_p_per_y": reward_term.mean(0).tolist(),
        "kl_per_y": kl.mean(0).tolist(),
        "ess_per_y": ess.mean(0).tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--data", type=Path, default=Path("data/labelled"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/lowpass_control"))
    parser.add_argument(
        "--keep", type=int, default=4, help="N: the control acts on the N x N lowest DCT frequencies"
    )
    parser.add_argument("--updates", type=int, default=0, help="> 0: instead of finetune.updates")
    parser.add_argument("--steps", type=int, default=0, help="> 0: instead of finetune.rollout.steps")
    parser.add_argument(
        "--only-y", type=int, default=-1, help=">= 0: train on requests of this y alone (the judge asks all)"
    )
    parser.add_argument(
        "--feedback", action="store_true", help="the y-embedding also reads the reward at the base's x0-hat"
    )
    parser.add_argument("--gamma", type=float, default=0.0, help="> 0: instead of params' gamma")
    parser.add_argument("--judge-per-pair", type=int, default=0, help="> 0: judge on fewer requests (smoke)")
    parser.add_argument(
        "--seed", type=int, default=-1, help=">= 0: the training seed (rollouts, LoRA init), not params'"
    )
    args = parser.parse_args()

    params, meta, reward, digit, num_y = load_inputs(args.models, args.data)
    gamma = args.gamma or params.gamma
    ft = params.finetune
    if args.updates:
        ft = ft.model_copy(update={"updates": args.updates})
    if args.steps:
        ft = ft.model_copy(update={"rollout": ft.rollout.model_copy(update={"steps": args.steps})})
    ro = ft.rollout
    cfg = SamplerConfig(ro.steps, ro.eta, ro.guidance_scale)
    seed = params.seed if args.seed < 0 else args.seed
    torch.manual_seed(seed)  # the LoRA's random init; the rollouts' noise comes from finetune's seed
    model = new_control(args.models, num_y, ft)
    base = model.base
    original = ctrldiff.sampling.guided_eps
    if args.feedback:
        emb = model.y_embedding
        base.unet.class_embedding = FeedbackEmbedding(emb.num_classes, emb.weight.shape[1], num_y)
        changed = with_feedback(original, model, reward)
    else:
        changed = band_limited(original, model, args.keep)
    for module in (ctrldiff.ctrl, ctrldiff.sampling, choice_distill):  # training, probes, judging
        module.guided_eps = changed

    if args.only_y >= 0:
        draw = ctrldiff.finetune.draw_batch

        def one_y(*a, **k):
            c, y, seeds = draw(*a, **k)
            return c, torch.full_like(y, args.only_y), seeds

        ctrldiff.finetune.draw_batch = one_y
    run = (
        f"keep{args.keep}_g{gamma:g}_u{ft.updates}_steps{ro.steps}"
        + (f"_y{args.only_y}" if args.only_y >= 0 else "")
        + ("_feedback" if args.feedback else "")
        + (f"_seed{seed}" if args.seed >= 0 else "")
    )
    start = time.perf_counter()
    result = finetune(model, reward, gamma, ft, meta, seed, args.out / f"checkpoint_{run}")
    minutes = (time.perf_counter() - start) / 60
    history = result["history"]
    for i in range(0, len(history), 10):
        block = history[i : i + 10]
        mean = {k: sum(h[k] for h in block) / len(block) for k in ("reward", "accuracy_reward_clf")}
        kls = [h["kl"] for h in block if "kl" in h]
        print(
            f"updates {i}-{i + len(block) - 1}: reward {mean['reward']:.2f}, reward clf accuracy "
            f"{mean['accuracy_reward_clf']:.2f}, KL {sum(kls) / max(len(kls), 1):.1f}"
        )
    params = params.model_copy(update={"gamma": gamma})
    figures = judge(model, reward, digit, meta, params, cfg, num_y, args.judge_per_pair)
    figures["finetune_minutes"] = minutes
    (args.out / f"result_{run}.json").write_text(json.dumps(figures, indent=2) + "\n")
    design = "feedback control" if args.feedback else f"band-limited control, N = {args.keep}"
    print(f"{design}, γ = {gamma:g}, {ro.steps} steps, seed {seed}, {ft.updates} updates, {minutes:.1f} min:")
    print(json.dumps(figures, indent=2))
    if (args.data.parent / "base_rollouts").is_dir():
        with torch.no_grad():
            optimum = optimum_per_y(args.data.parent / "base_rollouts", reward, digit, meta, gamma)
        print("the optimum per requested y (base_rollouts):", json.dumps(optimum, indent=2))


if __name__ == "__main__":
    main()
