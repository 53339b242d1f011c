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

from accelerate.utils import set_seed
from dvclive import Live

from ctrldiff.base import load_base
from ctrldiff.control import add_control
from ctrldiff.finetune import finetune
from ctrldiff.io import atomic_dir, write_json
from ctrldiff.params import load_params
from ctrldiff.tasks import SETTINGS, load_reward, num_joint_classes


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
    model = add_control(base, y_classes, params.finetune.lora_rank, params.finetune.lora_targets)
    checkpoint = setting.checkpoint
    logs = setting.metrics / "finetune"
    start = time.perf_counter()
    # The log is rebuilt from the checkpoint's history on resume: DVC clears it before a stage runs.
    with Live(str(logs), dvcyaml=None, save_dvc_exp=False) as live:
        result = finetune(
            model,
            reward,
            params.gamma,
            params.finetune,
            params.sample,
            label_meta,
            params.seed,
            checkpoint,
            live,
        )
    minutes = (time.perf_counter() - start) / 60
    with atomic_dir(setting.ctrl) as tmp:
        model.save(tmp)

    history = result["history"]
    probes = [h for h in history if "probe/oracle_accuracy" in h]
    reached = next((h["reward_queries"] for h in probes if h["probe/oracle_accuracy"] >= 0.9), None)
    last = history[-1] if history else {}
    write_json(
        logs.with_suffix(".json"),
        {
            "updates": params.finetune.updates,
            "resumed_from_update": result["start_update"],  # 0: trained from scratch in this run
            "trajectories_per_update": result["trajectories_per_update"],
            "minutes_this_run": round(minutes, 2),
            "final_reward": last.get("reward"),
            "final_kl": last.get("kl"),
            "final_probe_oracle_accuracy": probes[-1]["probe/oracle_accuracy"] if probes else None,
            "reward_queries_to_probe_accuracy_0.9": reached,
        },
    )
    print(
        f"finetune: {len(history)} updates in {minutes:.1f} min, final reward {last.get('reward')}, "
        f"KL {last.get('kl')}"
    )


if __name__ == "__main__":
    main()
