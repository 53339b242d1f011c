from pathlib import Path

import pytest
import yaml

from ctrldiff.params import Params, ParamsError, load_params

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, overrides: dict) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_shipped_params_files_are_valid():
    assert isinstance(load_params(ROOT / "params.yaml"), Params)
    assert load_params(ROOT / "tests/smoke/params.yaml").data.max_images == 400


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"gama": 3}, "gama"),  # unknown top-level key
        ({"data.resoluton": 28}, "data.resoluton"),  # typo in a section
        ({"data.resolution": "big"}, "data.resolution"),  # wrong type
        ({"gamma": -1.0}, "gamma"),  # out of range
        ({"label.num_classes": 0}, "label.num_classes"),
        ({"label.val_fraction": 1.5}, "label.val_fraction"),
        ({"label.val_fraction": 0.0}, "label.val_fraction"),
        ({"data.source": "imagenet"}, "data.source"),
        ({"data.source": "folder"}, "data.path"),  # a folder source needs a path
        ({"label.binning": "thresholds", "label.thresholds": [800]}, "label.thresholds"),
        ({"finetune.grad_steps": 11}, "finetune.grad_steps"),  # window longer than the rollout
        ({"finetune.base_last_steps": 10}, "finetune.base_last_steps"),  # no step left to the control
        ({"finetune.base_last_steps": -1}, "finetune.base_last_steps"),
        ({"finetune.lora_targets": []}, "finetune.lora_targets"),
        ({"finetune.decay_updates": 90}, "finetune.decay_updates"),  # 20 warm-up + 90 > 100 updates
        ({"baselines.dps": []}, "baselines.dps"),  # a sweep needs at least one scale
        ({"efficiency.sizes": [250, 5]}, "efficiency.sizes"),  # too few labelled images to split
        ({"multitask.weights": [1.0]}, "multitask.weights"),  # one weight per task
        ({"multitask.weights": [1.0, -1.0]}, "multitask.weights"),
        ({"continuous.num_targets": 1}, "continuous.num_targets"),
    ],
)
def test_bad_parameters_fail_naming_the_key(tmp_path, overrides, key):
    path = write(tmp_path, overrides)
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert key in str(err.value)
    assert str(path) in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ParamsError, match="nope.yaml"):
        load_params(tmp_path / "nope.yaml")


def test_params_rewritten_by_dvc_exp_run_set_param_still_load(tmp_path):
    """`dvc exp run -S gamma=1` rewrites params.yaml with dvc's own YAML writer (quotes dropped)."""
    from dvc.utils.serialize import modify_yaml

    for name in ("params.yaml", "tests/smoke/params.yaml"):
        path = tmp_path / Path(name).name
        path.write_text((ROOT / name).read_text())
        with modify_yaml(path) as raw:
            raw["gamma"] = 1
        params = load_params(path)
        assert params.gamma == 1.0
        assert params.finetune.mixed_precision == "no"


def test_the_validation_stage_writes_the_same_file_for_any_valid_params_and_keeps_it_on_failure(
    tmp_path, monkeypatch
):
    from stages import validate_params

    monkeypatch.chdir(tmp_path)
    write(tmp_path, {"gamma": 10.0})
    validate_params.main([])
    first = (tmp_path / validate_params.VALID).read_bytes()
    write(tmp_path, {"gamma": 30.0, "finetune.lr_lora": 1e-3})
    validate_params.main([])
    assert (tmp_path / validate_params.VALID).read_bytes() == first  # nothing downstream reruns
    write(tmp_path, {"finetune.lr_lroa": 1e-3})
    with pytest.raises(SystemExit, match="finetune.lr_lroa: unknown key"):
        validate_params.main([])
    assert (tmp_path / validate_params.VALID).read_bytes() == first
