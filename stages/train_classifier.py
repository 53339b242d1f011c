"""Stage `train_classifier`: fit and temperature-calibrate the classifier of one labelled task."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from ctrldiff.classifier import fit_task
from ctrldiff.io import atomic_dir, confusion_pairs, write_json
from ctrldiff.params import load_params
from ctrldiff.plots import reliability_diagram


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--task", required=True, help="a task of the dataset's meta.json, e.g. compressibility"
    )
    parser.add_argument("--data", default="data/labelled", type=Path, help="the labelled dataset's folder")
    args = parser.parse_args(argv)
    task = args.task
    params = load_params("params.yaml")
    table = pd.read_parquet(args.data / "images.parquet")
    meta = json.loads((args.data / "meta.json").read_text())

    clf, metrics = fit_task(table, meta, task, params.classifier, params.seed)
    report = metrics.pop("_report")
    with atomic_dir(f"models/classifier/{task}") as tmp:
        clf.save(tmp)
    write_json(f"metrics/classifier/{task}.json", metrics)
    confusion_pairs(f"metrics/classifier/{task}_confusion.csv", metrics["confusion"], ("actual", "predicted"))
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
