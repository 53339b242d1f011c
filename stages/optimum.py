"""Stage `optimum`: what exact optimisation of CTRL's objective reaches, among the base's own images.

CTRL's optimum samples p_γ(x | c, y) ∝ p̂(y | x)^γ p_pre(x | c). Each base image of `base_rollouts`
(n per c, CTRL's rollout sampler) is weighted by p̂(y | x)^γ, self-normalised within (c, y), at the
pipeline's gamma and reward. Reported, oracle-judged: accuracy and macro-F1 per task (and joint),
c_accuracy; and CTRL's own terms there: E log p̂, the KL of the reweighting against the base, the
objective γ E log p̂ − KL, and the effective sample size per (c, y). The reweighting cannot reach
images the base draws too rarely to appear among the n: more n can only raise the figures.
`--setting multitask` reweights by the joint reward.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd

from ctrldiff.classifier import Classifier
from ctrldiff.data import table_images
from ctrldiff.evaluation import features_and_predictions
from ctrldiff.io import write_json
from ctrldiff.oracles import to_model_space
from ctrldiff.params import load_params
from ctrldiff.tasks import (
    SETTINGS,
    class_counts,
    control_tasks,
    join,
    load_reward,
    num_joint_classes,
    oracle_classes,
    split_joint,
)
from ctrldiff.tilt import pair_terms, reward_log_probs, tilted_weights, weighted_scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--setting", default="single", choices=sorted(SETTINGS))
    setting = SETTINGS[parser.parse_args(argv).setting]
    params = load_params("params.yaml")
    meta = json.loads((setting.data / "meta.json").read_text())
    reward = load_reward(meta, weights=params.multitask.weights).requires_grad_(False)
    samples = pd.read_parquet("data/base_rollouts/samples.parquet")
    pixels = table_images(samples, meta["resolution"], meta["channels"])
    c = samples["c"].to_numpy()
    log_p = reward_log_probs(reward, to_model_space(pixels), num_joint_classes(meta)).numpy()
    tasks, counts = control_tasks(meta), class_counts(meta)
    truth = [oracle_classes(pixels, meta["tasks"][task])[1] for task in tasks]
    digit = Classifier.load("models/classifier/digit")
    digit.check_classes(meta["tasks"]["digit"]["classes"])
    recognised = features_and_predictions(digit, pixels)[1] == c

    w = tilted_weights(log_p, c, params.gamma)
    joint_y = np.arange(log_p.shape[1])
    scores = {}
    for task, asked, got in zip(tasks, split_joint(joint_y, counts), truth, strict=True):
        acc, f1 = weighted_scores(asked, got, w)
        scores[task] = {"accuracy": acc, "macro_f1": f1}
    if len(tasks) > 1:
        acc, f1 = weighted_scores(joint_y, join(truth, counts), w)
        scores["joint"] = {"accuracy": acc, "macro_f1": f1}
    reward_term, kl, ess = pair_terms(log_p, c, w)
    metrics = {
        "method": "optimum",
        "gamma": params.gamma,
        "n_per_c": params.base_rollouts.n_per_c,
        "tasks": scores,
        "fidelity": {
            "c_accuracy": float(np.average(np.broadcast_to(recognised[:, None], w.shape), weights=w))
        },
        "objective": {
            "reward_log_p": float(reward_term.mean()),
            "kl": float(kl.mean()),
            "objective": float(params.gamma * reward_term.mean() - kl.mean()),
        },
        "ess": {"mean": float(ess.mean()), "min": float(ess.min()), "per_c_y": ess.round(2).tolist()},
    }
    write_json(setting.metrics / "optimum.json", metrics)
    head = ", ".join(f"{t} {s['accuracy']:.3f} / {s['macro_f1']:.3f}" for t, s in scores.items())
    o = metrics["objective"]
    print(
        f"optimum at gamma {params.gamma:g} over {len(c)} base images: {head} (accuracy / macro-F1), "
        f"c_accuracy {metrics['fidelity']['c_accuracy']:.3f}; E log p̂ {o['reward_log_p']:.3f}, KL "
        f"{o['kl']:.2f}, objective {o['objective']:.2f}; ESS mean {ess.mean():.1f}, min {ess.min():.1f}"
    )


if __name__ == "__main__":
    main()
