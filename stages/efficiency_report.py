"""Stage `efficiency_report`: CTRL against CFG for every labelled-set size, as a table and a plot."""

from __future__ import annotations

from ctrldiff.io import atomic_path, read_json
from ctrldiff.params import load_params
from ctrldiff.plots import line_plot

HEADER = (
    "| labelled images n | method | accuracy | macro-F1 | c_accuracy | Fréchet | note |\n"
    "|---|---|---|---|---|---|---|\n"
)


def main() -> None:
    sizes = sorted(load_params("params.yaml").efficiency.sizes)
    runs = [read_json(f"metrics/efficiency/n{n}.json") for n in sizes]
    rows = []
    for run in runs:
        ctrl, cfg = run["ctrl"], run["cfg"]
        notes = {
            "ctrl": f"classifier val accuracy {ctrl['classifier_val_accuracy']:.3f}"
            + (
                f", {ctrl['classifier_copies']} oracle-labelled copies per image"
                if ctrl.get("classifier_copies")
                else ""
            ),
            "cfg": f"w_y {cfg['scale']:g}, {cfg['triples']} triples",
        }
        for name, m in (("CTRL", ctrl), ("CFG", cfg)):
            rows.append(
                f"| {run['n']} | {name} | {m['accuracy']:.3f} | {m['macro_f1']:.3f} | {m['c_accuracy']:.3f} "
                f"| {m['frechet']:.2f} | {notes[name.lower()]} |\n"
            )
    text = (
        "# Sample efficiency: CTRL (classifier on n pairs) against CFG (trained on n triples)\n\n"
        "Oracle-scored on the evaluation's requests and seeds; default recipes otherwise.\n\n"
        + HEADER
        + "".join(rows)
    )
    with atomic_path("reports/efficiency.md") as tmp:
        tmp.write_text(text)
    series = {
        f"{name} {metric}": [run[key][metric] for run in runs]
        for name, key in (("CTRL", "ctrl"), ("CFG", "cfg"))
        for metric in ("accuracy", "macro_f1")
    }
    line_plot(
        "metrics/efficiency.png",
        sizes,
        series,
        "labelled images n",
        "oracle score of the control y",
        "Sample efficiency: CTRL vs classifier-free guidance",
    )
    print(text)


if __name__ == "__main__":
    main()
