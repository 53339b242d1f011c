"""Stage `finetune`: CTRL, adding the compressibility control y to the pre-trained base by RL.

Resumes from `models/ctrl_checkpoint/` (kept by DVC across runs) when its settings match.
Launch on several processes with `accelerate launch -m stages.finetune`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from accelerate.utils import set_seed
from dvclive import Live

from ctrldiff.base import load_base
from ctrldiff.classifier import Classifier
from ctrldiff.control import add_control
from ctrldiff.finetune import finetune
from ctrldiff.io import atomic_dir, write_json
from ctrldiff.params import load_params

CHECKPOINT = Path("models/ctrl_checkpoint")


def main(argv: list[str] | None = None) -> None:
    params = load_params("params.yaml")
    label_meta = json.loads(Path("data/labelled/meta.json").read_text())
    spec = label_meta["tasks"]["compressibility"]
    reward = Classifier.load("models/classifier/compressibility")
    reward.check_classes(spec["classes"], spec["thresholds"])  # refuse a classifier of other classes

    base = load_base("models/base")
    set_seed(params.seed)  # identical LoRA initialisation on every process
    model = add_control(base, spec["classes"], params.finetune.lora_rank, params.finetune.lora_targets)
    start = time.perf_counter()
    with Live("metrics/finetune", resume=CHECKPOINT.exists(), dvcyaml=None, save_dvc_exp=False) as live:
        result = finetune(
            model,
            reward,
            params.gamma,
            params.finetune,
            params.sample,
            label_meta,
            params.seed,
            CHECKPOINT,
            live,
        )
    minutes = (time.perf_counter() - start) / 60
    with atomic_dir("models/ctrl") as tmp:
        model.save(tmp)

    history = result["history"]
    probes = [h for h in history if "probe/oracle_accuracy" in h]
    reached = next((h["reward_queries"] for h in probes if h["probe/oracle_accuracy"] >= 0.9), None)
    last = history[-1] if history else {}
    write_json(
        "metrics/finetune.json",
        {
            "updates": params.finetune.updates,
            "resumed_from_update": result["start_update"],
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
