"""Stage `compare`: every evaluated method side by side, as a Markdown table (metrics/compare.md)."""

from __future__ import annotations

from pathlib import Path

from ctrldiff.io import atomic_path, read_json
from ctrldiff.methods import METHODS

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


def main() -> None:
    found = [read_json(p) for m in METHODS if (p := Path(f"metrics/eval/{m}.json")).is_file()]
    if not found:
        raise SystemExit("compare: no metrics/eval/<method>.json yet; run the evaluate stages first")
    ref = found[0]["fidelity"]
    text = (
        "# Compressibility control: every method on the same requests and seeds\n\n"
        f"{found[0]['n_per_class']} images per requested class; oracle JPEG labels; c_accuracy and Fréchet "
        f"from the digit classifier (held-out real digits: c_accuracy {ref['c_accuracy_real_heldout']:.3f}, "
        f"Fréchet {ref['frechet_real_heldout']:.2f}). Denoiser calls are counted, seconds measured.\n\n"
        + HEADER
        + "".join(row(m) for m in found)
    )
    with atomic_path("metrics/compare.md") as tmp:
        tmp.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
