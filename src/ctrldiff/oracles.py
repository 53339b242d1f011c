"""Oracles: the true image properties the labels are made of, computed on 8-bit images as stored.

These are ground truth for evaluation; the learned classifiers only approximate them.
Generated images are first quantised exactly as a saved image would be (``to_uint8``).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Model-space images in [-1, 1], shape (N, C, H, W), to uint8 arrays (N, H, W[, 3]) as stored."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    x = x.permute(0, 2, 3, 1).numpy()
    return x[..., 0] if x.shape[-1] == 1 else x


def to_model_space(pixels: np.ndarray) -> torch.Tensor:
    """uint8 arrays (N, H, W[, 3]) to float tensors in [-1, 1], shape (N, C, H, W)."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).float()
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return x / 127.5 - 1.0


def jpeg_size(pixels: np.ndarray, quality: int = 95) -> int:
    """JPEG compressibility oracle: encoded size in bytes of one uint8 image at ``quality``."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.tell()


def ink_coverage(pixels: np.ndarray) -> float:
    """Ink oracle: the share of pixels brighter than mid-grey (MNIST digits are white on black)."""
    gray = pixels if pixels.ndim == 2 else pixels.mean(axis=-1)
    return float((gray >= 128).mean())


def oracle_scores(pixels: np.ndarray | list[np.ndarray], spec: dict) -> np.ndarray:
    """One task's oracle score of each uint8 image, by the task spec's ``score`` (see ``meta.json``)."""
    if spec["score"] == "jpeg_bytes":
        return np.array([jpeg_size(p, spec["jpeg_quality"]) for p in pixels], dtype=float)
    if spec["score"] == "ink":
        return np.array([ink_coverage(p) for p in pixels], dtype=float)
    if spec["score"] == "aesthetic":
        from ctrldiff.aesthetic import load_scorer  # open_clip is imported only where it is used

        rgb = np.stack([p if p.ndim == 3 else np.repeat(p[..., None], 3, axis=-1) for p in pixels])
        return load_scorer(spec["clip"], spec["head"]).score(rgb, spec.get("batch_size", 32))
    raise ValueError(f"no oracle for score {spec['score']!r}; known: jpeg_bytes, ink, aesthetic")
