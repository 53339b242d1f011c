"""Adjoint Matching (Domingo-Enrich, Drozdzal, Karrer, Chen, ICLR 2025, arXiv 2409.08861), on CTRL's chain.

Write each DDIM step of the controlled chain as x_{k+1} = μ_pre(x_k) + σ_k u_k(x_k) + σ_k z_{k+1}: the
base's guided mean, a control u_k in units of the step's noise, and the step's own noise. Its KL to
the base's chain is E Σ_k ‖u_k‖² / 2, so CTRL's objective is the stochastic optimal control problem

    max_u  E[ r(x_N) − Σ_k ‖u_k‖² / 2 ],    r = γ log p̂(y | x_N)   (γ · dims with kl_reduction mean)

whose optimum, for the memoryless DDIM chain at eta = 1, is the tilted target. Each update:

1. rolls the current model out without gradients (the requests' own noise, as `sample` draws it);
2. computes the lean adjoint backwards, ã_N = −∇_x r(x_N), ã_k = (∂μ_pre(x_k) / ∂x_k)ᵀ ã_{k+1}: vector–
   Jacobian products through the *frozen* base's step mean only (the paper's eq. for the lean adjoint
   drops the control's own Jacobian, which is zero in expectation at the optimum);
3. regresses the control of each stochastic step onto it (the paper's adjoint-matching loss, in the
   discrete chain's units): ‖(μ_θ(x_k) − μ_pre(x_k)) / σ_k + σ_k ã_{k+1}‖² / 2, with ã_{k+1} at the
   state the step actually reached. Its fixed point u_k = −σ_k E[ã_{k+1} | x_k] is the tilted kernel's
   mean shift (exact on a Gaussian chain: tests/test_solvers.py).

The loss averages over dimensions and regressed steps (its minimiser is that of the sum). With
``grad_steps`` K below the number of stochastic steps, K of them, drawn afresh each update, are
regressed (the rollout and the adjoint always cover the whole chain). A deterministic step (sigma = 0)
is the base's own (``ControlledModel.is_off``): the adjoint passes through it and nothing is regressed.

Classifier-free guidance: μ_pre is the frozen base's guided mean (NULL y), through which the adjoint
runs; μ_θ is the controlled model's guided mean, both branches through the LoRA, y against NULL y and
NULL c, exactly as the rollouts and the evaluation sample it. So the chain whose control is fitted is
the chain that is sampled, and the control is the difference of the two guided means.

Every update logs the on-policy reward and the whole trajectory KL, at no extra cost: the rollout
and the reference means are already there.
"""

from __future__ import annotations

import math

import torch

from ctrldiff.control import ControlledModel
from ctrldiff.ctrl import LossTerms, RolloutConfig, gaussian_kl
from ctrldiff.ddim import ddim_step, step_sigma, timestep_pairs
from ctrldiff.sampling import guided_eps, request_noise


class Adjoint:
    """Regression of each step's control onto the lean adjoint of the reward, on on-policy rollouts."""

    def __init__(self, reward: torch.nn.Module, gamma: float, rollout: RolloutConfig, kl_reduction: str):
        if rollout.eta <= 0:
            raise ValueError("the adjoint solver needs stochastic rollouts: finetune.rollout.eta > 0")
        self.reward, self.gamma, self.cfg, self.kl_reduction = reward, gamma, rollout, kl_reduction

    def _means(self, model: ControlledModel, x, t, t_prev, c, y, reference: bool):
        """The guided DDIM step's (mean, sigma) of the controlled model, or of the frozen base."""
        base = model.base
        if reference:
            with model.reference():
                eps = guided_eps(
                    base, x, t, c, self.cfg.guidance_scale, torch.full_like(y, model.y_null), model.y_null
                )
        else:
            eps = guided_eps(base, x, t, c, self.cfg.guidance_scale, y, model.y_null)
        mean, sigma, _ = ddim_step(base.scheduler, x, eps, t, t_prev, self.cfg.eta)
        return mean, sigma

    def __call__(
        self, model: ControlledModel, c: torch.Tensor, y: torch.Tensor, seeds: list[int], probing: bool
    ) -> tuple[torch.Tensor, LossTerms]:
        base, cfg = model.base, self.cfg
        device = base.device
        c, y = c.to(device), y.to(device)
        noise = request_noise(seeds, base.sample_shape, cfg.steps).to(device)
        pairs = timestep_pairs(base.scheduler, cfg.steps)
        off = [model.is_off(base.scheduler, t, t_prev, cfg.eta) for t, t_prev in pairs]

        # 1. the current model's rollout, without gradients
        states = [noise[:, 0]]
        with torch.no_grad():
            for k, (t, t_prev) in enumerate(pairs):
                mean, sigma = self._means(model, states[k], t, t_prev, c, y, reference=off[k])
                states.append(mean + sigma * noise[:, k + 1])

        # 2. the lean adjoint, from the reward's gradient back through the frozen base's step means
        x_end = states[-1].detach().requires_grad_(True)
        with torch.enable_grad():
            x0 = base.decode(x_end).clamp(-1, 1)
            log_p = self.reward.log_prob(x0, y)
            scale = self.gamma * (math.prod(x_end.shape[1:]) if self.kl_reduction == "mean" else 1.0)
            (adjoint,) = torch.autograd.grad(-scale * log_p.sum(), x_end)
        adjoints, means_pre = [None] * len(pairs), [None] * len(pairs)
        for k in reversed(range(len(pairs))):
            adjoints[k] = adjoint  # ã at the state step k reached
            x = states[k].detach().requires_grad_(True)
            t, t_prev = pairs[k]
            with torch.enable_grad():
                mean, _ = self._means(model, x, t, t_prev, c, y, reference=True)
                (adjoint,) = torch.autograd.grad(mean, x, grad_outputs=adjoint)
            means_pre[k] = mean.detach()

        # 3. each regressed step's control onto −σ_k ã_{k+1}
        stochastic = [k for k in range(len(pairs)) if not off[k]]
        chosen = stochastic
        if cfg.grad_steps < len(stochastic):
            g = torch.Generator().manual_seed(seeds[0] % 2**63)
            chosen = sorted(torch.randperm(len(stochastic), generator=g)[: cfg.grad_steps].tolist())
            chosen = [stochastic[i] for i in chosen]
        loss = torch.zeros((), device=device)
        kl_steps = []
        for k in range(len(pairs)):
            t, t_prev = pairs[k]
            if off[k]:  # the base's kernel: no control, no KL (a column only where the step is random)
                if float(step_sigma(base.scheduler, t, t_prev, cfg.eta)) > 0:
                    kl_steps.append(torch.zeros(len(c), device=device))
                continue
            with torch.set_grad_enabled(k in chosen and torch.is_grad_enabled()):
                mean, sigma = self._means(model, states[k], t, t_prev, c, y, reference=False)
            if k in chosen:
                residual = ((mean - means_pre[k]) / sigma + sigma * adjoints[k]).pow(2).flatten(1).mean(1) / 2
                loss = loss + residual.mean() / len(chosen)
            kl_steps.append(gaussian_kl(mean.detach(), means_pre[k], sigma, self.kl_reduction))
        kl_steps = torch.stack(kl_steps, 1)
        with torch.no_grad():
            correct = (self.reward(x0.detach()).argmax(-1) == y).float()
        terms = LossTerms(log_p.detach(), kl_steps.sum(1), kl_steps, correct)
        return loss, terms
