"""Classifier-free guidance on y: the training-based baseline that needs (c, x, y) triples.

The base gets the same LoRA + y-embedding as CTRL (``add_control``), trained with the ordinary
denoising loss on labelled images with y (and c) dropped to NULL at random, so the only difference
from CTRL is the training signal. Sampling guides on c as the base does and on y on top:

    eps = eps(∅c, ∅y) + w_c (eps(c, ∅y) - eps(∅c, ∅y)) + w_y (eps(c, y) - eps(c, ∅y))

three denoiser evaluations per step instead of two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ctrldiff.base import BaseModel
from ctrldiff.control import ControlledModel
from ctrldiff.ddim import ddim_step, predicted_eps, training_target
from ctrldiff.sampling import SamplerConfig


def train_cfg(
    model: ControlledModel,
    x: torch.Tensor,
    c: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    batch_size: int,
    lr_lora: float,
    lr_embedding: float,
    dropout: float,
    seed: int,
) -> list[float]:
    """Denoising loss on (c, x, y) with y and c independently dropped to NULL; returns the losses."""
    base = model.base
    if base.vae is not None:
        raise NotImplementedError("classifier-free guidance on y: latent (VAE) bases are not supported yet")
    g = torch.Generator().manual_seed(seed)
    lora, emb = model.trainable_parameters()
    opt = torch.optim.AdamW([{"params": lora, "lr": lr_lora}, {"params": emb, "lr": lr_embedding}])
    num_t = base.scheduler.config.num_train_timesteps
    losses = []
    bar = tqdm(range(steps), desc="cfg on y", unit="step")
    for _ in bar:
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        t = torch.randint(0, num_t, (batch_size,), generator=g)
        noise = torch.randn(x[idx].shape, generator=g)
        yb = torch.where(torch.rand(batch_size, generator=g) < dropout, model.y_null, y[idx])
        cb = torch.where(torch.rand(batch_size, generator=g) < dropout, base.encoder.null_index, c[idx])
        x_t = base.scheduler.add_noise(x[idx], noise, t)
        pred = base.unet(x_t, t, base.encoder(cb), class_labels=yb).sample
        loss = F.mse_loss(pred, training_target(base.scheduler, x[idx], noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return losses


@dataclass
class CFGOnY:
    scale: float  # w_y; the c guidance w_c is the sampler's guidance_scale

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
        y_null: int,
        seeds: list[int] | None = None,
    ) -> torch.Tensor:
        null_c, null_y = torch.full_like(c, model.encoder.null_index), torch.full_like(y, y_null)
        tt = torch.full((3 * len(x),), t, dtype=torch.long, device=x.device)
        eps_u, eps_c, eps_cy = model.unet(
            torch.cat([x, x, x]),
            tt,
            model.encoder(torch.cat([null_c, c, c])),
            class_labels=torch.cat([null_y, null_y, y]),
        ).sample.chunk(3)
        out = eps_u + cfg.guidance_scale * (eps_c - eps_u) + self.scale * (eps_cy - eps_c)
        eps = predicted_eps(model.scheduler, out, x, t)
        mean, sigma, _ = ddim_step(model.scheduler, x, eps, t, t_prev, cfg.eta)
        return mean + sigma * z
