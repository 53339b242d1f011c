"""Stage `label`: build the offline labelled dataset (Parquet) and its label metrics."""

from __future__ import annotations

import argparse

from ctrldiff.io import atomic_dir, write_json
from ctrldiff.labels import build_table
from ctrldiff.params import load_params

OUT_DIR = "data/labelled"
METRICS = "metrics/label.json"


def main(argv: list[str] | None = None) -> None:
    args = argparse.ArgumentParser(description=__doc__).parse_args(argv)  # noqa: F841
    params = load_params("params.yaml")
    table, meta, metrics = build_table(params)
    with atomic_dir(OUT_DIR) as tmp:
        table.to_parquet(tmp / "images.parquet", engine="pyarrow", index=False)
        write_json(tmp / "meta.json", meta)
    write_json(METRICS, metrics)
    counts = metrics["compressibility"]["counts"]
    print(f"label: {len(table)} images, {metrics['n_skipped']} skipped, compressibility classes {counts}")


if __name__ == "__main__":
    main()
