"""The pre-trained model p_pre(x | c): a Stable-Diffusion-shaped denoiser and its conditioner.

The embedded base is a small ``UNet2DConditionModel`` whose ``encoder_hidden_states`` come from a
learned embedding of the digit class, the way Stable Diffusion's come from its text encoder. So
CTRL, the sampler and every baseline run one code path at both scales, and the UNet's own
``class_embedding`` slot stays free for the new control y. c is always an integer: a digit class,
or an index into the prompt list at paper scale; c = ``null_index`` is the NULL condition used by
classifier-free guidance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from ctrldiff.ddim import training_target
from ctrldiff.params import BaseParams


class BaseModelError(ValueError):
    """A base model that is missing, corrupt, or asked for a class it does not know."""


class ClassEncoder(nn.Module):
    """Digit class -> one conditioning token (B, 1, dim); row ``num_classes`` is the NULL class."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes, self.dim = num_classes, dim
        self.embed = nn.Embedding(num_classes + 1, dim)

    @property
    def null_index(self) -> int:
        return self.num_classes

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return self.embed(c)[:, None, :]


class PromptEncoder(nn.Module):
    """Prompt index -> CLIP text hidden states (B, L, d); row ``len(prompts)`` is "" (NULL).

    The text encoder is frozen, so every prompt of the list is encoded once and looked up after.
    """

    def __init__(self, hidden: torch.Tensor, prompts: list[str]):
        super().__init__()
        self.prompts = prompts
        self.register_buffer("hidden", hidden)

    @property
    def null_index(self) -> int:
        return len(self.prompts)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return self.hidden[c]


def default_device() -> str:
    """Where sampling stages run: the GPU when there is one (Stable Diffusion needs it), else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class BaseModel:
    """Everything needed to sample from p_pre(x | c)."""

    unet: UNet2DConditionModel
    scheduler: DDIMScheduler
    encoder: nn.Module  # c -> encoder_hidden_states, with a ``null_index``
    meta: dict = field(default_factory=dict)  # kind, classes, resolution, channels
    vae: AutoencoderKL | None = None  # latent models (Stable Diffusion) decode before any reward

    @property
    def classes(self) -> list:
        return self.meta["classes"]

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        cfg = self.unet.config
        return (cfg.in_channels, cfg.sample_size, cfg.sample_size)

    @property
    def device(self) -> torch.device:
        """Where the UNet lives: the sampler puts its noise and requests there."""
        return next(self.unet.parameters()).device

    def to(self, device: str | torch.device) -> BaseModel:
        """Move the denoiser (with any adapter attached), the c-encoder and the VAE to ``device``."""
        for module in (self.unet, self.encoder, self.vae):
            if module is not None:
                module.to(device)
        return self

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Sampler space -> image space in [-1, 1] (identity for a pixel-space model)."""
        if self.vae is None:
            return x
        return self.vae.decode(x / self.vae.config.scaling_factor).sample

    def check_c(self, c: torch.Tensor) -> None:
        bad = c[(c < 0) | (c >= len(self.classes))]
        if len(bad):
            raise BaseModelError(
                f"requested c = {int(bad[0])} is not a class of this base model: 0..{len(self.classes) - 1}"
            )

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.unet.save_pretrained(directory / "unet")
        self.scheduler.save_pretrained(directory / "scheduler")
        enc = directory / "class_encoder"
        enc.mkdir(parents=True, exist_ok=True)
        save_file(self.encoder.state_dict(), enc / "model.safetensors")
        (enc / "config.json").write_text(
            json.dumps({"num_classes": self.encoder.num_classes, "dim": self.encoder.dim})
        )
        (directory / "base.json").write_text(json.dumps(self.meta, indent=2) + "\n")


