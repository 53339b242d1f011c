"""Stage `efficiency`: CTRL against classifier-free guidance when only n images carry the label y.

CTRL trains and calibrates its reward classifier on the n labelled pairs (their own train/val
split, plus `classifier.copies` oracle-labelled copies of each as for the full-data classifier; as
many gradient steps as the full-data classifier), then runs the `finetune` recipe
unchanged. CFG is trained on all n (c, x, y) triples with the `train_cfg` recipe and sampled at the
scale `tune` chose. Both are sampled on the evaluation's requests and seeds and scored by the oracles.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import pandas as pd
from accelerate.utils import set_seed

from ctrldiff.base import load_base
from ctrldiff.classifier import Classifier, fit_task, labelled_subset, task_tensors
from ctrldiff.control import ControlledStep, add_control, uncontrolled_from
from ctrldiff.evaluation import evaluate_samples, real_by_split
from ctrldiff.finetune import finetune
from ctrldiff.guidance.cfg import CFGOnY, train_cfg
from ctrldiff.io import read_json, write_json
from ctrldiff.methods import generate
from ctrldiff.params import load_params
from ctrldiff.tilt import load_trajectories

TASK = "compressibility"


def summary(metrics: dict) -> dict:
    """The figures the efficiency table shows, from a standard metrics record."""
    task, fid = metrics["tasks"][TASK], metrics["fidelity"]
    return {
        "accuracy": task["accuracy"],
        "macro_f1": task["macro_f1"],
        "c_accuracy": fid["c_accuracy"],
        "frechet": fid["frechet"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, required=True, help="labelled images available")
    n = parser.parse_args(argv).n
    params = load_params("params.yaml")
    meta = read_json("data/labelled/meta.json")
    table = pd.read_parquet("data/labelled/images.parquet")
    classes = meta["tasks"][TASK]["classes"]
    part = labelled_subset(table, meta, TASK, n, params.seed)
    digit_clf = Classifier.load("models/classifier/digit")
    real = real_by_split(table, meta)
    sampler, ft = params.sample, params.finetune

    def evaluate(method: str, model, step, y_null: int, scale: float | None) -> dict:
        req, pixels, cost = generate(
            model, step, y_null, sampler, len(classes), sampler.n_per_request, sampler.seed, f"{method} n={n}"
        )
        m = evaluate_samples(method, pixels, req.c.to_numpy(), req.y.to_numpy(), meta, digit_clf, real, cost)
        return summary(m) | {"scale": scale}

    # CTRL: a calibrated classifier on the n pairs, then RL fine-tuning against it.
    start = time.perf_counter()
    n_train_full = len(task_tensors(table, meta, TASK, "train")[1])
    n_train = len(task_tensors(part, meta, TASK, "train")[1])
    epochs = math.ceil(params.classifier.epochs * n_train_full / n_train)  # same gradient steps
    reward, clf_metrics = fit_task(
        part, meta, TASK, params.classifier.model_copy(update={"epochs": epochs}), params.seed
    )
    set_seed(params.seed)
    base = load_base("models/base")
    off = uncontrolled_from(base.scheduler, ft.rollout.steps, ft.rollout.eta, ft.base_last_steps)
    ctrl = add_control(base, classes, ft.lora_rank, ft.lora_targets, off)
    checkpoint = Path(f"models/efficiency/n{n}_checkpoint")
    trajectories = load_trajectories("data/base_rollouts") if ft.solver == "weighted" else None
    finetune(
        ctrl,
        reward,
        params.gamma,
        ft,
        meta,
        params.seed,
        checkpoint,
        code=("stages.efficiency",),
        trajectories=trajectories,
    )
    ctrl_result = evaluate("ctrl", ctrl.base, ControlledStep(ctrl), ctrl.y_null, None)
    ctrl_result |= {
        "classifier_val_accuracy": clf_metrics["val_accuracy_real"],  # on the held-out real pairs
        "classifier_copies": clf_metrics["copies"],  # oracle-labelled copies per labelled image
        "classifier_pairs": {"train": clf_metrics["n_train"], "val": clf_metrics["n_val"]},
        "minutes": round((time.perf_counter() - start) / 60, 2),
    }

    # Classifier-free guidance: the same parametrisation trained on all n triples.
    start = time.perf_counter()
    x, y, c = task_tensors(part.assign(split="train"), meta, TASK, "train")  # all n, both splits
    set_seed(params.seed)
    cfg_model = add_control(load_base("models/base"), classes, ft.lora_rank, ft.lora_targets)
    b = params.baselines
    train_cfg(
        cfg_model,
        x,
        c,
        y,
        b.cfg_train_steps,
        b.cfg_batch_size,
        b.cfg_lr_lora,
        b.cfg_lr_embedding,
        b.cfg_dropout,
        params.seed,
    )
    scale = read_json("metrics/tune/cfg.json")["chosen"]["scale"]
    cfg_result = evaluate("cfg", cfg_model.base, CFGOnY(scale), cfg_model.y_null, scale)
    cfg_result |= {"triples": len(x), "minutes": round((time.perf_counter() - start) / 60, 2)}

    write_json(f"metrics/efficiency/n{n}.json", {"n": n, "ctrl": ctrl_result, "cfg": cfg_result})
    print(
        f"efficiency n={n}: CTRL accuracy {ctrl_result['accuracy']:.3f} (c_accuracy "
        f"{ctrl_result['c_accuracy']:.3f}), CFG accuracy {cfg_result['accuracy']:.3f} "
        f"(c_accuracy {cfg_result['c_accuracy']:.3f})"
    )


if __name__ == "__main__":
    main()
