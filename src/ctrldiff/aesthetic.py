"""Aesthetic oracle of the paper scale: open_clip image features and the LAION predictor's MLP head.

The backbone comes from a local folder in open_clip's ``local-dir`` layout (``open_clip_config.json``
with ``model_cfg`` and ``preprocess_cfg``, beside the weights), the head from a local file with the
LAION "improved aesthetic predictor" layout (``layers.{0,2,4,6,7}``; Linear 768-1024-128-64-16-1).
Nothing is downloaded: a missing folder, a missing file or a head that does not fit the backbone's
feature size fails naming the file.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ctrldiff.oracles import to_model_space


class AestheticError(ValueError):
    """A scorer that cannot be built from the given files; the message names the file."""


class AestheticHead(nn.Module):
    """The LAION predictor's MLP on L2-normalised CLIP image embeddings (dropout is a no-op in eval)."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features).squeeze(-1)


class AestheticScorer(nn.Module):
    """Images in [-1, 1] (N, 3, H, W) -> predicted mean human score (1..10 on AVA's scale)."""

    def __init__(self, clip: nn.Module, head: AestheticHead, mean: tuple, std: tuple, image_size: int):
        super().__init__()
        self.clip, self.head, self.image_size = clip.eval(), head.eval(), image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate((x + 1) / 2, size=self.image_size, mode="bicubic", align_corners=False)
        features = self.clip.encode_image((x.clamp(0, 1) - self.mean) / self.std)
        return self.head(F.normalize(features.float(), dim=-1))

    @torch.no_grad()
    def score(self, pixels: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """The oracle on uint8 RGB images (N, H, W, 3) as stored."""
        out = [self(to_model_space(pixels[i : i + batch_size])) for i in range(0, len(pixels), batch_size)]
        return torch.cat(out).numpy().astype(float) if out else np.zeros(0)


def _load_head(path: Path, embed_dim: int) -> AestheticHead:
    if not path.is_file():
        raise AestheticError(f"aesthetic.head: head weights {path} not found")
    if path.suffix == ".safetensors":
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    first = state.get("layers.0.weight")
    if first is None:
        raise AestheticError(
            f"aesthetic.head: {path} has no layers.0.weight (not the LAION predictor layout)"
        )
    if first.shape[1] != embed_dim:
        raise AestheticError(
            f"aesthetic.head: {path} expects {first.shape[1]}-d CLIP features, "
            f"but the backbone gives {embed_dim}-d ones (wrong head for this CLIP model?)"
        )
    head = AestheticHead(embed_dim)
    try:
        head.load_state_dict(state)
    except RuntimeError as err:
        raise AestheticError(f"aesthetic.head: {path} does not fit the predictor's layout: {err}") from err
    return head


@functools.cache
def load_scorer(clip_dir: str, head_path: str) -> AestheticScorer:
    """Build the scorer once per process from a local open_clip folder and a head file."""
    import open_clip

    folder = Path(clip_dir)
    if not (folder / "open_clip_config.json").is_file():
        raise AestheticError(
            f"aesthetic.clip: {folder} is not an open_clip folder (no open_clip_config.json; "
            "see the README's paper-scale section for the layout)"
        )
    try:
        clip, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    except (OSError, ValueError, RuntimeError) as err:
        raise AestheticError(f"aesthetic.clip: cannot load open_clip from {folder}: {err}") from err
    cfg = clip.visual.preprocess_cfg
    size = cfg["size"]
    scorer = AestheticScorer(
        clip,
        _load_head(Path(head_path), clip.visual.output_dim),
        tuple(cfg["mean"]),
        tuple(cfg["std"]),
        size if isinstance(size, int) else size[0],
    )
    return scorer
