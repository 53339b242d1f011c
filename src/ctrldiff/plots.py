"""Figures people would rather look at than read, written as PNG files registered as DVC plots."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ctrldiff.io import atomic_path  # noqa: E402


def reliability_diagram(path: str | Path, before: dict, after: dict, title: str) -> None:
    """Accuracy against confidence per bin, before and after temperature scaling."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 4), sharey=True)
    for ax, rel, name in ((axes[0], before, "before"), (axes[1], after, "after")):
        n = len(rel["count"])
        centers = [(i + 0.5) / n for i in range(n)]
        used = [i for i, k in enumerate(rel["count"]) if k > 0]
        ax.bar(
            [centers[i] for i in used],
            [rel["accuracy"][i] for i in used],
            width=1 / n,
            edgecolor="black",
            alpha=0.7,
            label="accuracy",
        )
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.plot(
            [rel["confidence"][i] for i in used], [rel["accuracy"][i] for i in used], "r.", label="bin mean"
        )
        ax.set(
            title=f"{name} calibration, ECE {rel['ece']:.3f}", xlabel="confidence", xlim=(0, 1), ylim=(0, 1)
        )
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def sample_grid(
    path: str | Path, pixels, rows: list[int], cols: list[int], row_label: str, col_label: str, title: str
) -> None:
    """A grid of images: ``pixels[i]`` goes to row ``rows[i]``, column ``cols[i]`` (first one wins)."""
    n_rows, n_cols = max(rows) + 1, max(cols) + 1
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(0.9 * n_cols + 0.6, 0.9 * n_rows + 0.6), squeeze=False)
    placed = set()
    for img, r, c in zip(pixels, rows, cols, strict=True):
        if (r, c) not in placed:
            axes[r][c].imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
            placed.add((r, c))
    for r in range(n_rows):
        for c in range(n_cols):
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
        axes[r][0].set_ylabel(f"{row_label}={r}", fontsize=8)
    for c in range(n_cols):
        axes[0][c].set_title(f"{col_label}={c}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=70)
    plt.close(fig)


def line_plot(
    path: str | Path, x: list[float], series: dict[str, list[float]], xlabel: str, ylabel: str, title: str
) -> None:
    """One line per series against a shared x on a log axis (e.g. metrics against dataset size)."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, values in series.items():
        ax.plot(x, values, marker="o", label=name)
    ax.set(xscale="log", xlabel=xlabel, ylabel=ylabel, title=title, ylim=(0, 1))
    ax.set_xticks(x, [f"{v:g}" for v in x])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def parity_plot(path: str | Path, requested, achieved, unit: str, title: str) -> None:
    """Achieved against requested values, each image a dot, each target's mean a cross, y = x dashed."""
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(requested, achieved, s=8, alpha=0.4, label="image")
    requested, achieved = np.asarray(requested, dtype=float), np.asarray(achieved, dtype=float)
    targets = np.unique(requested)
    ax.plot(targets, [achieved[requested == t].mean() for t in targets], "rx", ms=7, label="mean per target")
    lo, hi = min(requested.min(), achieved.min()), max(requested.max(), achieved.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="achieved = requested")
    ax.set(xlabel=f"requested ({unit})", ylabel=f"achieved, oracle ({unit})", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
