"""Stage `compare`: every evaluated method side by side (reports/compare.md), the headline scalars in
one flat file (metrics/summary.json), so that `dvc metrics diff` is a handful of lines, and the
trade-off figure (metrics/tradeoff.png): accuracy against c_accuracy across each baseline's scale.

The methods are the evaluation files named on the command line (dvc.yaml lists them), in order.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ctrldiff.io import atomic_path, read_json, write_json
from ctrldiff.params import load_params
from ctrldiff.tradeoff import tradeoff_plot

HEADER = (
    "| method | scale | accuracy | macro-F1 | c_accuracy | Fréchet | E log p̂ | KL | objective "
    "| denoiser calls / image | of which back-propagated | s / image |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def objective(m: dict, gamma: float) -> dict:
    """CTRL's objective γ E log p̂(y | x0) − E KL where the KL is known (CTRL, the base, the optimum)."""
    terms = m.get("objective") or {}
    log_p, kl = terms.get("reward_log_p"), terms.get("kl")
    value = None if log_p is None or kl is None else gamma * log_p - kl
    return {"reward_log_p": log_p, "kl": kl, "objective": value}


def _f(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def row(m: dict, gamma: float) -> str:
    task, fid, cost = m["tasks"]["compressibility"], m["fidelity"], m.get("cost") or {}
    scale = "" if m.get("scale") is None else f"{m['scale']:g}"
    o = objective(m, gamma)
    return (
        f"| {m['method']} | {scale} | {task['accuracy']:.3f} | {task['macro_f1']:.3f} "
        f"| {fid['c_accuracy']:.3f} | {_f(fid.get('frechet'), 2)} | {_f(o['reward_log_p'], 3)} "
        f"| {_f(o['kl'], 2)} | {_f(o['objective'], 2)} | {_f(cost.get('nfe_per_image'), 0)} "
        f"| {_f(cost.get('backprop_nfe_per_image'), 0)} | {_f(cost.get('seconds_per_image'), 3)} |\n"
    )


def summary(evals: list[dict], gamma: float) -> dict:
    """{method: {accuracy, macro_f1, c_accuracy, frechet, objective}}: what a reader compares across runs."""
    out = {}
    for m in evals:
        task, fid = m["tasks"]["compressibility"], m["fidelity"]
        entry = {
            "accuracy": round(task["accuracy"], 4),
            "macro_f1": round(task["macro_f1"], 4),
            "c_accuracy": round(fid["c_accuracy"], 4),
        }
        if fid.get("frechet") is not None:
            entry["frechet"] = round(fid["frechet"], 3)
        value = objective(m, gamma)["objective"]
        if value is not None:
            entry["objective"] = round(value, 2)
        out[m["method"]] = entry
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("evals", nargs="+", type=Path, help="metrics/eval/<method>.json files")
    parser.add_argument("--out", default=Path("metrics"), type=Path, help="where summary.json goes")
    parser.add_argument("--report", default=Path("reports/compare.md"), type=Path, help="the markdown table")
    parser.add_argument("--optimum", type=Path, help="the optimum stage's metrics: the last row")
    parser.add_argument("--tune", nargs="*", default=[], type=Path, help="metrics/tune/<method>.json sweeps")
    parser.add_argument("--plot", default=Path("metrics/tradeoff.png"), type=Path, help="trade-off figure")
    args = parser.parse_args(argv)
    params = load_params("params.yaml")
    gamma = params.gamma
    missing = [str(p) for p in [*args.evals, *args.tune] if not p.is_file()]
    if missing:
        raise SystemExit(f"compare: missing {', '.join(missing)}; run the evaluate stages first")
    found = [read_json(p) for p in args.evals]
    ref = found[0]["fidelity"]
    if args.optimum:
        found.append(read_json(args.optimum))
    text = (
        "# Compressibility control: every method on the same requests and seeds\n\n"
        f"{found[0]['n_per_class']} images per requested class; oracle JPEG labels; c_accuracy and Fréchet "
        f"from the digit classifier (held-out real digits: c_accuracy {ref['c_accuracy_real_heldout']:.3f}, "
        f"Fréchet {ref['frechet_real_heldout']:.2f}). Denoiser calls are counted, seconds measured. "
        "E log p̂ is the reward's mean log-probability of the requested y; KL the mean trajectory KL "
        f"to the base (nats); objective = γ E log p̂ − KL at γ = {gamma:g}, what CTRL maximises. "
        "optimum: the base's own images reweighted by p̂(y | x)^γ (stage `optimum`), "
        "what an exact solver would reach among them.\n\n" + HEADER + "".join(row(m, gamma) for m in found)
    )
    with atomic_path(args.report) as tmp:
        tmp.write_text(text)
    write_json(args.out / "summary.json", summary(found, gamma))
    points = {
        m["method"]: (m["fidelity"]["c_accuracy"], m["tasks"]["compressibility"]["accuracy"])
        for m in found
        if m["method"] in ("base", "ctrl", "optimum")
    }
    sweeps = [read_json(p) for p in args.tune]
    tradeoff_plot(args.plot, sweeps, points, params.baselines.min_c_accuracy)
    print(text)


if __name__ == "__main__":
    main()
