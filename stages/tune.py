"""Stage `tune`: pick one guidance method's scale by a small sweep on seeds of its own.

Every candidate scale samples `baselines.tune_per_request` images per (c, y) from seeds disjoint
from the evaluation's; the oracle scores them, and the best macro-F1 with c_accuracy at or above
`baselines.min_c_accuracy` wins (else the most faithful). The sweep's scores and the choice go to
`tune/<method>.json`, which `sample` and the studies depend on; each scale's seconds per image go to
`tune/<method>_seconds.json`, which nothing depends on, so that a rerun that measures the same scores
leaves the decision file's bytes, and everything downstream of it, as they were.
With `--setting multitask` the control's macro-F1 is that of the joint (compressibility, ink) class.
"""

from __future__ import annotations

import argparse

from ctrldiff.base import default_device
from ctrldiff.classifier import Classifier
from ctrldiff.evaluation import pick_scale, tuning_scores
from ctrldiff.io import read_json, write_json
from ctrldiff.methods import TUNED, build, generate
from ctrldiff.params import load_params
from ctrldiff.tasks import SETTINGS, num_joint_classes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", required=True, choices=TUNED)
    parser.add_argument("--setting", default="single", choices=sorted(SETTINGS))
    args = parser.parse_args(argv)
    method, setting = args.method, SETTINGS[args.setting]
    params = load_params("params.yaml")
    label_meta = read_json(setting.data / "meta.json")
    num_y = num_joint_classes(label_meta)
    digit_clf = Classifier.load("models/classifier/digit")
    grid = getattr(params.baselines, method)

    results, seconds = [], []
    for scale in grid:
        model, step, y_null = build(
            method,
            scale,
            label_meta,
            svdd_temperature=params.baselines.svdd_temperature,
            reward_weights=params.multitask.weights,
            device=default_device(),
        )
        req, pixels, cost = generate(
            model,
            step,
            y_null,
            params.sample,
            num_y,
            params.baselines.tune_per_request,
            params.baselines.tune_seed,
            f"{method} {scale:g}",
        )
        scores = tuning_scores(pixels, req.c.to_numpy(), req.y.to_numpy(), label_meta, digit_clf)
        results.append({"scale": scale, **scores})
        seconds.append({"scale": scale, "seconds_per_image": cost["seconds_per_image"]})
        print(f"{method} scale {scale:g}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    chosen = pick_scale(results, params.baselines.min_c_accuracy)
    write_json(
        setting.metrics / "tune" / f"{method}.json",
        {
            "method": method,
            "rule": f"best macro_f1 with c_accuracy >= {params.baselines.min_c_accuracy}",
            "images_per_scale": len(req),
            "sweep": results,
            "chosen": chosen,
        },
    )
    write_json(setting.metrics / "tune" / f"{method}_seconds.json", {"method": method, "sweep": seconds})
    print(f"{method}: chose scale {chosen['scale']:g}")


if __name__ == "__main__":
    main()
