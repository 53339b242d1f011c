"""The augmented model: the frozen base plus the only parameters CTRL trains.

1. A y-embedding table of K + 1 rows, zero-initialised, put in the UNet's ``class_embedding``
   slot, so diffusers adds it to the timestep embedding. Row K is NULL (used by classifier-free
   guidance and by the reference pass); a mask keeps it exactly zero forever.
2. LoRA adapters (peft, through diffusers' ``add_adapter``) on the attention projections (the
   paper) and optionally the ResNet convolutions, with B = 0 at initialisation.

Both start as exact no-ops, so the augmented model equals the base at step 0. The frozen
reference p_pre is the same module with the adapters disabled and y = NULL: no second UNet.

A control may also leave the last steps of the chain to the base (``uncontrolled_t``): the steps
out of t <= uncontrolled_t take the base's kernel, in training, in the KL and in sampling alike.
The last stochastic step has the smallest sigma, so a change of texture there is the dearest in
KL per unit of reward; the embedded benchmark's back-propagation spent two thirds of its KL there
(docs/experiments.md, "where the KL goes").
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from peft import LoraConfig, get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ctrldiff.base import BaseModel
from ctrldiff.ddim import control_is_off, step_sigma, timestep_pairs
from ctrldiff.sampling import SamplerConfig, ddim_cfg_step

ATTENTION_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0"]
RESNET_CONVS = ["conv1", "conv2"]  # every ResNet block's two 3x3 convolutions
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' file name for LoRA weights
LORA_PREFIX = StableDiffusionLoraLoaderMixin.unet_name  # "unet": the key prefix pipelines load


class YEmbedding(nn.Module):
    """Embedding(K + 1, d) whose NULL row K is held at zero by a mask (so its gradient is zero too).

    ``labels`` may be class indices (B,) or convex weights over the K classes (B, K) for a
    continuous target, which interpolates the learned rows without retraining.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.zeros(num_classes + 1, dim))
        mask = torch.ones(num_classes + 1, 1)
        mask[num_classes] = 0.0
        self.register_buffer("mask", mask, persistent=False)

    @property
    def null_index(self) -> int:
        return self.num_classes

    def table(self) -> torch.Tensor:
        return self.weight * self.mask

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        table = self.table()
        if labels.is_floating_point():
            return labels @ table[: self.num_classes]
        return table[labels]


@dataclass
class ControlledModel:
    """A base model with a y-embedding and LoRA attached; ``base.unet`` is modified in place."""

    base: BaseModel
    y_classes: list
    lora_rank: int
    lora_targets: list[str]
    uncontrolled_t: int | None = None  # the steps out of t <= this keep the base's kernel; None: none

    @property
    def y_embedding(self) -> YEmbedding:
        return self.base.unet.class_embedding

    @property
    def y_null(self) -> int:
        return self.y_embedding.null_index

    def is_off(self, scheduler, t: int, t_prev: int, eta: float) -> bool:
        """Whether the step t -> t_prev is the base's own: a deterministic step of a stochastic chain
        (``ddim.control_is_off``) or one this control leaves to the base (``uncontrolled_t``)."""
        left = self.uncontrolled_t is not None and t <= self.uncontrolled_t
        return left or control_is_off(scheduler, t, t_prev, eta)

    def trainable_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(LoRA parameters, y-embedding parameters): they get separate learning rates."""
        lora = [p for n, p in self.base.unet.named_parameters() if "lora_" in n]
        return lora, list(self.y_embedding.parameters())

    @contextmanager
    def reference(self) -> Iterator[None]:
        """Within this block the UNet is the frozen pre-trained one (adapters off; pass y = NULL)."""
        self.base.unet.disable_adapters()
        try:
            yield
        finally:
            self.base.unet.enable_adapters()

    def save(self, directory: str | Path) -> None:
        """The LoRA in diffusers' pipeline layout (``lora/pytorch_lora_weights.safetensors``, keys
        prefixed ``unet.``, as ``save_lora_weights`` writes them), and beside it the y-embedding as
        safetensors and ``control.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        unet = self.base.unet
        metadata = unet.peft_config["default"].to_dict()
        # peft keeps target_modules as a set, whose order varies between processes: saved as is, the
        # same tensors gave other bytes on every run (and DVC reran everything downstream).
        if isinstance(metadata.get("target_modules"), set):
            metadata["target_modules"] = sorted(metadata["target_modules"])
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            directory / "lora",
            unet_lora_layers=get_peft_model_state_dict(unet),
            unet_lora_adapter_metadata=metadata,
        )
        _one_metadata_key(directory / "lora" / LORA_WEIGHTS)
        save_file(
            {"weight": self.y_embedding.table().detach().contiguous()}, directory / "y_embedding.safetensors"
        )
        info = {
            "y_classes": self.y_classes,
            "lora_rank": self.lora_rank,
            "lora_targets": self.lora_targets,
            "dim": self.y_embedding.weight.shape[1],
            "uncontrolled_t": self.uncontrolled_t,
        }
        (directory / "control.json").write_text(json.dumps(info, indent=2) + "\n")


