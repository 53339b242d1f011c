"""Stage `compare`: every evaluated method side by side (metrics/compare.md), and the headline
scalars in one flat file (metrics/summary.json), so that `dvc metrics diff` is a handful of lines.

The methods are the evaluation files named on the command line (dvc.yaml lists them), in order.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ctrldiff.io import atomic_path, read_json, write_json

HEADER = (
    "| method | scale | accuracy | macro-F1 | c_accuracy | Fréchet | denoiser calls / image "
    "| of which back-propagated | s / image |\n"
    "|---|---|---|---|---|---|---|---|---|\n"
)


def row(m: dict) -> str:
    task, fid, cost = m["tasks"]["compressibility"], m["fidelity"], m["cost"]
    scale = "" if m.get("scale") is None else f"{m['scale']:g}"
    return (
        f"| {m['method']} | {scale} | {task['accuracy']:.3f} | {task['macro_f1']:.3f} "
        f"| {fid['c_accuracy']:.3f} | {fid['frechet']:.2f} | {cost['nfe_per_image']:.0f} "
        f"| {cost.get('backprop_nfe_per_image', 0):.0f} | {cost['seconds_per_image']:.3f} |\n"
    )


def summary(evals: list[dict]) -> dict:
    """{method: {accuracy, macro_f1, c_accuracy, frechet}}: what a reader compares across runs."""
    out = {}
    for m in evals:
        task, fid = m["tasks"]["compressibility"], m["fidelity"]
        out[m["method"]] = {
            "accuracy": round(task["accuracy"], 4),
            "macro_f1": round(task["macro_f1"], 4),
            "c_accuracy": round(fid["c_accuracy"], 4),
            "frechet": round(fid["frechet"], 3),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("evals", nargs="+", type=Path, help="metrics/eval/<method>.json files")
    parser.add_argument("--out", default=Path("metrics"), type=Path)
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.evals if not p.is_file()]
    if missing:
        raise SystemExit(f"compare: missing {', '.join(missing)}; run the evaluate stages first")
    found = [read_json(p) for p in args.evals]
    ref = found[0]["fidelity"]
    text = (
        "# Compressibility control: every method on the same requests and seeds\n\n"
        f"{found[0]['n_per_class']} images per requested class; oracle JPEG labels; c_accuracy and Fréchet "
        f"from the digit classifier (held-out real digits: c_accuracy {ref['c_accuracy_real_heldout']:.3f}, "
        f"Fréchet {ref['frechet_real_heldout']:.2f}). Denoiser calls are counted, seconds measured.\n\n"
        + HEADER
        + "".join(row(m) for m in found)
    )
    with atomic_path(args.out / "compare.md") as tmp:
        tmp.write_text(text)
    write_json(args.out / "summary.json", summary(found))
    print(text)


if __name__ == "__main__":
    main()
