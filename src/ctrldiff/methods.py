"""Every sampling method of the comparison, by name: the model it samples and its sampling step.

The stages `tune`, `sample` and `evaluate` go through this one table, so all methods share the
seeds, the DDIM settings and the evaluation; only the step (or the trained control) differs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ctrldiff.base import BaseModel, load_base
from ctrldiff.control import ControlledStep, load_control
from ctrldiff.guidance.cfg import CFGOnY
from ctrldiff.guidance.classifier_guidance import ClassifierGuidance, load_noisy_classifier
from ctrldiff.guidance.dps import DPS
from ctrldiff.guidance.reconstruction import ReconstructionGuidance
from ctrldiff.guidance.svdd import SVDD
from ctrldiff.oracles import to_uint8
from ctrldiff.params import SampleParams
from ctrldiff.sampling import SamplerConfig, Step, count_evaluations, ddim_cfg_step, sample_requests
from ctrldiff.tasks import load_reward, num_joint_classes

METHODS = ("base", "ctrl", "reconstruction", "dps", "classifier_guidance", "cfg", "svdd")
TUNED = ("reconstruction", "dps", "classifier_guidance", "cfg", "svdd")  # a scale picked by `tune`


def build(
    method: str,
    scale: float | None,
    label_meta: dict,
    models: Path = Path("models"),
    svdd_temperature: float = 0.0,
    reward_weights: list[float] | None = None,
    ctrl: Path | None = None,
    device: str | torch.device = "cpu",
) -> tuple[BaseModel, Step, int | None]:
    """(model, step, y_null) of a method; y_null None means the method ignores y (the base).

    The clean-image guidance methods (reconstruction, DPS, SVDD) follow the dataset's reward
    (``tasks.load_reward``: its classifier, or the weighted joint of several); ``ctrl`` is the
    CTRL adapter's folder, by default models/ctrl. Everything it loads goes to ``device``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    if method in TUNED and scale is None:
        raise ValueError(f"method {method!r} needs a guidance scale (run the `tune` stage first)")
    base = load_base(models / "base")
    num_y = num_joint_classes(label_meta)
    if method == "base":
        step, y_null = ddim_cfg_step, None
    elif method in ("ctrl", "cfg"):
        directory = (ctrl or models / "ctrl") if method == "ctrl" else models / "cfg"
        control = load_control(base, directory)  # attaches the adapter: move the base afterwards
        step, y_null = (ControlledStep(control) if method == "ctrl" else CFGOnY(scale)), control.y_null
    elif method == "classifier_guidance":
        noisy = load_noisy_classifier(models / "noisy_classifier", base.scheduler).to(device)
        step, y_null = ClassifierGuidance(noisy, scale), num_y
    else:
        reward = load_reward(label_meta, models, reward_weights).requires_grad_(False).to(device)
        if method == "reconstruction":
            step = ReconstructionGuidance(reward, scale)
        elif method == "dps":
            step = DPS(reward, scale)
        else:
            step = SVDD(reward, int(scale), svdd_temperature)
        y_null = num_y
    return base.to(device), step, y_null


def balanced_requests(num_c: int, num_y: int, n: int, seed: int) -> pd.DataFrame:
    """Every (c, y) pair n times; request i uses seed + i, the same for every method."""
    c, y = np.meshgrid(np.arange(num_c), np.arange(num_y), indexing="ij")
    c, y = np.repeat(c.ravel(), n), np.repeat(y.ravel(), n)
    return pd.DataFrame({"c": c, "y": y, "seed": seed + np.arange(len(c))})


def generate(
    model: BaseModel,
    step: Step,
    y_null: int | None,
    sampler: SampleParams,
    num_y: int,
    n_per_request: int,
    seed: int,
    desc: str,
) -> tuple[pd.DataFrame, np.ndarray, dict]:
    """Balanced requests, their images (uint8) and the measured cost of generating them.

    The cost counts denoiser calls per image (and those back-propagated through) and times them.
    """
    cfg = SamplerConfig(sampler.steps, sampler.eta, sampler.guidance_scale)
    req = balanced_requests(len(model.classes), num_y, n_per_request, seed)
    c = torch.tensor(req.c.to_numpy())
    # The base model ignores y (y_null None): it is the floor every method is measured against.
    y = None if y_null is None else torch.tensor(req.y.to_numpy())
    with count_evaluations(model.unet) as count:
        images, sec = sample_requests(
            model, c, req.seed.tolist(), cfg, sampler.batch_size, y, y_null, desc=desc, step=step
        )
    cost = {
        "nfe_per_image": count["calls"] / len(req),
        "backprop_nfe_per_image": count["with_grad"] / len(req),
        "seconds_per_image": sec,
    }
    return req, to_uint8(images), cost
