"""Stage `compare_multitask`: the multi-task methods side by side (reports/multitask.md).

Per task and joint accuracy / macro-F1 by the oracles, fidelity, cost, the hardest joint class of
each method, and what classifier-free guidance would need: images carrying both labels, counted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ctrldiff.io import atomic_path, read_json, write_json
from ctrldiff.tasks import SETTINGS, class_counts, control_tasks, split_joint

METHODS = ("base", "ctrl", "reconstruction", "dps")  # CFG needs quadruples, see the note below


def joint_name(k: int, tasks: list[str], counts: list[int]) -> str:
    return ", ".join(f"{t}={int(i)}" for t, i in zip(tasks, split_joint(np.array(k), counts), strict=True))


def main() -> None:
    setting = SETTINGS["multitask"]
    meta = read_json(setting.data / "meta.json")
    labels = read_json(setting.metrics / "label.json")
    tasks, counts = control_tasks(meta), class_counts(meta)
    found = [read_json(p) for m in METHODS if (p := setting.metrics / "eval" / f"{m}.json").is_file()]
    if not found:
        raise SystemExit(
            f"compare_multitask: no {setting.metrics}/eval/<method>.json yet; run evaluate first"
        )

    summary: dict = {"methods": {}}
    header = "| method | scale | " + " | ".join(f"{t} acc. | {t} F1" for t in [*tasks, "joint"])
    header += " | c_accuracy | s / image | hardest joint class (recall) |\n"
    header += "|---" * (2 * len(tasks) + 7) + "|\n"
    rows = []
    for m in found:
        joint = m["tasks"]["joint"]
        hardest = int(np.nanargmin(joint["recall_per_class"]))
        summary["methods"][m["method"]] = {
            **{t: {k: m["tasks"][t][k] for k in ("accuracy", "macro_f1")} for t in [*tasks, "joint"]},
            "c_accuracy": m["fidelity"]["c_accuracy"],
            "hardest_joint_class": joint_name(hardest, tasks, counts),
            "hardest_joint_recall": joint["recall_per_class"][hardest],
        }
        cells = " | ".join(
            f"{m['tasks'][t]['accuracy']:.3f} | {m['tasks'][t]['macro_f1']:.3f}" for t in [*tasks, "joint"]
        )
        scale = "" if m.get("scale") is None else f"{m['scale']:g}"
        rows.append(
            f"| {m['method']} | {scale} | {cells} | {m['fidelity']['c_accuracy']:.3f} "
            f"| {m['cost']['seconds_per_image']:.3f} | {joint_name(hardest, tasks, counts)} "
            f"({joint['recall_per_class'][hardest]:.2f}) |\n"
        )
    both = labels["images_with_both_labels"]
    summary["cfg"] = {
        "trainable": both > 0,
        "needs": "(c, x, y1, y2) quadruples: images carrying both labels",
        "images_with_both_labels": both,
        "labelled": labels["labelled"],
    }
    cfg_note = (
        f"Classifier-free guidance on (y1, y2) would train on (c, x, {tasks[0]}, {tasks[1]}) quadruples: "
        f"images carrying both labels. This dataset has {both} such images "
        f"({', '.join(f'{t} on {n}' for t, n in labels['labelled'].items())} disjoint images), so CFG "
        + (
            "cannot be trained here; CTRL needs only the two pair sets.\n"
            if both == 0
            else "could be trained.\n"
        )
    )
    text = (
        "# Multi-task control: two labels from disjoint halves, y = the joint class\n\n"
        f"{found[0]['n_per_class']} images per requested joint class; each task judged by its own oracle; "
        "class 0 of each task is the higher oracle score (larger JPEG file, more ink). Joint class "
        + ", ".join(f"{k} = ({joint_name(k, tasks, counts)})" for k in range(int(np.prod(counts))))
        + ".\n\n"
        + header
        + "".join(rows)
        + "\n"
        + cfg_note
    )
    with atomic_path("reports/multitask.md") as tmp:
        tmp.write_text(text)
    write_json(Path(setting.metrics) / "summary.json", summary)
    print(text)


if __name__ == "__main__":
    main()
