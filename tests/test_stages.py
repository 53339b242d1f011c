"""The stages end to end on the smoke parameters, in a temporary working directory."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from ctrldiff.base import BaseModelError, load_stable_diffusion, read_prompts
from ctrldiff.classifier import Classifier, ClassifierError
from ctrldiff.data import SourceError, load_pixels
from stages import (
    base,
    base_rollouts,
    compare_multitask,
    continuous,
    evaluate,
    finetune,
    label,
    label_multitask,
    optimum,
    sample,
    train_classifier,
)
from tests.conftest import output_files
from tests.tiny_sd import build_tiny_sd

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    """Run label -> train_classifier -> base -> sample -> evaluate once with the smoke parameters."""
    work = tmp_path_factory.mktemp("smoke")
    shutil.copy(ROOT / "tests/smoke/params.yaml", work / "params.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        label.main([])
        for task in ("compressibility", "digit"):
            train_classifier.main(["--task", task])
        base.main([])
        base_rollouts.main([])  # the smoke parameters train CTRL with the weighted solver
        optimum.main([])
        finetune.main([])
        for method in ("base", "ctrl"):
            sample.main(["--method", method])
            evaluate.main(["--method", method])
        continuous.main([])
        # multi-task: compressibility and ink from disjoint halves, y = the joint class
        label_multitask.main([])
        train_classifier.main(["--task", "ink"])
        train_classifier.main(["--task", "compressibility_half", "--data", "data/multitask"])
        finetune.main(["--setting", "multitask"])
        for method in ("base", "ctrl"):
            sample.main(["--method", method, "--setting", "multitask"])
            evaluate.main(["--method", method, "--setting", "multitask"])
        compare_multitask.main()
    return work


def test_smoke_pipeline_writes_parquet_classifier_and_metrics(smoke_run):
    table = pd.read_parquet(smoke_run / "data/labelled/images.parquet")
    assert len(table) == 400
    assert {"image", "c", "jpeg_bytes", "y_compressibility", "ink", "y_ink", "half", "split"} <= set(
        table.columns
    )
    assert (table.split == "val").mean() == pytest.approx(0.2, abs=0.01)
    # the second label lives only on its own half
    assert (table.y_ink[table.half == "compressibility"] == -1).all()
    assert (table.y_ink[table.half == "ink"] >= 0).all()

    label_metrics = json.loads((smoke_run / "metrics/label.json").read_text())
    assert sum(label_metrics["compressibility"]["counts"]) == 400
    assert len(label_metrics["compressibility"]["thresholds_bytes"]) == 3

    clf_metrics = json.loads((smoke_run / "metrics/classifier/compressibility.json").read_text())
    digit_metrics = json.loads((smoke_run / "metrics/classifier/digit.json").read_text())
    # one labelled copy per image for the task with an oracle; none for the digit, which has none
    assert clf_metrics["copies"] == 1 and digit_metrics["copies"] == 0
    assert clf_metrics["n_train"] == 2 * digit_metrics["n_train"]
    assert clf_metrics["n_val"] == 2 * digit_metrics["n_val"]
    assert 0.0 <= clf_metrics["val_accuracy_real"] <= 1.0
    for key in ("val_accuracy", "val_nll_before", "val_nll_after", "val_ece_before", "val_ece_after"):
        assert 0.0 <= clf_metrics[key] < 10.0
    assert (smoke_run / "metrics/classifier/compressibility_reliability.png").stat().st_size > 1000
    clf = Classifier.load(smoke_run / "models/classifier/compressibility")
    assert clf.arch.get("kind") != "jpeg_size"  # the smoke params ask for the CNN (the default is dct)
    clf.check_classes([0, 1, 2, 3], label_metrics["compressibility"]["thresholds_bytes"])
    assert Classifier.load(smoke_run / "models/classifier/digit").meta["classes"] == list(range(10))


@pytest.mark.parametrize("problem", ["missing folder", "image without a class"])
def test_failed_label_run_names_the_problem_and_changes_no_output(smoke_run, monkeypatch, tmp_path, problem):
    monkeypatch.chdir(smoke_run)
    before = output_files(smoke_run)
    folder = tmp_path / "images"
    if problem == "missing folder":
        folder, match = smoke_run / "no-such-folder", "no-such-folder"
    else:
        (folder / "cats").mkdir(parents=True)
        for name in ("cats/a.png", "b.png"):  # b.png sits outside every class subfolder
            Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(folder / name)
        match = r"images/b.png has no class c"
    good = (smoke_run / "params.yaml").read_text()
    (smoke_run / "params.yaml").write_text(
        good.replace("source: mnist5k", f"source: folder\n  path: {folder}")
    )
    try:
        with pytest.raises(SourceError, match=match):
            label.main([])
    finally:
        (smoke_run / "params.yaml").write_text(good)
    assert output_files(smoke_run) == before


def test_smoke_base_sample_evaluate_fill_the_metrics_shape(smoke_run):
    samples = pd.read_parquet(smoke_run / "data/samples/base/samples.parquet")
    assert len(samples) == 10 * 4  # every (c, y) once
    assert samples.seed.is_unique
    m = json.loads((smoke_run / "metrics/eval/base.json").read_text())
    assert m["method"] == "base" and m["n_per_class"] == 10
    task = m["tasks"]["compressibility"]
    assert 0 <= task["accuracy"] <= 1 and 0 <= task["macro_f1"] <= 1
    assert sum(map(sum, task["confusion"])) == 40 and len(task["mean_score_per_class"]) == 4
    assert 0 <= m["fidelity"]["c_accuracy"] <= 1 and m["fidelity"]["frechet"] >= 0
    assert m["cost"]["nfe_per_image"] == 10 and m["cost"]["seconds_per_image"] > 0
    assert (smoke_run / "metrics/samples/base_grid.png").stat().st_size > 1000


def test_tiny_stable_diffusion_runs_through_base_and_sample_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sd = build_tiny_sd(tmp_path / "tiny-sd")
    images = tmp_path / "images"
    (images / "0").mkdir(parents=True)  # one class subfolder: c only stratifies the split here
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(images / "0" / f"{i}.png")
    (tmp_path / "prompts.txt").write_text("a photo of a cat\n\na dog\n")
    params = yaml.safe_load((ROOT / "tests/smoke/params.yaml").read_text())
    params["data"] = {"source": "folder", "path": str(images), "resolution": 16, "channels": 3}
    params["base"] = {
        "kind": "stable-diffusion",
        "pretrained": str(sd),
        "prompts": str(tmp_path / "prompts.txt"),
    }
    params["sample"] = {"steps": 3, "n_per_request": 1, "batch_size": 8}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    label.main([])
    base.main([])
    assert json.loads((tmp_path / "models/base/base.json").read_text())["pretrained"] == str(sd)
    sample.main(["--method", "base"])
    samples = pd.read_parquet(tmp_path / "data/samples/base/samples.parquet")
    assert len(samples) == 2 * 4  # 2 prompts x 4 compressibility classes
    assert load_pixels(samples.iloc[0], 16, 3).shape == (16, 16, 3)


def test_bad_pretrained_path_or_prompt_file_is_named(tmp_path):
    with pytest.raises(BaseModelError, match="no-such-sd"):
        load_stable_diffusion(str(tmp_path / "no-such-sd"), ["x"])
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(BaseModelError, match="empty.txt"):
        read_prompts(tmp_path / "empty.txt")


def test_smoke_optimum_reports_the_tilted_targets_terms(smoke_run):
    m = json.loads((smoke_run / "metrics/optimum.json").read_text())
    o = m["objective"]
    assert m["n_per_c"] == 4 and 0 <= m["tasks"]["compressibility"]["accuracy"] <= 1
    assert o["kl"] >= 0 and o["objective"] == pytest.approx(m["gamma"] * o["reward_log_p"] - o["kl"])
    ctrl = json.loads((smoke_run / "metrics/eval/ctrl.json").read_text())
    assert ctrl["objective"]["kl"] >= 0  # the trajectory KL of CTRL's own samples


def test_smoke_finetune_writes_adapter_checkpoint_and_log(smoke_run):
    summary = json.loads((smoke_run / "metrics/finetune/metrics.json").read_text())
    assert summary["updates"] == 2 and summary["trajectories_per_update"] == 2
    assert json.loads((smoke_run / "models/ctrl_checkpoint/state.json").read_text())["update"] == 2
    assert (smoke_run / "models/ctrl/lora/pytorch_lora_weights.safetensors").is_file()
    assert (smoke_run / "metrics/finetune/plots/metrics/reward.tsv").is_file()
    ctrl = json.loads((smoke_run / "metrics/eval/ctrl.json").read_text())
    assert ctrl["method"] == "ctrl" and ctrl["cost"] == json.loads(
        (smoke_run / "metrics/eval/base.json").read_text()
    )["cost"] | {"seconds_per_image": ctrl["cost"]["seconds_per_image"]}


def test_finetune_refuses_a_classifier_of_other_classes(smoke_run, monkeypatch):
    monkeypatch.chdir(smoke_run)
    config_path = smoke_run / "models/classifier/compressibility/config.json"
    good = config_path.read_text()
    config = json.loads(good)
    config["meta"]["classes"] = [0, 1, 2]
    config_path.write_text(json.dumps(config))
    try:
        with pytest.raises(ClassifierError, match="classes"):
            finetune.main([])
    finally:
        config_path.write_text(good)


def test_smoke_multitask_trains_on_disjoint_halves_and_reports_per_task_and_joint(smoke_run):
    labels = json.loads((smoke_run / "metrics/multitask/label.json").read_text())
    assert labels["images_with_both_labels"] == 0
    assert labels["labelled"] == {"compressibility_half": 200, "ink": 200}
    control = json.loads((smoke_run / "models/ctrl_multitask/control.json").read_text())
    assert control["y_classes"] == [0, 1, 2, 3]  # 2 compressibility x 2 ink classes
    log = (smoke_run / "metrics/multitask/finetune/plots/metrics/probe/ink_accuracy.tsv").read_text()
    assert len(log.splitlines()) == 3  # header + one probe per update
    m = json.loads((smoke_run / "metrics/multitask/eval/ctrl.json").read_text())
    assert set(m["tasks"]) == {"compressibility_half", "ink", "joint"}
    assert m["n_per_class"] == 10 and len(m["tasks"]["joint"]["confusion"]) == 4
    summary = json.loads((smoke_run / "metrics/multitask/summary.json").read_text())
    assert summary["cfg"]["trainable"] is False and summary["cfg"]["images_with_both_labels"] == 0
    assert set(summary["methods"]) == {"base", "ctrl"}
    assert "hardest joint class" in (smoke_run / "reports/multitask.md").read_text()


def test_smoke_continuous_reports_parity_metrics_and_plot(smoke_run):
    m = json.loads((smoke_run / "metrics/continuous.json").read_text())
    method, reference = m["reward"], m["oracle_calibrated"]
    assert method["n_images"] == reference["n_images"] == 3 * 10 and len(m["targets_bytes"]) == 3
    cal = m["calibration"]  # the calibrated rule measured the classes' own rows on 10 digits each
    assert cal["positions"] == [0.0, 1.0, 2.0, 3.0] and cal["n_images"] == 4 * 10
    assert m["targets_bytes"][0] == pytest.approx(min(cal["reward_mean_bytes"]))  # the reward's range
    for r in (method, reference):
        assert r["per_image"]["mae"] >= 0 and r["per_image"]["rmse"] >= r["per_image"]["mae"]
        assert len(r["positions"]) == 3 and all(0 <= u <= 3 for u in r["positions"])
    assert "oracle" in reference["note"]
    assert (smoke_run / "metrics/continuous_parity.png").stat().st_size > 1000


def test_continuous_calibrates_with_the_reward_model_and_the_oracle_only_judges(smoke_run, monkeypatch):
    """An oracle shifted by 100 B moves the oracle-calibrated reference's positions, not the method's;
    the method does not read the evaluation's oracle metrics either."""
    from ctrldiff import tasks

    before = json.loads((smoke_run / "metrics/continuous.json").read_text())
    monkeypatch.chdir(smoke_run)
    (smoke_run / "metrics/eval/ctrl.json").rename(smoke_run / "ctrl.json.away")
    real = tasks.oracle_classes
    monkeypatch.setattr(continuous, "oracle_classes", lambda px, spec: (real(px, spec)[0] + 100.0, None))
    try:
        continuous.main([])
    finally:
        (smoke_run / "ctrl.json.away").rename(smoke_run / "metrics/eval/ctrl.json")
    after = json.loads((smoke_run / "metrics/continuous.json").read_text())
    assert after["reward"]["positions"] == before["reward"]["positions"]
    assert after["targets_bytes"] == before["targets_bytes"]
    assert after["calibration"]["oracle_mean_bytes"] == pytest.approx(
        [v + 100 for v in before["calibration"]["oracle_mean_bytes"]]
    )


