"""CTRL's objective by direct back-propagation through the sampler (the paper's Algorithm 2).

    loss = -gamma * mean log p̂(y | x0)  +  mean sum_t KL_t

KL_t compares the fine-tuned and the frozen DDIM means on the same x_t with the step's sigma:
KL_t = ||mu_ft - mu_pre||^2 / (2 sigma_t^2), summed over dimensions (the true Gaussian KL), or
averaged over them with ``kl_reduction = "mean"`` (the authors' convention, a far stronger tilt
for the same gamma). A deterministic step (sigma = 0: with the embedded base, the last, into
t = -1) is the base's own (``ddim.control_is_off``): a change there would have infinite KL. So is
any step the model leaves to the base (``ControlledModel.is_off``): its KL is exactly 0.

Truncated back-propagation, "last-K" semantics: gradients flow through the last K denoising steps
only; the earlier ones run under no_grad. K is fixed for a run (the authors redrew it every update).
The frozen reference is evaluated only where the loss needs it, in the window (at paper scale, K = 10
of 50 steps, evaluating it everywhere cost about 80 % more denoiser calls); ``full_kl`` evaluates it
on every stochastic step too, for the whole trajectory KL that the probe updates log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils.checkpoint import checkpoint

from ctrldiff.classifier import Classifier
from ctrldiff.control import ControlledModel
from ctrldiff.ddim import ddim_step, timestep_pairs
from ctrldiff.sampling import guided_eps


@dataclass(frozen=True)
class RolloutConfig:
    steps: int = 20
    eta: float = 1.0
    guidance_scale: float = 2.0
    grad_steps: int = 5  # K: gradients through the last K denoising steps
    checkpointing: bool = False  # recompute each denoiser call in backward to save memory


def gaussian_kl(
    mean_a: torch.Tensor, mean_b: torch.Tensor, sigma: torch.Tensor, reduction: str
) -> torch.Tensor:
    """KL(N(mean_a, s^2 I) || N(mean_b, s^2 I)) per sample: summed ("sum") or averaged ("mean") over dims."""
    sq = (mean_a - mean_b).pow(2).flatten(1)
    sq = sq.sum(1) if reduction == "sum" else sq.mean(1)
    return sq / (2 * sigma**2)


def rollout(
    model: ControlledModel,
    c: torch.Tensor,
    y: torch.Tensor,
    noise: torch.Tensor,
    cfg: RolloutConfig,
    kl_reduction: str = "sum",
    full_kl: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample x0 for (c, y) from ``noise`` (N, steps + 1, ...); return (image, KL in window, KL per step).

    The KL in the window carries the gradient; the KL of every stochastic step, (N, stochastic steps),
    is detached: its row sums are the trajectory KL, its columns show where the control spends it.
    With ``full_kl=False`` the reference runs inside the gradient window only, and the steps before
    it are NaN. The frozen reference is the same module with adapters disabled and y = NULL.
    """
    base = model.base
    y_null = torch.full_like(y, model.y_null)
    pairs = timestep_pairs(base.scheduler, cfg.steps)
    first_grad = len(pairs) - cfg.grad_steps
    x = noise[:, 0]
    kl_window = x.new_zeros(len(x))
    kl_steps = []

    def reference_eps(x: torch.Tensor, t: int) -> torch.Tensor:
        with model.reference():  # inside, so a checkpointed recomputation also runs the frozen model
            return guided_eps(base, x, t, c, cfg.guidance_scale, y_null, model.y_null)

    for k, (t, t_prev) in enumerate(pairs):
        in_window = k >= first_grad
        with_grad = in_window and torch.is_grad_enabled()
        off = model.is_off(base.scheduler, t, t_prev, cfg.eta)
        with torch.set_grad_enabled(with_grad):
            if off:
                # the base's own step; the reward's gradient still flows through its input
                eps = reference_eps(x, t)
            elif with_grad and cfg.checkpointing:
                eps = checkpoint(
                    guided_eps, base, x, t, c, cfg.guidance_scale, y, model.y_null, use_reentrant=False
                )
            else:
                eps = guided_eps(base, x, t, c, cfg.guidance_scale, y, model.y_null)
            mean, sigma, _ = ddim_step(base.scheduler, x, eps, t, t_prev, cfg.eta)
            if sigma > 0 and off:
                kl_steps.append(torch.zeros_like(kl_window))  # the base's kernel: no KL
            elif sigma > 0 and not (in_window or full_kl):
                kl_steps.append(torch.full_like(kl_window, float("nan")))
            elif sigma > 0:
                # The reference mean depends on x_t, which depends on the trainable parameters: its
                # gradient is part of d KL_t / d theta (without it the term pushing x_t back against
                # the control is kept and its cancelling twin dropped: a wrong-signed gradient).
                if with_grad and cfg.checkpointing:
                    eps_ref = checkpoint(reference_eps, x, t, use_reentrant=False)
                else:
                    eps_ref = reference_eps(x, t)
                mean_ref, _, _ = ddim_step(base.scheduler, x, eps_ref, t, t_prev, cfg.eta)
                kl = gaussian_kl(mean, mean_ref, sigma, kl_reduction)
                kl_steps.append(kl.detach())
                if with_grad:
                    kl_window = kl_window + kl
            x = mean + sigma * noise[:, k + 1]
    kl_steps = torch.stack(kl_steps, 1) if kl_steps else x.new_zeros(len(x), 0)  # eta = 0: no KL
    return base.decode(x), kl_window, kl_steps


