"""Stage `base_rollouts`: the base's own trajectories, n per class c, with CTRL's rollout sampler.

The `weighted` solver fits their reweighting by p̂(y | x0)^γ; the `optimum` stage scores the
reweighted images. Both read the same draws (`base_rollouts.seed`, disjoint from the evaluation's).
"""

from __future__ import annotations

import torch

from ctrldiff.base import default_device, load_base
from ctrldiff.data import png_bytes
from ctrldiff.io import atomic_dir, write_json
from ctrldiff.methods import balanced_requests
from ctrldiff.oracles import to_uint8
from ctrldiff.params import load_params
from ctrldiff.sampling import SamplerConfig
from ctrldiff.tilt import base_trajectories, save_trajectories

OUT = "data/base_rollouts"


def main(argv: list[str] | None = None) -> None:
    params = load_params("params.yaml")
    cfg, ro = params.base_rollouts, params.finetune.rollout
    base = load_base("models/base").to(default_device())
    req = balanced_requests(len(base.classes), 1, cfg.n_per_c, cfg.seed).drop(columns="y")
    sampler = SamplerConfig(ro.steps, ro.eta, ro.guidance_scale)
    traj = base_trajectories(base, torch.tensor(req.c.to_numpy()), req.seed.tolist(), sampler, cfg.batch_size)
    with torch.no_grad():
        images = torch.cat(
            [base.decode(x.to(base.device)).clamp(-1, 1).cpu() for x in traj.states[:, -1].split(100)]
        )
    req["image"] = [png_bytes(p) for p in to_uint8(images)]
    with atomic_dir(OUT) as tmp:
        save_trajectories(tmp, traj)
        req.to_parquet(tmp / "samples.parquet", index=False)
        write_json(tmp / "meta.json", {"n_per_c": cfg.n_per_c, "sampler": ro.model_dump()})
    print(f"base_rollouts: {len(req)} trajectories of {ro.steps} steps ({cfg.n_per_c} per class c)")


if __name__ == "__main__":
    main()
