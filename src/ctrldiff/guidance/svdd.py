"""SVDD-PM, soft value-based decoding (Li et al. 2024): derivative-free, no training.

At each step draw M candidate next states from the base model's own transition, score each by the
reward on its x̂0 (one more denoiser call per candidate, at t_prev), and keep one: the best
(temperature 0) or one drawn from softmax(value / temperature). Candidate 0 uses the request's own
noise, so M = 1 is the base sampler exactly. Candidates 1..M-1 of request i draw their noise from a
generator seeded by (the request's own seed, t): an image depends on its request alone, never on the
batch it was sampled in, and no two requests share candidate noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctrldiff.base import BaseModel
from ctrldiff.classifier import Classifier
from ctrldiff.ddim import ddim_step
from ctrldiff.sampling import SamplerConfig, guided_eps


@dataclass
class SVDD:
    reward: Classifier
    candidates: int = 8
    temperature: float = 0.0

    @torch.no_grad()
    def __call__(
        self,
        model: BaseModel,
        x: torch.Tensor,
        t: int,
        t_prev: int,
        z: torch.Tensor,
        c: torch.Tensor,
        cfg: SamplerConfig,
        y: torch.Tensor,
        y_null: int | None = None,
        seeds: list[int] | None = None,
    ) -> torch.Tensor:
        eps = guided_eps(model, x, t, c, cfg.guidance_scale)
        mean, sigma, x0 = ddim_step(model.scheduler, x, eps, t, t_prev, cfg.eta)
        if self.candidates == 1 or t_prev < 0:  # the last step is deterministic: nothing to choose
            return mean + sigma * z
        if seeds is None:
            raise ValueError("SVDD draws its candidates from the requests' own seeds: pass seeds=")
        gens = [torch.Generator().manual_seed(int(s) * 1_000_003 + t) for s in seeds]
        extra = torch.stack([torch.randn((self.candidates - 1, *z.shape[1:]), generator=g) for g in gens], 1)
        extra = extra.to(z)
        cand = mean + sigma * torch.cat([z[None], extra])  # (M, N, ...)
        flat = cand.flatten(0, 1)
        m = self.candidates
        eps_next = guided_eps(model, flat, t_prev, c.repeat(m), cfg.guidance_scale)
        x0_next = ddim_step(model.scheduler, flat, eps_next, t_prev, -1, 0.0)[2]
        value = self.reward.log_prob(model.decode(x0_next).clamp(-1, 1), y.repeat(m)).view(m, -1)
        if self.temperature == 0:
            pick = value.argmax(0)
        else:
            u = torch.stack([torch.rand((), generator=g) for g in gens]).to(value)  # one draw per request
            cdf = (value / self.temperature).softmax(0).cumsum(0)
            pick = (cdf < u).sum(0).clamp(max=self.candidates - 1)
        return cand[pick, torch.arange(len(x), device=x.device)]