def build_embedded(
    cfg: BaseParams, num_classes: int, resolution: int, channels: int, seed: int = 0
) -> BaseModel:
    """A fresh class-conditional UNet2DConditionModel and its class encoder, from params.

    The initial weights come from ``seed`` (drawn inside a forked RNG, so the caller's global
    stream is untouched): the same params give the same bytes on every run.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build_embedded(cfg, num_classes, resolution, channels)


def _build_embedded(cfg: BaseParams, num_classes: int, resolution: int, channels: int) -> BaseModel:
    n_blocks = len(cfg.block_out_channels)
    attn = cfg.attention_levels
    down = tuple("CrossAttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(n_blocks))
    up = tuple("CrossAttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(range(n_blocks)))
    unet = UNet2DConditionModel(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=down,
        up_block_types=up,
        layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cfg.cross_attention_dim,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        clip_sample=False,
        timestep_spacing="leading",
        prediction_type=cfg.prediction_type,
    )
    meta = {
        "kind": "embedded",
        "classes": list(range(num_classes)),
        "resolution": resolution,
        "channels": channels,
    }
    return BaseModel(unet, scheduler, ClassEncoder(num_classes, cfg.cross_attention_dim), meta)


def train_base(base: BaseModel, x: torch.Tensor, c: torch.Tensor, cfg: BaseParams, seed: int) -> list[float]:
    """Denoising training with label dropout to NULL, AdamW, cosine LR and an EMA.

    The denoiser learns the scheduler's prediction type (epsilon, v or x0).

    x: images in [-1, 1] (N, C, H, W); c: class indices. Returns the loss per step.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    noise_sched = DDPMScheduler.from_config(base.scheduler.config)
    params = [*base.unet.parameters(), *base.encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    lr_sched = get_cosine_schedule_with_warmup(opt, min(100, cfg.train_steps // 10), cfg.train_steps)
    ema = EMAModel(params, decay=cfg.ema_decay)
    base.unet.train()
    losses = []
    bar = tqdm(range(cfg.train_steps), desc="base", unit="step", mininterval=5)
    for _ in bar:
        idx = torch.randint(0, len(x), (cfg.batch_size,), generator=gen)
        x0, cond = x[idx], c[idx].clone()
        cond[torch.rand(len(cond), generator=gen) < cfg.cond_dropout] = base.encoder.null_index
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(x0),), generator=gen)
        pred = base.unet(noise_sched.add_noise(x0, noise, t), t, base.encoder(cond)).sample
        loss = F.mse_loss(pred, training_target(noise_sched, x0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        ema.step(params)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}", refresh=False)
    ema.copy_to(params)
    base.unet.eval()
    return losses


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-empty line; an absent or empty file fails naming it."""
    path = Path(path)
    if not path.is_file():
        raise BaseModelError(f"base.prompts: prompt file {path} does not exist")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise BaseModelError(f"base.prompts: prompt file {path} is empty")
    return prompts


@torch.no_grad()
def load_stable_diffusion(pretrained: str, prompts: list[str]) -> BaseModel:
    """Stable Diffusion components from a hub id or a local diffusers folder, conditioned on a prompt list."""
    from transformers import CLIPTextModel, CLIPTokenizer

    local = Path(pretrained)
    if (pretrained.startswith((".", "/")) or local.exists()) and not (local / "model_index.json").is_file():
        raise BaseModelError(
            f"base.pretrained: {pretrained} is not a diffusers Stable Diffusion folder (no model_index.json)"
        )
    try:
        unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet").eval()
        vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae").eval()
        tokenizer = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder").eval()
        scheduler = DDIMScheduler.from_pretrained(pretrained, subfolder="scheduler")
    except (OSError, ValueError) as err:
        raise BaseModelError(
            f"base.pretrained: cannot load Stable Diffusion from {pretrained}: {err}"
        ) from err
    scheduler.register_to_config(clip_sample=False, timestep_spacing="leading")
    scheduler = DDIMScheduler.from_config(scheduler.config)
    tokens = tokenizer(
        [*prompts, ""],
        padding="max_length",
        max_length=text_encoder.config.max_position_embeddings,
        truncation=True,
        return_tensors="pt",
    )
    hidden = text_encoder(tokens.input_ids)[0]
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    meta = {
        "kind": "stable-diffusion",
        "pretrained": pretrained,
        "classes": list(range(len(prompts))),
        "prompts": prompts,
        "resolution": unet.config.sample_size * scale,
        "channels": vae.config.in_channels,
    }
    return BaseModel(unet, scheduler, PromptEncoder(hidden, prompts), meta, vae=vae)


def load_base(directory: str | Path) -> BaseModel:
    """Load a base model saved by the `base` stage; a missing or corrupt one fails naming the path."""
    directory = Path(directory)
    meta_path = directory / "base.json"
    if not meta_path.is_file():
        raise BaseModelError(
            f"{directory}: no base model here (base.json missing); run the `base` stage first"
        )
    meta = json.loads(meta_path.read_text())
    if meta["kind"] == "stable-diffusion":
        return load_stable_diffusion(meta["pretrained"], meta["prompts"])
    try:
        unet = UNet2DConditionModel.from_pretrained(directory / "unet").eval()
        scheduler = DDIMScheduler.from_pretrained(directory / "scheduler")
        enc_cfg = json.loads((directory / "class_encoder" / "config.json").read_text())
        encoder = ClassEncoder(**enc_cfg)
        encoder.load_state_dict(load_file(directory / "class_encoder" / "model.safetensors"))
    except Exception as err:  # truncated weights, broken JSON, wrong shapes
        raise BaseModelError(
            f"{directory}: cannot load the base model ({type(err).__name__}: {err})"
        ) from err
    return BaseModel(unet, scheduler, encoder.eval(), meta)
