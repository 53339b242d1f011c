"""The saved adapter is diffusers' standard LoRA layout: plain diffusers calls in a fresh process
(no ctrldiff import) load it and give the same denoiser output as ctrldiff's own loader."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ctrldiff.base import load_stable_diffusion
from ctrldiff.control import ATTENTION_PROJECTIONS, RESNET_CONVS, add_control, load_control
from tests.conftest import micro_base
from tests.tiny_sd import build_tiny_sd

ROOT = Path(__file__).resolve().parents[1]

# What a user writes with diffusers alone: the UNet, the LoRA, and the y-embedding as the UNet's
# class embedding (its rows are added to the timestep embedding, which is how CTRL attaches y).
PLAIN = """
import sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

kind, base, ctrl, io = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
assert "ctrldiff" not in sys.modules
if kind == "pipeline":
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    pipe.load_lora_weights(ctrl / "lora")
    unet = pipe.unet
else:
    unet = UNet2DConditionModel.from_pretrained(base)
    unet.load_lora_adapter(ctrl / "lora", prefix="unet", use_safetensors=True)
table = load_file(ctrl / "y_embedding.safetensors")["weight"]
unet.class_embedding = torch.nn.Embedding.from_pretrained(table)
inputs = load_file(io / "inputs.safetensors")
with torch.no_grad():
    out = unet(inputs["x"], 500, inputs["h"], class_labels=inputs["y"]).sample
save_file({"eps": out}, io / "plain.safetensors")
assert "ctrldiff" not in sys.modules
"""


def _perturbed(model) -> None:
    with torch.no_grad():
        for p in [*model.trainable_parameters()[0], *model.trainable_parameters()[1]]:
            p.normal_(std=0.1)


def _plain_output(kind: str, base: Path, ctrl: Path, io: Path) -> torch.Tensor:
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-c", PLAIN, kind, str(base), str(ctrl), str(io)]
    proc = subprocess.run(args, env=env, cwd=io, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The text encoder carries no LoRA, so diffusers warns about it; a UNet without keys is a failure.
    unet_misses = [line for line in proc.stderr.splitlines() if "No LoRA keys" in line and "UNet" in line]
    assert not unet_misses, proc.stderr[-3000:]
    return load_file(io / "plain.safetensors")["eps"]


def _ctrldiff_output(model, x: torch.Tensor, c: torch.Tensor, y: torch.Tensor, io: Path) -> torch.Tensor:
    h = model.base.encoder(c)
    save_file({"x": x, "h": h.detach().contiguous(), "y": y}, io / "inputs.safetensors")
    with torch.no_grad():
        return model.base.unet(x, 500, h, class_labels=y).sample


def test_the_embedded_adapter_loads_with_diffusers_load_lora_adapter(tmp_path):
    model = add_control(micro_base(), [0, 1, 2], 2, ATTENTION_PROJECTIONS + RESNET_CONVS)
    _perturbed(model)
    micro_base().save(tmp_path / "base")
    model.save(tmp_path / "ctrl")
    keys = load_file(tmp_path / "ctrl/lora/pytorch_lora_weights.safetensors").keys()
    assert keys and all(k.startswith("unet.") for k in keys)

    loaded = load_control(micro_base(), tmp_path / "ctrl")
    x, c, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 2]), torch.tensor([1, 2])
    ours = _ctrldiff_output(loaded, x, c, y, tmp_path)
    plain = _plain_output("unet", tmp_path / "base/unet", tmp_path / "ctrl", tmp_path)
    torch.testing.assert_close(plain, ours)
    with torch.no_grad(), loaded.reference():
        frozen = loaded.base.unet(x, 500, loaded.base.encoder(c), class_labels=y).sample
    assert not torch.allclose(plain, frozen)  # the adapter did load: it changes the output


def test_a_stable_diffusion_adapter_loads_with_pipe_load_lora_weights(tmp_path):
    sd = build_tiny_sd(tmp_path / "sd")
    model = add_control(load_stable_diffusion(str(sd), ["a cat", "a dog"]), [0, 1], 2)
    _perturbed(model)
    model.save(tmp_path / "ctrl")

    loaded = load_control(load_stable_diffusion(str(sd), ["a cat", "a dog"]), tmp_path / "ctrl")
    shape = loaded.base.sample_shape
    x, c, y = torch.randn(2, *shape), torch.tensor([0, 1]), torch.tensor([1, 0])
    ours = _ctrldiff_output(loaded, x, c, y, tmp_path)
    plain = _plain_output("pipeline", sd, tmp_path / "ctrl", tmp_path)
    torch.testing.assert_close(plain, ours)
