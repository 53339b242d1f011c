"""Cost of one CTRL update: the adapter-disabled reference vs a deep-copied reference, and time vs K.

Run after `dvc repro finetune` (needs models/base and the compressibility classifier):
    python benchmarks/ctrl_update_cost.py [--batch 16] [--ks 1 2 5 10] [--base models/base]

Every configuration runs in a fresh process, so the peak memory of one is not hidden by another's:
on a GPU the peak is torch.cuda.max_memory_allocated, on the CPU the growth of the process's peak
resident set (ru_maxrss) over its size after the imports: weights, optimizer state and activations.
The "deep copy" reference is what the authors' approach costs: a second frozen UNet kept in memory.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ctrldiff.base import load_base
from ctrldiff.classifier import Classifier
from ctrldiff.control import ControlledModel, add_control
from ctrldiff.ctrl import CTRLLoss, RolloutConfig
from ctrldiff.finetune import draw_batch
from ctrldiff.params import load_params
from ctrldiff.sampling import request_noise


@dataclass
class CopiedReference(ControlledModel):
    """A ControlledModel whose reference is a deep copy of the frozen UNet (the costly alternative)."""

    reference_unet: torch.nn.Module | None = None
    null_index: int = -1  # the y-embedding lives on the policy UNet, swapped out inside reference()

    @property
    def y_null(self) -> int:
        return self.null_index

    @contextmanager
    def reference(self):
        policy, self.base.unet = self.base.unet, self.reference_unet
        try:
            yield
        finally:
            self.base.unet = policy


def peak_mib(device: torch.device, before_kib: int) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kib) / 1024


def one(args: argparse.Namespace) -> dict:
    """Time and peak memory of ``args.updates`` updates in this process for one configuration."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # imports only: weights count too
    params = load_params("params.yaml")
    ft, sp = params.finetune, params.finetune.rollout
    base = load_base(args.base)
    frozen = copy.deepcopy(base.unet).requires_grad_(False) if args.reference == "copy" else None
    control = add_control(base, list(range(4)), ft.lora_rank, ft.lora_targets)
    if frozen is not None:
        control = CopiedReference(
            **vars(control), reference_unet=frozen.to(device), null_index=control.y_null
        )
    reward = Classifier.load(args.classifier).to(device).requires_grad_(False)
    base.unet.to(device), base.encoder.to(device)
    if base.vae is not None:
        base.vae.to(device)
    lora, emb = control.trainable_parameters()
    opt = torch.optim.AdamW([{"params": lora, "lr": ft.lr_lora}, {"params": emb, "lr": ft.lr_embedding}])
    cfg = RolloutConfig(sp.steps, sp.eta, sp.guidance_scale, args.k, args.checkpointing)
    loss_fn = CTRLLoss(reward, params.gamma, cfg, ft.kl_reduction)

    def update(u: int) -> None:
        c, y, seeds = draw_batch(u, 0, 0, args.batch, len(base.classes), 4)
        noise = request_noise(seeds, base.sample_shape, cfg.steps).to(device)
        loss, _ = loss_fn(control, c.to(device), y.to(device), noise, full_kl=args.kl == "full")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    update(0)  # the first update also allocates the optimizer state
    memory = peak_mib(device, before)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for u in range(1, args.updates + 1):
        update(u)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.updates
    return {"peak_mib": memory, "s_per_update": seconds, "unet_mib": unet_mib(frozen or base.unet)}


def unet_mib(unet: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in unet.parameters()) / 2**20


def run(
    args: argparse.Namespace, reference: str, k: int, checkpointing: bool = False, kl: str = "window"
) -> dict:
    cmd = [
        sys.executable, __file__, "--one", "--reference", reference, "--k", str(k), "--kl", kl,
        "--batch", str(args.batch), "--updates", str(args.updates), "--base", args.base,
        "--classifier", args.classifier,
    ] + (["--checkpointing"] if checkpointing else [])  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 5, 10])
    parser.add_argument("--updates", type=int, default=2, help="timed updates after the first")
    parser.add_argument("--base", default="models/base")
    parser.add_argument("--classifier", default="models/classifier/compressibility")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reference", default="adapters-off", help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, default=5, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kl", default="window", choices=["window", "full"], help=argparse.SUPPRESS)
    parser.add_argument(
        "--kl-compare",
        action="store_true",
        help="only: the frozen reference on every stochastic step (full) against the gradient window only",
    )
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return

    k = load_params("params.yaml").finetune.grad_steps
    print(f"one CTRL update, batch {args.batch}, base {args.base}, torch threads {torch.get_num_threads()}")
    if args.kl_compare:
        full, window = run(args, "adapters-off", k, kl="full"), run(args, "adapters-off", k, kl="window")
        print(f"\nfrozen reference at K = {k}            s/update   peak MiB")
        print(f"on every stochastic step (before)  {full['s_per_update']:>9.2f} {full['peak_mib']:>10.1f}")
        print(
            f"in the gradient window only (now)  {window['s_per_update']:>9.2f} {window['peak_mib']:>10.1f}"
        )
        print(f"ratio before / now                 {full['s_per_update'] / window['s_per_update']:>9.2f}")
        return
    off, deep = run(args, "adapters-off", k), run(args, "copy", k)
    print(f"\nreference at K = {k}      peak MiB   s/update")
    print(f"adapters disabled      {off['peak_mib']:>9.1f} {off['s_per_update']:>10.2f}")
    print(f"deep-copied UNet       {deep['peak_mib']:>9.1f} {deep['s_per_update']:>10.2f}")
    print(
        f"ratio copy / disabled  {deep['peak_mib'] / off['peak_mib']:>9.2f}"
        f"   (the UNet's weights are {off['unet_mib']:.1f} MiB)"
    )
    print("\n  K   s/update   peak MiB   peak MiB with checkpointing")
    for k in args.ks:
        plain, ckpt = run(args, "adapters-off", k), run(args, "adapters-off", k, checkpointing=True)
        print(f"{k:>3} {plain['s_per_update']:>10.2f} {plain['peak_mib']:>10.1f} {ckpt['peak_mib']:>12.1f}")


if __name__ == "__main__":
    main()
