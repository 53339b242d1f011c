"""Peak memory and time of one CTRL update on a tiny Stable-Diffusion-shaped pipeline, vs truncation K,
with and without gradient checkpointing (the paper-scale code path: latent rollouts, VAE decode, prompts).

    python benchmarks/tiny_sd_memory.py [--latent 32] [--batch 4] [--steps 50] [--ks 1 5 10 25 50]
    python benchmarks/tiny_sd_memory.py --kl-compare [--k 10]   # the frozen reference: everywhere vs window

Builds the tiny pipeline (random weights, nothing downloaded) and a random 3-channel reward classifier
in a temporary folder, writes paper/params.yaml there with only the paths and sizes changed, and runs
benchmarks/ctrl_update_cost.py on it: every configuration in a fresh process (see that script for how
peak memory is measured on the CPU and on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ctrldiff.base import load_stable_diffusion  # noqa: E402
from ctrldiff.classifier import Classifier, SmallCNN  # noqa: E402
from tests.tiny_sd import build_tiny_sd  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latent", type=int, default=32, help="latent side (images are twice as large)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10, 25, 50])
    parser.add_argument("--k", type=int, default=10, help="with --kl-compare: the gradient window")
    parser.add_argument(
        "--kl-compare", action="store_true", help="the frozen reference everywhere vs in the window, at --k"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sd = build_tiny_sd(work / "tiny-sd", sample_size=args.latent)
        (work / "models/base").mkdir(parents=True)  # what the `base` stage records for an SD base
        meta = load_stable_diffusion(str(sd), ["a cat", "a dog"]).meta
        (work / "models/base/base.json").write_text(json.dumps(meta))
        torch.manual_seed(0)
        arch = {"in_channels": 3, "num_classes": 4, "width": 16}
        Classifier(SmallCNN(**arch), arch, meta={"classes": [0, 1, 2, 3]}).save(work / "classifier")
        params = yaml.safe_load((ROOT / "paper/params.yaml").read_text())
        params["base"] |= {"pretrained": str(sd)}
        params["finetune"]["rollout"]["steps"] = args.steps
        k = args.k if args.kl_compare else min(args.ks)
        params["finetune"] |= {"mixed_precision": "no", "grad_steps": k}
        (work / "params.yaml").write_text(yaml.safe_dump(params))
        cmd = [
            os.path.abspath(sys.executable), str(ROOT / "benchmarks/ctrl_update_cost.py"),
            "--base", "models/base", "--classifier", "classifier", "--batch", str(args.batch),
            "--ks", *map(str, args.ks), *(["--kl-compare"] if args.kl_compare else []),
        ]  # fmt: skip
        side = args.latent
        print(f"tiny SD: {side}x{side}x4 latents, {2 * side}px images, {args.steps} DDIM steps")
        subprocess.run(cmd, cwd=work, check=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})


if __name__ == "__main__":
    main()
