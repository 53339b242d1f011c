"""CTRL's target, the tilted base p_γ(x | c, y) ∝ p̂(y | x)^γ p_pre(x | c), estimated by reweighting
the base's own samples.

With n base samples x_i of a class c, the target is the weighted empirical distribution
w_i ∝ p̂(y | x_i)^γ, self-normalised within (c, y). The `optimum` stage scores it (what a perfect
solver would reach among the images the base itself makes); the `weighted` solver fits it. Both use
the trajectories of ``base_trajectories``: for DDIM with eta = 1 (memoryless), reweighting the whole
path by a function of x0 is exactly the optimum of CTRL's trajectory-KL problem.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.metrics import f1_score
from tqdm import tqdm

from ctrldiff.base import BaseModel
from ctrldiff.ddim import timestep_pairs
from ctrldiff.sampling import SamplerConfig, ddim_cfg_step, request_noise


@dataclass(frozen=True)
class Trajectories:
    """n base trajectories: states (n, steps + 1, *shape), x_T first and the final x0 last."""

    states: torch.Tensor
    c: torch.Tensor  # (n,) the base class each was drawn for
    seeds: list[int]  # trajectory i's noise is request_noise([seeds[i]], ...)

    def noise(self, rows: list[int]) -> torch.Tensor:
        """The noise the trajectories ``rows`` were drawn with, (len(rows), steps + 1, *shape)."""
        shape, steps = self.states.shape[2:], self.states.shape[1] - 1
        return request_noise([self.seeds[i] for i in rows], tuple(shape), steps)


@torch.no_grad()
def base_trajectories(
    base: BaseModel, c: torch.Tensor, seeds: list[int], sampler: SamplerConfig, batch_size: int
) -> Trajectories:
    """The base's trajectories for requests (c[i], seeds[i]): the same chain as ``sampling.sample``
    (the same images, seed for seed), with every intermediate state kept."""
    base.check_c(c)
    pairs = timestep_pairs(base.scheduler, sampler.steps)
    out = []
    for i in tqdm(range(0, len(c), batch_size), desc="base trajectories", unit="batch"):
        cb, sb = c[i : i + batch_size].to(base.device), seeds[i : i + batch_size]
        noise = request_noise(sb, base.sample_shape, sampler.steps).to(base.device)
        x, states = noise[:, 0], [noise[:, 0]]
        for k, (t, t_prev) in enumerate(pairs, start=1):
            x = ddim_cfg_step(base, x, t, t_prev, noise[:, k], cb, sampler)
            states.append(x)
        out.append(torch.stack(states, 1).cpu())
    return Trajectories(torch.cat(out), c.cpu(), list(seeds))


def tilted_weights(log_p: np.ndarray, c: np.ndarray, gamma: float) -> np.ndarray:
    """Self-normalised weights ∝ exp(gamma * log_p[i, y]) within each class c: (images, classes)."""
    w = np.zeros_like(log_p, dtype=np.float64)
    for k in np.unique(c):
        rows = c == k
        logits = gamma * log_p[rows].astype(np.float64)
        logits -= logits.max(0, keepdims=True)
        w[rows] = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    return w


def effective_size(weights: np.ndarray) -> float:
    """Kish's effective sample size of importance weights: (sum w)^2 / sum w^2."""
    return float(weights.sum() ** 2 / (weights**2).sum())


def tilted_kl(weights: np.ndarray) -> float:
    """KL(tilted ‖ base) in nats of one (c, y)'s self-normalised weights over its n base samples.

    The optimum's trajectory KL equals this (its path measure is the base's, reweighted at x0); at
    most log n, reached by the best of n.
    """
    w = weights[weights > 0]
    return float((w * np.log(len(weights) * w)).sum())


def pair_terms(log_p: np.ndarray, c: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per (c, y), arrays (classes c, classes y): E log p̂(y | x) under the weights, KL and ESS."""
    pairs = [[(c == k, y) for y in range(log_p.shape[1])] for k in np.unique(c)]
    reward = np.array([[np.average(log_p[r, y], weights=w[r, y]) for r, y in row] for row in pairs])
    kl = np.array([[tilted_kl(w[r, y]) for r, y in row] for row in pairs])
    ess = np.array([[effective_size(w[r, y]) for r, y in row] for row in pairs])
    return reward, kl, ess


def weighted_scores(requested: np.ndarray, achieved: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """Accuracy and macro-F1 when image i stands for request y with weight w[i, y]."""
    asked = np.broadcast_to(requested, w.shape).ravel()
    got = np.broadcast_to(achieved[:, None], w.shape).ravel()
    acc = float(np.average(asked == got, weights=w.ravel()))
    return acc, float(f1_score(asked, got, average="macro", sample_weight=w.ravel(), zero_division=0))


@torch.no_grad()
def reward_log_probs(
    reward: torch.nn.Module, images: torch.Tensor, num_y: int, batch: int = 500
) -> torch.Tensor:
    """log p̂(y | x) of every image for every class y, (images, num_y): the reward's own ``log_prob``."""
    out = []
    for i in range(0, len(images), batch):
        x = images[i : i + batch]
        out.append(torch.stack([reward.log_prob(x, torch.full((len(x),), y)) for y in range(num_y)], 1))
    return torch.cat(out)


def save_trajectories(directory: Path, traj: Trajectories) -> None:
    """Into an existing folder: states and classes as safetensors, seeds as JSON."""
    directory = Path(directory)
    save_file(
        {"states": traj.states.contiguous(), "c": traj.c.contiguous()}, directory / "trajectories.safetensors"
    )
    (directory / "seeds.json").write_text(json.dumps(traj.seeds) + "\n")


def load_trajectories(directory: Path) -> Trajectories:
    """The base trajectories a `base_rollouts` stage saved in ``directory``."""
    directory = Path(directory)
    path = directory / "trajectories.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no base trajectories here; run `dvc repro base_rollouts`")
    tensors = load_file(path)
    return Trajectories(tensors["states"], tensors["c"], json.loads((directory / "seeds.json").read_text()))