class ControlledStep:
    """A controlled model's sampling step, as CTRL's rollouts take it: the guided DDIM step with y,
    and the base's own step (adapters off, y NULL) where ``ControlledModel.is_off``."""

    def __init__(self, control: ControlledModel):
        self.control = control

    def __call__(
        self,
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
        if y is None or not self.control.is_off(model.scheduler, t, t_prev, cfg.eta):
            return ddim_cfg_step(model, x, t, t_prev, z, c, cfg, y, y_null)
        null = torch.zeros_like(y) if y.is_floating_point() else torch.full_like(y, y_null)
        with self.control.reference():
            return ddim_cfg_step(model, x, t, t_prev, z, c, cfg, null, y_null)


def _one_metadata_key(path: Path) -> None:
    """Rewrite a LoRA file with only diffusers' adapter metadata (dropping {"format": "pt"}, which no
    loader reads): safetensors writes a header's metadata keys in a per-process hash order, so with
    two keys the same tensors gave other bytes from run to run."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    kept = {k: v for k, v in metadata.items() if k == LORA_ADAPTER_METADATA_KEY}
    save_file(tensors, str(path), metadata=kept or None)


def _attach_y(base: BaseModel, y_classes: list) -> YEmbedding:
    """Freeze the base and put a zero y-embedding in the UNet's class_embedding slot."""
    base.unet.requires_grad_(False)
    base.encoder.requires_grad_(False)
    dim = base.unet.time_embedding.linear_2.out_features
    base.unet.class_embedding = YEmbedding(len(y_classes), dim)
    return base.unet.class_embedding


def uncontrolled_from(scheduler, steps: int, eta: float, last: int) -> int | None:
    """The ``uncontrolled_t`` that leaves the last ``last`` stochastic steps of the ``steps``-step
    DDIM grid to the base (None for 0): the t those steps start from is at most this."""
    stochastic = [
        t
        for t, t_prev in timestep_pairs(scheduler, steps)
        if float(step_sigma(scheduler, t, t_prev, eta)) > 0
    ]
    if last > len(stochastic):
        raise ValueError(
            f"finetune.base_last_steps = {last}: the {steps}-step chain has only "
            f"{len(stochastic)} stochastic steps"
        )
    return stochastic[-last] if last else None


def add_control(
    base: BaseModel,
    y_classes: list,
    lora_rank: int,
    lora_targets: list[str] | None = None,
    uncontrolled_t: int | None = None,
) -> ControlledModel:
    """Freeze the base, attach a zero y-embedding and LoRA(rank) on ``lora_targets``.

    ``lora_targets`` are module-name suffixes (peft's ``target_modules``); default: attention.
    ``uncontrolled_t``: the steps out of t <= it keep the base's kernel (``uncontrolled_from``).
    """
    lora_targets = list(lora_targets or ATTENTION_PROJECTIONS)
    _attach_y(base, y_classes)
    config = LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=lora_targets)
    base.unet.add_adapter(config)  # peft's default init: B = 0, so the adapter starts as a no-op
    base.unet.class_embedding.requires_grad_(True)  # peft froze everything but the adapter
    return ControlledModel(base, list(y_classes), lora_rank, lora_targets, uncontrolled_t)


def load_control(base: BaseModel, directory: str | Path) -> ControlledModel:
    """Base + saved adapter -> a ControlledModel ready to sample(c, y)."""
    directory = Path(directory)
    info_path = directory / "control.json"
    if not info_path.is_file():
        raise FileNotFoundError(
            f"{directory}: no CTRL adapter here (control.json missing); run `finetune` first"
        )
    info = json.loads(info_path.read_text())
    y_embedding = _attach_y(base, info["y_classes"])
    base.unet.load_lora_adapter(str(directory / "lora"), prefix=LORA_PREFIX, use_safetensors=True)
    y_embedding.requires_grad_(True)
    with torch.no_grad():
        y_embedding.weight.copy_(load_file(directory / "y_embedding.safetensors")["weight"])
    return ControlledModel(
        base,
        info["y_classes"],
        info["lora_rank"],
        info.get("lora_targets", ATTENTION_PROJECTIONS),
        info.get("uncontrolled_t"),
    )
