"""Stage `train_classifier`: fit and temperature-calibrate the classifier of one labelled task."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from ctrldiff.classifier import fit_task
from ctrldiff.io import atomic_dir, write_json
from ctrldiff.params import load_params
from ctrldiff.plots import reliability_diagram

DATA = Path("data/labelled")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", required=True, help="compressibility | digit | ink")
    task = parser.parse_args(argv).task
    params = load_params("params.yaml")
    table = pd.read_parquet(DATA / "images.parquet")
    meta = json.loads((DATA / "meta.json").read_text())

    clf, metrics = fit_task(table, meta, task, params.classifier, params.seed)
    report = metrics.pop("_report")
    with atomic_dir(f"models/classifier/{task}") as tmp:
        clf.save(tmp)
    write_json(f"metrics/classifier/{task}.json", metrics)
    reliability_diagram(
        f"metrics/classifier/{task}_reliability.png",
        report["reliability_before"],
        report["reliability_after"],
        title=f"{task} classifier, validation (T = {metrics['temperature']:.2f})",
    )
    m = metrics
    print(
        f"{task}: val accuracy {m['val_accuracy']:.3f}, NLL {m['val_nll_before']:.3f} -> "
        f"{m['val_nll_after']:.3f}, ECE {m['val_ece_before']:.3f} -> {m['val_ece_after']:.3f}"
    )


if __name__ == "__main__":
    main()
