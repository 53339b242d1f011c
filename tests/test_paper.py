"""Paper scale offline: `paper/params.yaml` on tiny SD-shaped and CLIP-shaped models with random weights.

The stages run exactly as `cd paper && dvc repro` runs them; only the paths (and sizes a CPU can
afford) are overridden, as a GPU user would point them at real weights.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from ctrldiff.aesthetic import AestheticError, AestheticHead, load_scorer
from ctrldiff.data import SourceError, read_source
from ctrldiff.oracles import oracle_scores
from ctrldiff.params import DataParams, ParamsError, load_params
from stages import base, evaluate, finetune, label, label_multitask, sample, train_classifier
from tests.conftest import free_port
from tests.tiny_sd import build_tiny_models, paper_params_on_tiny_models

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "paper/params.yaml"


def test_paper_params_are_the_papers_settings():
    p = load_params(PAPER)
    assert p.base.kind == "stable-diffusion" and p.data.source == "ava" and p.data.resolution == 512
    assert (p.sample.steps, p.sample.eta, p.sample.guidance_scale) == (50, 1.0, 7.5)
    ro = p.finetune.rollout  # the training rollouts: the same sampler as the evaluation's
    assert (ro.steps, ro.eta, ro.guidance_scale) == (50, 1.0, 7.5)
    assert p.label.thresholds == [110_000, 85_000, 60_000] and p.label.second.thresholds == [5.7]
    assert p.multitask.compressibility_thresholds == [70_000] and p.label.second.property == "aesthetic"
    ft = p.finetune
    assert (ft.lora_rank, ft.lr_lora, ft.lr_embedding, ft.weight_decay) == (4, 1e-3, 1e-2, 0.1)
    assert ft.batch_size * 4 * ft.grad_accumulation == 256  # trajectories per update on 4 GPUs
    assert (ROOT / "paper" / p.base.prompts).is_file()


def test_aesthetic_needs_its_files(tmp_path):
    raw = yaml.safe_load(PAPER.read_text())
    del raw["aesthetic"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match="aesthetic.clip"):
        load_params(tmp_path / "params.yaml")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    return build_tiny_models(tmp_path_factory.mktemp("tiny"))


def test_bad_clip_folder_or_head_is_named(tmp_path, tiny_models):
    with pytest.raises(AestheticError, match="no-such-clip"):
        load_scorer(str(tmp_path / "no-such-clip"), str(tiny_models["head"]))
    wrong = tmp_path / "vit-l-head.safetensors"
    save_file(AestheticHead(768).state_dict(), wrong)  # the real head's 768-d input, on a 16-d backbone
    with pytest.raises(AestheticError, match="vit-l-head.safetensors.*768"):
        load_scorer(str(tiny_models["clip"]), str(wrong))
    with pytest.raises(AestheticError, match="missing-head.pth"):
        load_scorer(str(tiny_models["clip"]), str(tmp_path / "missing-head.pth"))


def test_ava_folder_without_ava_txt_is_named(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(SourceError, match="AVA.txt"):
        read_source(DataParams(source="ava", path=str(tmp_path), resolution=16, channels=3))


def test_aesthetic_scorer_is_the_laion_mlp_on_normalised_clip_features(tiny_models):
    scorer = load_scorer(str(tiny_models["clip"]), str(tiny_models["head"]))
    pixels = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    x = torch.nn.functional.interpolate(x, size=32, mode="bicubic", align_corners=False).clamp(0, 1)
    features = scorer.clip.encode_image((x - scorer.mean) / scorer.std)
    head = load_file(tiny_models["head"])
    h = torch.nn.functional.normalize(features, dim=-1)
    for i in (0, 2, 4, 6, 7):
        h = h @ head[f"layers.{i}.weight"].T + head[f"layers.{i}.bias"]
    expected = h.squeeze(-1).detach().numpy()
    spec = {"score": "aesthetic", "clip": str(tiny_models["clip"]), "head": str(tiny_models["head"])}
    np.testing.assert_allclose(oracle_scores(list(pixels), spec), expected, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory, tiny_models) -> Path:
    """label -> train_classifier -> base -> finetune -> sample -> evaluate, single and multi-task."""
    work = tmp_path_factory.mktemp("paper")
    (work / "prompts.txt").write_text("a photo of a cat\na dog\n")
    (work / "params.yaml").write_text(yaml.safe_dump(paper_params_on_tiny_models(PAPER, tiny_models)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.chdir(work)
        label.main([])
        for task in ("compressibility", "aesthetic"):
            train_classifier.main(["--task", task])
        base.main([])
        finetune.main([])
        for method in ("base", "ctrl"):
            sample.main(["--method", method])
            evaluate.main(["--method", method, "--no-fidelity"])
        label_multitask.main([])
        train_classifier.main(["--task", "compressibility_half", "--data", "data/multitask"])
        finetune.main(["--setting", "multitask"])
        sample.main(["--method", "ctrl", "--setting", "multitask"])
        evaluate.main(["--method", "ctrl", "--setting", "multitask", "--no-fidelity"])
    return work


def test_ava_is_labelled_by_jpeg_size_and_the_aesthetic_scorer_on_disjoint_halves(paper_run, tiny_models):
    table = pd.read_parquet(paper_run / "data/labelled/images.parquet")
    meta = json.loads((paper_run / "data/labelled/meta.json").read_text())
    assert len(table) == 40 and table["ava_score"].between(1, 10).all()
    on = table["half"] == "aesthetic"
    assert (table.loc[on, "y_aesthetic"] >= 0).all() and (table.loc[~on, "y_aesthetic"] == -1).all()
    assert table.loc[~on, "aesthetic"].isna().all()  # the scorer runs on its own half only
    spec = meta["tasks"]["aesthetic"]
    assert spec["clip"] == str(tiny_models["clip"]) and spec["thresholds"]
    multi = json.loads((paper_run / "metrics/multitask/label.json").read_text())
    assert multi["tasks"] == ["compressibility_half", "aesthetic"] and multi["images_with_both_labels"] == 0


def test_finetune_on_stable_diffusion_writes_a_standard_adapter(paper_run):
    summary = json.loads((paper_run / "metrics/finetune/metrics.json").read_text())
    assert summary["updates"] == 2 and summary["trajectories_per_update"] == 2
    assert (paper_run / "models/ctrl/lora/pytorch_lora_weights.safetensors").is_file()
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(
        Path(load_params(paper_run / "params.yaml").base.pretrained), subfolder="unet"
    )
    unet.load_lora_adapter(paper_run / "models/ctrl/lora", prefix="unet", use_safetensors=True)
    assert any("lora" in n for n, _ in unet.named_parameters())


def test_evaluation_on_stable_diffusion_uses_the_oracles(paper_run):
    for path, tasks in (
        ("metrics/eval/ctrl.json", ["compressibility"]),
        ("metrics/multitask/eval/ctrl.json", ["compressibility_half", "aesthetic", "joint"]),
    ):
        m = json.loads((paper_run / path).read_text())
        assert list(m["tasks"]) == tasks and m["fidelity"] is None
        assert all(0 <= t["accuracy"] <= 1 for t in m["tasks"].values())
    samples = pd.read_parquet(paper_run / "data/samples/ctrl/samples.parquet")
    assert len(samples) == 2 * 4  # 2 prompts x 4 compressibility classes


def test_two_processes_on_tiny_stable_diffusion_end_with_identical_parameters(tmp_path, tiny_models):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()),
        str(ROOT / "tests/ddp_worker.py"), str(tmp_path), str(tiny_models["sd"]),
    ]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 x 2 processes" in proc.stdout
    r0, r1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert r0.keys() == r1.keys() and any("class_embedding" in k for k in r0)
    assert any("attn2" in k for k in r0)  # cross-attention projections of the SD UNet carry LoRA
    for name in r0:
        torch.testing.assert_close(r0[name], r1[name], rtol=0, atol=0, msg=name)