@dataclass(frozen=True)
class LossTerms:
    """One batch's per-trajectory terms, detached: what the training log is made of."""

    log_p: torch.Tensor  # log p̂(y | x0)
    kl_window: torch.Tensor  # the KL of the steps in the gradient window
    kl_steps: torch.Tensor  # (N, stochastic steps); NaN where the reference was not evaluated
    correct: torch.Tensor  # the reward classifier's argmax equals the requested y (0 / 1)

    def stats(self) -> dict[str, float]:
        """Batch means; the trajectory KL only where every step's KL was evaluated."""
        out = {
            "reward": self.log_p.mean().item(),
            "accuracy_reward_clf": self.correct.mean().item(),
            "kl_window": self.kl_window.mean().item(),
        }
        if not self.kl_steps.isnan().any():
            out["kl"] = self.kl_steps.sum(1).mean().item()
        if self.kl_steps.shape[1] and not self.kl_steps[:, -1].isnan().any():
            # the last stochastic step, into t = 0: the smallest sigma, where edits of texture spend the KL
            out["kl_last_step"] = self.kl_steps[:, -1].mean().item()
        return out


class CTRLLoss:
    """-gamma * log p̂(y | x0) + sum_t KL_t, averaged over the batch."""

    def __init__(
        self,
        reward: Classifier,
        gamma: float,
        cfg: RolloutConfig,
        kl_reduction: Literal["sum", "mean"] = "sum",
    ):
        self.reward, self.gamma, self.cfg, self.kl_reduction = reward, gamma, cfg, kl_reduction

    def __call__(
        self,
        model: ControlledModel,
        c: torch.Tensor,
        y: torch.Tensor,
        noise: torch.Tensor,
        full_kl: bool = True,
    ) -> tuple[torch.Tensor, LossTerms]:
        """(loss, the batch's per-trajectory terms)."""
        x0, kl_window, kl_steps = rollout(model, c, y, noise, self.cfg, self.kl_reduction, full_kl)
        x0 = x0.clamp(-1, 1)
        log_p = self.reward.log_prob(x0, y)
        loss = (-self.gamma * log_p + kl_window).mean()
        with torch.no_grad():
            correct = (self.reward(x0.detach()).argmax(-1) == y).float()
        return loss, LossTerms(log_p.detach(), kl_window.detach(), kl_steps, correct)
