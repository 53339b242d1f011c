"""Stage `tune`: pick one guidance method's scale by a small sweep on seeds of its own.

Every candidate scale samples `baselines.tune_per_request` images per (c, y) from seeds disjoint
from the evaluation's; the oracle scores them, and the best macro-F1 with c_accuracy at or above
`baselines.min_c_accuracy` wins (else the most faithful). The sweep and the choice are recorded.
"""

from __future__ import annotations

import argparse

import torch

from ctrldiff.classifier import Classifier
from ctrldiff.evaluation import pick_scale, tuning_scores
from ctrldiff.io import read_json, write_json
from ctrldiff.methods import TUNED, balanced_requests, build
from ctrldiff.oracles import to_uint8
from ctrldiff.params import load_params
from ctrldiff.sampling import SamplerConfig, sample_requests


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", required=True, choices=TUNED)
    method = parser.parse_args(argv).method
    params = load_params("params.yaml")
    label_meta = read_json("data/labelled/meta.json")
    num_y = len(label_meta["tasks"]["compressibility"]["classes"])
    digit_clf = Classifier.load("models/classifier/digit")
    cfg = SamplerConfig(params.sample.steps, params.sample.eta, params.sample.guidance_scale)
    grid = getattr(params.baselines, method)

    results = []
    for scale in grid:
        model, step, y_null = build(method, scale, num_y, svdd_temperature=params.baselines.svdd_temperature)
        req = balanced_requests(
            len(model.classes), num_y, params.baselines.tune_per_request, params.baselines.tune_seed
        )
        c, y = torch.tensor(req.c.to_numpy()), torch.tensor(req.y.to_numpy())
        images, sec = sample_requests(
            model,
            c,
            req.seed.tolist(),
            cfg,
            params.sample.batch_size,
            y,
            y_null,
            desc=f"{method} {scale:g}",
            step=step,
        )
        scores = tuning_scores(to_uint8(images), c.numpy(), y.numpy(), label_meta, digit_clf)
        results.append({"scale": scale, **scores, "seconds_per_image": sec})
        print(f"{method} scale {scale:g}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    chosen = pick_scale(results, params.baselines.min_c_accuracy)
    write_json(
        f"metrics/tune/{method}.json",
        {
            "method": method,
            "rule": f"best macro_f1 with c_accuracy >= {params.baselines.min_c_accuracy}",
            "images_per_scale": len(req),
            "sweep": results,
            "chosen": chosen,
        },
    )
    print(f"{method}: chose scale {chosen['scale']:g}")


if __name__ == "__main__":
    main()
