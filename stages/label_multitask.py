"""Stage `label_multitask`: the multi-task dataset, compressibility and a second label on disjoint halves.

Compressibility is re-binned on its own half only (`multitask.compressibility_classes`, at that
half's quantiles or at `multitask.compressibility_thresholds`); the second label (ink, or aesthetic
at paper scale) keeps the label stage's classes on the other half. No image carries both
labels, which is what CTRL needs and classifier-free guidance cannot use (it needs both at once).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from ctrldiff.io import atomic_dir, read_json, write_json
from ctrldiff.params import load_params
from ctrldiff.tasks import SETTINGS, multitask_labels

SOURCE = Path("data/labelled")


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    params = load_params("params.yaml")
    table = pd.read_parquet(SOURCE / "images.parquet")
    cfg = params.multitask
    table, meta, metrics = multitask_labels(
        table, read_json(SOURCE / "meta.json"), cfg.compressibility_classes, cfg.compressibility_thresholds
    )
    with atomic_dir(SETTINGS["multitask"].data) as tmp:
        table.to_parquet(tmp / "images.parquet", engine="pyarrow", index=False)
        write_json(tmp / "meta.json", meta)
    write_json("metrics/multitask/label.json", metrics)
    print(
        f"label_multitask: {metrics['labelled']} labelled images, "
        f"{metrics['images_with_both_labels']} with both labels; counts {metrics['counts']}"
    )


if __name__ == "__main__":
    main()
