"""Do two machines train the embedded base to the same bytes? A digest to compare across machines.

A fresh machine retrains `base` to other bytes (docs/experiments.md): oneDNN, MKL and ATen pick their
kernels by the CPU's instruction set, and another kernel sums in another order. This runs one fixed,
short computation (the default `base` UNet from its seed, 20 training steps on fixed synthetic data,
then one forward at the sampler's batch) under several instruction-set caps, each in a fresh process
(the caps are read when torch loads), and prints, side by side, each cap's seconds and a digest of the
trained weights. Run it on two machines: a cap whose digests agree on both gives the same bytes there.

    python benchmarks/cross_machine_bytes.py           # needs params.yaml only, no pipeline outputs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CAPS = {
    "default": {},
    "aten avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "aten+onednn avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "aten+onednn+mkl avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"},
    "aten+onednn avx2, mkl strict": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_CBWR": "AVX2,STRICT",
    },
    # no oneDNN: convolutions by ATen's im2col and MKL's GEMM in its conditional-reproducibility mode
    "no onednn, mkl compatible": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "BENCH_NO_ONEDNN": "1",
        "MKL_CBWR": "COMPATIBLE",
    },
}


def measure(steps: int) -> dict:
    """The fixed computation, in this process: digests of the trained weights and of one forward."""
    import torch

    if os.environ.get("BENCH_NO_ONEDNN") == "1":
        torch.backends.mkldnn.enabled = False
    from ctrldiff.base import build_embedded, train_base
    from ctrldiff.finetune import tensors_hash, weights_hash
    from ctrldiff.params import load_params

    params = load_params("params.yaml")
    cfg = params.base.model_copy(update={"train_steps": steps})
    res = params.data.resolution
    base = build_embedded(cfg, 10, res, params.data.channels, seed=0)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(512, params.data.channels, res, res, generator=gen) * 2 - 1
    c = torch.randint(0, 10, (512,), generator=gen)
    start = time.perf_counter()
    losses = train_base(base, x, c, cfg, seed=0)
    train_s = time.perf_counter() - start
    xt = torch.randn(160, params.data.channels, res, res, generator=gen)
    t = torch.full((160,), 500)
    with torch.no_grad():
        cond = base.encoder(c[:160])
        base.unet(xt, t, cond)  # warm-up
        start = time.perf_counter()
        out = base.unet(xt, t, cond).sample
        forward_s = time.perf_counter() - start
    return {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "train_s_per_step": train_s / steps,
        "forward_s": forward_s,
        "final_loss": repr(losses[-1]),
        "weights": weights_hash(base.unet),
        "forward": tensors_hash({"forward": out}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--caps", nargs="*", choices=list(CAPS), default=list(CAPS), help="which caps to run (default all)"
    )
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        print(json.dumps(measure(args.steps)))
        return
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    print(f"CPU: {cpu}; {args.steps} training steps of the default base at batch 64, a forward at batch 160")
    header = ("cap", "ATen", "s/step", "fwd s", "final loss", "weights", "forward")
    print("{:<30} {:>8} {:>7} {:>6} {:>22} {:>17} {:>17}".format(*header))
    for name in args.caps:
        env = CAPS[name]
        run = subprocess.run(
            [sys.executable, __file__, "--inner", "--steps", str(args.steps)],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(run.stdout.strip().splitlines()[-1])
        print(
            f"{name:<30} {r['capability']:>8} {r['train_s_per_step']:>7.3f} {r['forward_s']:>6.3f} "
            f"{r['final_loss']:>22} {r['weights']:>17} {r['forward']:>17}"
        )


if __name__ == "__main__":
    main()
