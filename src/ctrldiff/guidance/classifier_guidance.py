"""Classifier guidance (Dhariwal & Nichol 2021): a classifier of noisy images p(y | x_t, t).

Trained on the offline (x, y) pairs noised to a random t (the `train_noisy_classifier` stage); at
sampling, its gradient needs no pass through the denoiser:

    eps' = eps - scale * sqrt(1 - a_t) * d/dx_t log p(y | x_t, t)

The noise level sqrt(1 - a_t) enters the network as one extra constant input channel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from tqdm import tqdm

from ctrldiff.base import BaseModel
from ctrldiff.classifier import Classifier, SmallCNN
from ctrldiff.ddim import alpha_bar, ddim_step
from ctrldiff.sampling import SamplerConfig, guided_eps


class NoisyClassifier(torch.nn.Module):
    """p(y | x_t, t): a SmallCNN that sees the image and its noise level."""

    def __init__(self, net: SmallCNN, scheduler: DDIMScheduler):
        super().__init__()
        self.net = net
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.clone(), persistent=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        level = (1 - self.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1).to(x)
        return self.net(torch.cat([x, level.expand(-1, 1, *x.shape[2:])], dim=1))

    def log_prob(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self(x, t).log_softmax(-1).gather(1, y[:, None]).squeeze(1)


def train_noisy_classifier(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    scheduler: DDIMScheduler,
    steps: int,
    batch_size: int,
    lr: float,
    width: int,
    seed: int,
) -> NoisyClassifier:
    """Cross-entropy on x_t = sqrt(a_t) x + sqrt(1 - a_t) noise, t uniform over the training steps."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = NoisyClassifier(SmallCNN(x.shape[1] + 1, num_classes, width), scheduler)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    a = scheduler.alphas_cumprod
    bar = tqdm(range(steps), desc="noisy classifier", unit="step")
    for _ in bar:
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        t = torch.randint(0, len(a), (batch_size,), generator=g)
        noise = torch.randn(x[idx].shape, generator=g)
        at = a[t].view(-1, 1, 1, 1)
        loss = F.cross_entropy(model(at.sqrt() * x[idx] + (1 - at).sqrt() * noise, t), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()


def save_noisy_classifier(model: NoisyClassifier, meta: dict, directory: str | Path) -> None:
    Classifier(model.net, {**meta["arch"]}, 1.0, meta).save(directory)


def load_noisy_classifier(directory: str | Path, scheduler: DDIMScheduler) -> NoisyClassifier:
    return NoisyClassifier(Classifier.load(directory).net, scheduler).eval()


@dataclass
class ClassifierGuidance:
    classifier: NoisyClassifier
    scale: float

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
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            tt = torch.full((len(x),), t, dtype=torch.long, device=x.device)
            (grad,) = torch.autograd.grad(self.classifier.log_prob(xg, tt, y).sum(), xg)
        eps = eps - self.scale * (1 - alpha_bar(model.scheduler, t)).sqrt() * grad
        mean, sigma, _ = ddim_step(model.scheduler, x, eps, t, t_prev, cfg.eta)
        return mean + sigma * z
