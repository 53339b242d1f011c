"""Shared tiny models: built from configs with random weights, fast enough for unit tests."""

import socket
from pathlib import Path

import pytest
import torch

from ctrldiff.base import BaseModel, build_embedded
from ctrldiff.params import BaseParams, FinetuneParams, RolloutParams

MICRO = BaseParams(
    block_out_channels=[16, 32],
    attention_levels=[1],
    cross_attention_dim=16,
    attention_head_dim=8,
    norm_num_groups=8,
    train_steps=3,
    batch_size=8,
)


def micro_base(seed: int = 0, num_classes: int = 3) -> BaseModel:
    """A 8x8, 1-channel class-conditional base with random weights (eval mode)."""
    torch.manual_seed(seed)
    base = build_embedded(MICRO, num_classes=num_classes, resolution=8, channels=1, seed=seed)
    base.unet.eval()
    return base


@pytest.fixture
def base() -> BaseModel:
    return micro_base()


def micro_reward(num_classes: int = 4, seed: int = 3, in_channels: int = 1):
    """A random (but seeded, so identical on every process) reward classifier for small images."""
    from ctrldiff.classifier import Classifier, SmallCNN

    torch.manual_seed(seed)
    arch = {"in_channels": in_channels, "num_classes": num_classes, "width": 8}
    return Classifier(SmallCNN(**arch), arch, meta={"classes": list(range(num_classes))}).eval()


# Label metadata of a 4-class compressibility task, for the probe's oracle.
LABEL_META = {
    "tasks": {
        "compressibility": {
            "score": "jpeg_bytes",
            "thresholds": [300.0, 250.0, 200.0],
            "jpeg_quality": 95,
            "classes": [0, 1, 2, 3],
        }
    }
}


def micro_finetune(**overrides) -> FinetuneParams:
    """CTRL settings small enough for a micro base: 2 trajectories of 3 steps, gradients through 2."""
    small = {"rollout": RolloutParams(steps=3), "batch_size": 2, "grad_steps": 2, "lr_lora": 1e-2}
    return FinetuneParams(**(small | {"lr_embedding": 1e-1} | overrides))


def free_port() -> int:
    """A free TCP port for a torchrun rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def output_files(repo: Path) -> dict[str, bytes]:
    """Every file under the stages' output folders (data/, models/, metrics/), by path."""
    return {
        str(p.relative_to(repo)): p.read_bytes()
        for top in ("data", "models", "metrics")
        for p in sorted((repo / top).rglob("*"))
        if p.is_file()
    }
