"""A compressibility classifier built on JPEG's own transform: p̂(y | x) from a predicted size in bytes.

A JPEG file's size is the cost of coding, block by block, the quantised 8x8 DCT coefficients. This
model computes those coefficients as the encoder does (edge padding, level shift, DCT, the quality's
quantisation table), softens the rounding so that it is differentiable, and predicts the size as a
linear function of per-position summaries: how many blocks have the coefficient nonzero, and how many
magnitude bits they carry. Classes follow from the size by a cumulative-logit (ordinal) model whose cut
points are the classes' thresholds in bytes. Only the 130 weights, a bias and the logistic scale are
learned from the labelled pairs, so the model carries over from real digits to the base's samples,
whose faint background haze a CNN trained on black backgrounds misjudges (README, "a JPEG-aware reward").
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ITU T.81 Annex K luminance table, scaled by libjpeg's quality rule (what Pillow uses).
_LUMA = [
    [16, 11, 10, 16, 24, 40, 51, 61],
    [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77],
    [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101],
    [72, 92, 95, 98, 112, 100, 103, 99],
]
_FAR = 1e4  # stands for ±infinity at the open ends (an infinite cut point makes NaN gradients)


def quantisation_table(quality: int) -> torch.Tensor:
    """libjpeg's luminance quantisation table at ``quality`` (1-100), as an 8x8 float tensor."""
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return ((torch.tensor(_LUMA) * scale + 50) // 100).clamp(1, 255).float()


def dct_matrix() -> torch.Tensor:
    """The orthonormal 8-point DCT-II matrix: JPEG's 2-D transform of a block B is D @ B @ D.T."""
    k = torch.arange(8, dtype=torch.float64)
    d = torch.cos((2 * k[None] + 1) * k[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    d[0] /= math.sqrt(2)
    return d.float()


def ordinal_log_probs(size: torch.Tensor, thresholds: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """log P(class | size) when the true size is logistic around ``size`` with ``scale``.

    ``thresholds`` are ascending; class 0 is the largest size (the least compressible), as in
    ``labels.bin_scores``. log(σ(b) - σ(a)) = log σ(b) + log σ(-a) + log(1 - e^(a - b)), stable in both tails.
    """
    far = thresholds.new_tensor([_FAR])
    edges = torch.cat([-far, thresholds, far])
    z = (edges[None, :] - size[:, None]) / scale
    a, b = z[:, :-1], z[:, 1:]
    log_p = F.logsigmoid(b) + F.logsigmoid(-a) + torch.log1p(-torch.exp((a - b).clamp(max=-1e-6)))
    return log_p.flip(1)  # ascending bins are the smallest sizes first: the highest class first


def soft_abs(z: torch.Tensor) -> torch.Tensor:
    """|z|, smoothed at 0 so that its gradient stays finite."""
    return (z * z + 1e-6).sqrt()


@torch.no_grad()
def _in_chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, size: int = 1024) -> torch.Tensor:
    """fn over x in chunks of ``size`` rows, without autograd: bounded memory on a whole dataset."""
    return torch.cat([fn(x[i : i + size]) for i in range(0, len(x), size)])


class JpegSizeNet(nn.Module):
    """Single-channel images in [-1, 1] -> class log-probabilities, through a predicted JPEG size."""

    def __init__(self, quality: int, thresholds: list[float], softness: float = 0.1):
        super().__init__()
        self.softness = softness  # width, in quantisation steps, of the soft "rounds to nonzero" step
        self.register_buffer("dct", dct_matrix())
        self.register_buffer("table", quantisation_table(quality))
        self.register_buffer("thresholds", torch.tensor(sorted(thresholds), dtype=torch.float32))
        self.weight = nn.Parameter(torch.zeros(2 * 64 + 2))
        self.bias = nn.Parameter(torch.zeros(()))
        self.log_scale = nn.Parameter(torch.zeros(()))

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """(N, blocks, 64): each 8x8 block's DCT in quantisation steps, row-major within the block."""
        if x.shape[1] != 1:
            raise ValueError(f"JpegSizeNet models single-channel JPEG; got {x.shape[1]} channels")
        levels = (x[:, 0].clamp(-1, 1) + 1) * 127.5  # the 8-bit levels the image is stored as
        h, w = levels.shape[-2:]
        levels = F.pad(levels[:, None], (0, -w % 8, 0, -h % 8), mode="replicate")[:, 0] - 128
        blocks = levels.unfold(1, 8, 8).unfold(2, 8, 8).flatten(1, 2)  # (N, blocks, 8, 8)
        return (self.dct @ blocks @ self.dct.T / self.table).flatten(2)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 130): per position, the soft count of nonzero coefficients and their magnitude bits
        summed over blocks; the bits of the DC differences (DC is coded as a difference to the
        previous block's); the soft count of blocks with no nonzero AC coefficient."""
        z = self.coefficients(x)
        magnitude = soft_abs(z)
        nonzero = torch.sigmoid((magnitude - 0.5) / self.softness)  # rounds to a nonzero integer
        bits = torch.log2(1 + magnitude) * nonzero
        dc = z[..., 0]
        dc_step = torch.diff(dc, dim=1, prepend=torch.zeros_like(dc[:, :1]))
        dc_bits = torch.log2(1 + soft_abs(dc_step)).sum(1, keepdim=True)
        empty = torch.prod(1 - nonzero[..., 1:], -1).sum(1, keepdim=True)
        return torch.cat([nonzero.sum(1), bits.sum(1), dc_bits, empty], 1)

    def size(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted JPEG size in bytes."""
        return self.features(x) @ self.weight + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class log-probabilities (they serve as logits: their softmax is the distribution itself)."""
        return ordinal_log_probs(self.size(x), self.thresholds, self.log_scale.exp())


def fit_jpeg_size(
    x: torch.Tensor,
    y: torch.Tensor,
    quality: int,
    thresholds: list[float],
    class_weights: torch.Tensor | None = None,
) -> JpegSizeNet:
    """Maximum likelihood of the labels ``y`` under the ordinal model, by L-BFGS on the whole set.

    Only class labels are used, as for any classifier. The features are computed once and
    standardised for the optimiser; the standardisation is folded back into the weights.
    """
    net = JpegSizeNet(quality, thresholds)
    feats = _in_chunks(net.features, x).double()
    mean, sd = feats.mean(0), feats.std(0).clamp(min=1e-6)
    std_feats = (feats - mean) / sd
    cuts = net.thresholds.double()
    weight = torch.zeros(feats.shape[1], dtype=torch.float64, requires_grad=True)
    bias = cuts.mean().clone().requires_grad_(True)
    log_scale = torch.tensor(math.log(float(cuts.max() - cuts.min()) + 1.0), dtype=torch.float64)
    log_scale.requires_grad_(True)
    example_weights = (class_weights.double() if class_weights is not None else torch.ones(int(y.max()) + 1))[
        y
    ]
    opt = torch.optim.LBFGS([weight, bias, log_scale], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        log_p = ordinal_log_probs(std_feats @ weight + bias, cuts, log_scale.exp())
        loss = -(log_p.gather(1, y[:, None]).squeeze(1) * example_weights).sum() / example_weights.sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        w = weight / sd
        net.weight.copy_(w.float())
        net.bias.copy_((bias - (w * mean).sum()).float())
        net.log_scale.copy_(log_scale.float())
    return net.eval()


def size_errors(net: JpegSizeNet, x: torch.Tensor, sizes: np.ndarray) -> dict:
    """Bias and spread, in bytes, of the predicted sizes against the oracle's."""
    pred = _in_chunks(net.size, x).numpy()
    err = pred - np.asarray(sizes, dtype=float)
    return {
        "bias_bytes": float(err.mean()),
        "sd_bytes": float(err.std()),
        "mae_bytes": float(np.abs(err).mean()),
    }
