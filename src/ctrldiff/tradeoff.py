"""The trade-off figure: each method's accuracy against its fidelity (c_accuracy) across its knob's values.

The guidance baselines' curves are their tuning sweeps (each scale on the tuning seeds, the `tune`
stage), with the chosen scale starred; CTRL, the base and the optimum are points on the evaluation
requests. The floor that the choice rule keeps to is a dashed line.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ctrldiff.io import atomic_path  # noqa: E402


def tradeoff_plot(
    path: str | Path, sweeps: list[dict], points: dict[str, tuple[float, float]], floor: float | None
) -> None:
    """``sweeps``: the tune stage's records ({method, sweep: [{scale, accuracy, c_accuracy}], chosen});
    ``points``: {name: (c_accuracy, accuracy)}; ``floor``: the rule's minimum c_accuracy."""
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    for record in sweeps:
        sweep = record["sweep"]
        xs, ys = [s["c_accuracy"] for s in sweep], [s["accuracy"] for s in sweep]
        (line,) = ax.plot(xs, ys, marker="o", alpha=0.8, label=record["method"])
        for s in sweep:
            ax.annotate(
                f"{s['scale']:g}",
                (s["c_accuracy"], s["accuracy"]),
                fontsize=6,
                xytext=(3, 3),
                textcoords="offset points",
                color=line.get_color(),
            )
        chosen = record["chosen"]
        ax.plot(chosen["c_accuracy"], chosen["accuracy"], marker="*", ms=13, color=line.get_color())
    for name, (x, y) in points.items():
        ax.plot(x, y, marker="D", ms=7, linestyle="none", label=name)
    if floor is not None:
        ax.axvline(floor, color="grey", linestyle="--", linewidth=1)
    ax.set(
        xlabel="c_accuracy (fidelity to the base's class c)",
        ylabel="accuracy (oracle, requested y)",
        title="Trade-off: curves over each method's scale (tuning seeds, ★ chosen);\n"
        "diamonds on the evaluation requests",
        ylim=(0, 1),
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