def test_finetune_stage_on_two_processes_writes_complete_outputs_and_each_log_line_once(smoke_run, tmp_path):
    """`torchrun -m stages.finetune` with 2 CPU processes: only the main process writes the adapter,
    the metrics and the dvclive log; a resumed run replays the earlier updates exactly once."""
    from ctrldiff.base import load_base
    from ctrldiff.control import load_control
    from tests.conftest import free_port

    parts = (
        "params.yaml",
        "data/labelled",
        "data/base_rollouts",
        "models/base",
        "models/classifier/compressibility",
    )
    for part in parts:
        src, dst = smoke_run / part, tmp_path / part
        shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def launch(updates: int) -> None:
        params = yaml.safe_load((tmp_path / "params.yaml").read_text())
        params["finetune"] |= {"updates": updates, "checkpoint_every": 1}
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), "-m", "stages.finetune"]  # fmt: skip
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    launch(2)
    launch(3)  # resumes from update 2 of the same settings
    summary = json.loads((tmp_path / "metrics/finetune/metrics.json").read_text())
    assert summary["resumed_from_update"] == 2 and summary["trajectories_per_update"] == 2 * 2
    assert summary["step"] == 3  # dvclive's summary: the last update, written by the main process
    reward_log = (tmp_path / "metrics/finetune/plots/metrics/reward.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in reward_log[1:]] == ["1", "2", "3"]
    model = load_control(load_base(tmp_path / "models/base"), tmp_path / "models/ctrl")
    assert len(model.y_classes) == 4
    leftovers = [p.name for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]
    assert not leftovers  # no half-written temporary directories from a racing rank


def test_the_readmes_python_snippet_samples_from_the_trained_adapter(smoke_run):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Using a trained adapter from Python", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    cmd = [sys.executable, "-c", code]
    proc = subprocess.run(cmd, cwd=smoke_run, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    images = [Image.open(smoke_run / f"ctrl_c3_y{k}.png") for k in range(4)]
    assert all(image.size == (28, 28) for image in images)


def _eval_record(method: str, accuracy: float, c_accuracy: float) -> dict:
    return {
        "method": method,
        "n_per_class": 2,
        "tasks": {"compressibility": {"accuracy": accuracy, "macro_f1": accuracy}},
        "fidelity": {"c_accuracy": c_accuracy, "c_accuracy_real_heldout": 0.99, "frechet_real_heldout": 0.5},
    }


def test_tune_rerun_keeps_its_decision_bytes_and_writes_seconds_apart(smoke_run, monkeypatch):
    """`sample` and the efficiency study depend on tune/<method>.json: a rerun that measures the same
    scores must leave its bytes as they were (so DVC reruns nothing below it), while the sweep's seconds
    per image, which change on every run, go to a file nothing depends on."""
    from stages import tune

    monkeypatch.chdir(smoke_run)
    decision, seconds = Path("metrics/tune/dps.json"), Path("metrics/tune/dps_seconds.json")
    tune.main(["--method", "dps"])
    first = decision.read_bytes()
    tune.main(["--method", "dps"])
    assert decision.read_bytes() == first
    assert b"seconds_per_image" not in first
    record = json.loads(first)
    assert record["chosen"]["scale"] == 0.1 and [s["scale"] for s in record["sweep"]] == [0.1]
    timing = json.loads(seconds.read_text())
    assert timing["method"] == "dps" and timing["sweep"][0]["seconds_per_image"] > 0


def test_compare_draws_each_sweep_and_names_a_missing_one(tmp_path, monkeypatch):
    from stages import compare

    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "tests/smoke/params.yaml", "params.yaml")
    Path("metrics/eval").mkdir(parents=True)
    Path("metrics/tune").mkdir()
    for method, acc, fid in (("base", 0.25, 0.98), ("ctrl", 0.6, 0.85), ("dps", 0.5, 0.94)):
        (tmp_path / f"metrics/eval/{method}.json").write_text(json.dumps(_eval_record(method, acc, fid)))
    sweep = [{"scale": s, "accuracy": a, "c_accuracy": f} for s, a, f in ((0.1, 0.3, 0.97), (0.4, 0.5, 0.95))]
    record = {"method": "dps", "sweep": sweep, "chosen": sweep[1]}
    Path("metrics/tune/dps.json").write_text(json.dumps(record))
    evals = [f"metrics/eval/{m}.json" for m in ("base", "ctrl", "dps")]

    compare.main([*evals, "--tune", "metrics/tune/dps.json"])
    with Image.open("metrics/tradeoff.png") as image:
        assert image.format == "PNG" and image.size[0] > 200
    assert set(json.loads(Path("metrics/summary.json").read_text())) == {"base", "ctrl", "dps"}

    with pytest.raises(SystemExit, match="metrics/tune/svdd.json"):
        compare.main([*evals, "--tune", "metrics/tune/dps.json", "metrics/tune/svdd.json"])
