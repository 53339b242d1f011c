"""DDIM sampling with classifier-free guidance, seeded per request.

Every request i draws its initial noise and its per-step noise from its own generator seeded with
``seeds[i]``, so an image depends only on its seed and its (c, y), never on batch composition:
every method is compared on the same noise.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ctrldiff.base import BaseModel
from ctrldiff.ddim import ddim_step, predicted_eps, timestep_pairs


@dataclass(frozen=True)
class SamplerConfig:
    steps: int = 20
    eta: float = 1.0
    guidance_scale: float = 2.0  # classifier-free guidance; 1 = no guidance


def request_noise(seeds: list[int], shape: tuple[int, ...], steps: int) -> torch.Tensor:
    """Noise of each request, (N, steps + 1, *shape): index 0 is x_T, index k the noise of step k."""
    return torch.stack(
        [torch.randn((steps + 1, *shape), generator=torch.Generator().manual_seed(s)) for s in seeds]
    )


def guided_eps(
    model: BaseModel,
    x: torch.Tensor,
    t: int,
    c: torch.Tensor,
    scale: float,
    y: torch.Tensor | None = None,
    y_null: int | None = None,
) -> torch.Tensor:
    """Noise prediction with classifier-free guidance: eps_u + scale (eps_cond - eps_u).

    The unconditional branch is NULL c (and NULL y when the model has a y-embedding). A denoiser
    trained on v or x0 has its guided output converted to a noise prediction.
    """
    null_c = torch.full_like(c, model.encoder.null_index)
    tt = torch.full((len(x),), t, dtype=torch.long, device=x.device)
    if scale == 1.0:
        out = model.unet(x, tt, model.encoder(c), class_labels=y).sample
        return predicted_eps(model.scheduler, out, x, t)
    if y is None:
        labels = None
    elif y.is_floating_point():  # convex weights over the classes: all-zero weights are NULL
        labels = torch.cat([y, torch.zeros_like(y)])
    else:
        labels = torch.cat([y, torch.full_like(y, y_null)])
    eps = model.unet(
        torch.cat([x, x]), torch.cat([tt, tt]), model.encoder(torch.cat([c, null_c])), class_labels=labels
    ).sample
    eps_c, eps_u = eps.chunk(2)
    return predicted_eps(model.scheduler, eps_u + scale * (eps_c - eps_u), x, t)


def ddim_cfg_step(
    model: BaseModel,
    x: torch.Tensor,
    t: int,
    t_prev: int,
    z: torch.Tensor,
    c: torch.Tensor,
    cfg: SamplerConfig,
    y: torch.Tensor | None = None,
    y_null: int | None = None,
    seeds: list[int] | None = None,
) -> torch.Tensor:
    """The plain step x_t -> x_t_prev: guided noise prediction, DDIM mean, plus sigma times z.

    ``seeds`` are the requests' own seeds, for a step that draws noise of its own (SVDD's candidates).
    """
    eps = guided_eps(model, x, t, c, cfg.guidance_scale, y, y_null)
    mean, sigma, _ = ddim_step(model.scheduler, x, eps, t, t_prev, cfg.eta)
    return mean + sigma * z


# A sampling step with the signature of ``ddim_cfg_step``; guidance methods supply their own.
Step = Callable[..., torch.Tensor]


@contextmanager
def count_evaluations(unet: torch.nn.Module) -> Iterator[dict[str, int]]:
    """Count denoiser evaluations (batch rows through ``unet``) inside the block.

    ``calls`` counts every row; ``with_grad`` the rows evaluated with autograd on, i.e. the ones a
    gradient-guided method back-propagates through (a backward pass costs about two forwards).
    """
    count = {"calls": 0, "with_grad": 0}

    def hook(module, args, kwargs):
        rows = len(kwargs.get("sample", args[0] if args else None))
        count["calls"] += rows
        count["with_grad"] += rows if torch.is_grad_enabled() else 0

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield count
    finally:
        handle.remove()


def nfe_per_image(cfg: SamplerConfig) -> int:
    """Denoiser evaluations per image (the guided branch and the NULL branch count separately)."""
    return cfg.steps * (1 if cfg.guidance_scale == 1.0 else 2)


@torch.no_grad()
def sample(
    model: BaseModel,
    c: torch.Tensor,
    seeds: list[int],
    cfg: SamplerConfig,
    y: torch.Tensor | None = None,
    y_null: int | None = None,
    step: Step = ddim_cfg_step,
) -> torch.Tensor:
    """Images in [-1, 1] for requests (c[i], y[i]) with noise from seeds[i].

    ``step`` is the transition x_t -> x_t_prev: the plain guided DDIM step by default, or a
    guidance method's (which may enable gradients inside it).
    """
    model.check_c(c)
    if y is not None and not y.is_floating_point():
        bad = y[(y < 0) | (y >= y_null)]
        if len(bad):
            raise ValueError(f"requested y = {int(bad[0])} is not a class of this control: 0..{y_null - 1}")
    device = model.device
    noise = request_noise(seeds, model.sample_shape, cfg.steps).to(device)  # CPU-drawn: same on any device
    c, y = c.to(device), None if y is None else y.to(device)
    x = noise[:, 0]
    for k, (t, t_prev) in enumerate(timestep_pairs(model.scheduler, cfg.steps), start=1):
        x = step(model, x, t, t_prev, noise[:, k], c, cfg, y, y_null, seeds=seeds)
    return model.decode(x).clamp(-1, 1)


def sample_requests(
    model: BaseModel,
    c: torch.Tensor,
    seeds: list[int],
    cfg: SamplerConfig,
    batch_size: int,
    y: torch.Tensor | None = None,
    y_null: int | None = None,
    desc: str = "sample",
    step: Step = ddim_cfg_step,
) -> tuple[torch.Tensor, float]:
    """Sample many requests in batches with a progress bar; returns (images, seconds per image)."""
    out = []
    start = time.perf_counter()
    for i in tqdm(range(0, len(c), batch_size), desc=desc, unit="batch"):
        sl = slice(i, i + batch_size)
        out.append(sample(model, c[sl], seeds[sl], cfg, None if y is None else y[sl], y_null, step))
    return torch.cat(out), (time.perf_counter() - start) / len(c)
