"""Reward-weighted regression: CTRL's optimum fitted step by step on the base's own trajectories.

With DDIM at eta = 1 (memoryless), the optimum of CTRL's objective γ E log p̂(y | x0) − KL(path ‖ base
path) is the base's path measure reweighted at the end by w(x0) ∝ p̂(y | x0)^γ (Domingo-Enrich et al.,
ICLR 2025). Its transition from x_k is the base's Gaussian kernel tilted by the value function, whose
mean is E_w[x_{k+1} | x_k]. Writing each base transition as x_{k+1} = μ_pre(x_k) + σ_k z_{k+1} (z the
trajectory's own noise), the weighted regression

    L(θ) = E_{(c, y)} E_{i ~ w(· | c, y)} mean_k  ‖(μ_θ(x_k^i; c, y) − μ_pre(x_k^i)) / σ_k − z_{k+1}^i‖² / 2

is minimised by μ_θ − μ_pre = σ_k E_w[z_{k+1} | x_k], which is the tilted kernel's mean shift (exact
where that kernel is Gaussian, i.e. for small steps), and its excess over the minimum is that step's
KL to it, ‖μ_θ − μ*‖² / 2σ_k². At γ = 0 the weights are uniform and E[z | x_k] = 0: the fit is the
base. The weights are self-normalised within (c, y) over the n trajectories of c
(``base_rollouts.n_per_c``), so every request class weighs the same; their effective sample size
says how many distinct base images stand behind each (c, y).

Classifier-free guidance: μ_θ is the mean of the guided step exactly as the rollouts and the
evaluation sample it (both branches through the LoRA, y against NULL y and NULL c), and μ_pre that of
the base's guided step. So the chain that is fitted is the chain that is sampled, and no NULL-y
dropout is needed: the unconditional branch is trained only through the guided mean it enters.
Each request draws one trajectory and is fitted on all its stochastic steps, so ``batch_size`` counts
trajectories as for backprop, at about the cost of one rollout with gradients. The loss averages
over steps and dimensions (its minimiser is that of the sum; the sum would only rescale it). A
deterministic step (sigma = 0) has no transition noise to regress onto: there the control is off
(``ControlledModel.is_off``), as in sampling, and so it is on the steps the model leaves to the base.
"""

from __future__ import annotations

import numpy as np
import torch

from ctrldiff.control import ControlledModel
from ctrldiff.ctrl import CTRLLoss, LossTerms, RolloutConfig
from ctrldiff.ddim import ddim_step, timestep_pairs
from ctrldiff.sampling import guided_eps, request_noise
from ctrldiff.tilt import Trajectories, effective_size, reward_log_probs, tilted_weights


class Weighted:
    """Weighted regression of the guided step's mean onto the base trajectories' own noise."""

    def __init__(
        self,
        reward: torch.nn.Module,
        gamma: float,
        rollout: RolloutConfig,
        kl_reduction: str,
        trajectories: Trajectories,
        model: ControlledModel,
        min_ess: float = 5.0,
    ):
        if rollout.eta <= 0:
            raise ValueError("the weighted solver needs stochastic rollouts: finetune.rollout.eta > 0")
        if trajectories.states.shape[1] != rollout.steps + 1:
            raise ValueError(
                f"base trajectories have {trajectories.states.shape[1] - 1} steps but finetune.rollout.steps "
                f"is {rollout.steps}: rerun the base_rollouts stage"
            )
        self.traj, self.cfg = trajectories, rollout
        self.on_policy = CTRLLoss(reward, gamma, rollout, kl_reduction)  # the probe updates' log
        num_y = len(model.y_classes)
        with torch.no_grad():  # the reward of every base image, scored once (decoded in chunks)
            x0 = torch.cat(
                [
                    model.base.decode(chunk.to(model.base.device)).clamp(-1, 1)
                    for chunk in trajectories.states[:, -1].split(100)
                ]
            )
        log_p = reward_log_probs(reward, x0, num_y).cpu().numpy()
        c = trajectories.c.numpy()
        self.weights = torch.from_numpy(tilted_weights(log_p, c, gamma))  # (n, num_y), sums to 1 per (c, y)
        self.rows = {int(k): np.flatnonzero(c == k) for k in np.unique(c)}
        self.ess = np.array(
            [[effective_size(self.weights[r, y].numpy()) for y in range(num_y)] for r in self.rows.values()]
        )
        small = np.argwhere(self.ess < min_ess)
        if len(small):
            print(
                f"weighted: {len(small)} of {self.ess.size} (c, y) pairs rest on fewer than {min_ess:g} "
                f"effective base images (smallest {self.ess.min():.1f}, at c = {small[0][0]}, y = "
                f"{small[0][1]}); more base_rollouts.n_per_c or a smaller gamma widen them"
            )
        pairs = timestep_pairs(model.base.scheduler, rollout.steps)
        self.pairs = pairs
        # the steps the control acts on: not a deterministic one, nor one left to the base
        self.stochastic = [
            k
            for k, (t, t_prev) in enumerate(pairs)
            if not model.is_off(model.base.scheduler, t, t_prev, rollout.eta)
        ]

    def draw(self, c: torch.Tensor, y: torch.Tensor, seeds: list[int]) -> list[int]:
        """For each request: a base trajectory of its c, drawn by its (c, y) weights.

        One generator per micro-batch, seeded by its first request's seed (the loop's seeds are a
        function of (seed, update, rank), so a resumed run draws the same trajectories)."""
        g = torch.Generator().manual_seed(seeds[0] % 2**63)
        rows = torch.empty(len(c), dtype=torch.long)
        for ci, yi in torch.unique(torch.stack([c, y], 1), dim=0).tolist():
            sel = torch.nonzero((c == ci) & (y == yi)).flatten()
            candidates = torch.from_numpy(self.rows[ci])
            picks = torch.multinomial(self.weights[candidates, yi], len(sel), replacement=True, generator=g)
            rows[sel] = candidates[picks]
        return rows.tolist()

    def __call__(
        self, model: ControlledModel, c: torch.Tensor, y: torch.Tensor, seeds: list[int], probing: bool
    ) -> tuple[torch.Tensor, LossTerms | None]:
        base, device = model.base, model.base.device
        rows = self.draw(c, y, seeds)
        noise = self.traj.noise(rows)
        c, y = c.to(device), y.to(device)
        loss = torch.zeros((), device=device)
        for k in self.stochastic:  # every stochastic step of each drawn trajectory
            t, t_prev = self.pairs[k]
            x = self.traj.states[rows, k].to(device)
            x_next = self.traj.states[rows, k + 1].to(device)
            z = noise[:, k + 1].to(device)
            eps = guided_eps(base, x, t, c, self.cfg.guidance_scale, y, model.y_null)
            mean, sigma, _ = ddim_step(base.scheduler, x, eps, t, t_prev, self.cfg.eta)
            mean_pre = x_next - sigma * z  # the base's own step mean on this trajectory
            residual = ((mean - mean_pre) / sigma - z).pow(2).flatten(1).mean(1) / 2
            loss = loss + residual.mean() / len(self.stochastic)
        terms = None
        if probing:  # the current model's own rollouts, for the log's reward and whole-trajectory KL
            with torch.no_grad():
                roll = request_noise(seeds, base.sample_shape, self.cfg.steps).to(device)
                _, terms = self.on_policy(model, c, y, roll, full_kl=True)
        return loss, terms
