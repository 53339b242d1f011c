"""Stage `finetune`: CTRL, adding the control y to the pre-trained base by RL.

`--setting single` (default): y = the compressibility class, reward its calibrated classifier.
`--setting multitask`: y = the joint (compressibility, ink) class, reward the weighted sum of the
two classifiers' log-probabilities, each trained on its own half of the images.
Resumes from `models/ctrl[_multitask]_checkpoint/` (kept by DVC across runs) when its settings
match. Launch on several processes with `accelerate launch -m stages.finetune`.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext

import torch
from accelerate import PartialState
from accelerate.utils import set_seed
from dvclive import Live

from ctrldiff.base import load_base
from ctrldiff.control import add_control, uncontrolled_from
from ctrldiff.finetune import finetune
from ctrldiff.io import atomic_dir
from ctrldiff.params import load_params
from ctrldiff.tasks import SETTINGS, load_reward, num_joint_classes
from ctrldiff.tilt import load_trajectories


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--setting", default="single", choices=sorted(SETTINGS))
    setting = SETTINGS[parser.parse_args(argv).setting]
    params = load_params("params.yaml")
    label_meta = json.loads((setting.data / "meta.json").read_text())
    # Each classifier is checked against its task's classes and thresholds: a stale one is refused.
    reward = load_reward(label_meta, weights=params.multitask.weights)

    base = load_base("models/base")
    set_seed(params.seed)  # identical LoRA initialisation on every process
    y_classes = list(range(num_joint_classes(label_meta)))
    ft, ro = params.finetune, params.finetune.rollout
    off = uncontrolled_from(base.scheduler, ro.steps, ro.eta, ft.base_last_steps)
    model = add_control(base, y_classes, ft.lora_rank, ft.lora_targets, off)
    logs = setting.metrics / "finetune"
    # Only the main process writes (the log, the adapter, the metrics); the others train and wait.
    # The log is rebuilt from the checkpoint's history on resume: DVC clears it before a stage runs.
    state = PartialState(cpu=not torch.cuda.is_available())  # as finetune's Accelerator: gloo on CPUs
    start = time.perf_counter()
    live = Live(str(logs), dvcyaml=None, save_dvc_exp=False) if state.is_main_process else None
    with live or nullcontext():
        result = finetune(
            model,
            reward,
            params.gamma,
            params.finetune,
            label_meta,
            params.seed,
            setting.checkpoint,
            live,
            code=("stages.finetune",),
            trajectories=load_trajectories("data/base_rollouts")
            if params.finetune.solver == "weighted"
            else None,
        )
        minutes = (time.perf_counter() - start) / 60
        if live is not None:  # the stage's one metrics file: dvclive's summary of the log, and the run's
            live.summary.update(summary(result, params.finetune.updates, minutes))
    if state.is_main_process:
        with atomic_dir(setting.ctrl) as tmp:
            model.save(tmp)
        last = result["history"][-1] if result["history"] else {}
        print(
            f"finetune: {len(result['history'])} updates in {minutes:.1f} min, final reward "
            f"{last.get('reward')}, KL {last.get('kl')}"
        )
    state.wait_for_everyone()


def summary(result: dict, updates: int, minutes: float) -> dict:
    history = result["history"]
    probes = [h for h in history if "probe/oracle_accuracy" in h]
    reached = next((h["reward_queries"] for h in probes if h["probe/oracle_accuracy"] >= 0.9), None)
    last = history[-1] if history else {}
    return {
        "updates": updates,
        "resumed_from_update": result["start_update"],  # 0: trained from scratch in this run
        "ess": result.get("ess"),  # weighted: effective base images per (c, y)
        "trajectories_per_update": result["trajectories_per_update"],
        "minutes_this_run": round(minutes, 2),
        "final_reward": last.get("reward"),
        "final_kl": last.get("kl"),
        "final_probe_oracle_accuracy": probes[-1]["probe/oracle_accuracy"] if probes else None,
        "reward_queries_to_probe_accuracy_0.9": reached,
    }


if __name__ == "__main__":
    main()
