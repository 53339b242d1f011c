"""The DVC pipelines themselves: every stage's deps name the code it runs, finetune's params and deps
are what its checkpoint fingerprints, and the lock check catches a stale dvc.lock."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ctrldiff.finetune import NOT_FINGERPRINTED
from ctrldiff.params import FinetuneParams
from ctrldiff.provenance import import_closure
from stages.validate_params import VALID
from tests.conftest import output_files

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = sorted(p.relative_to(ROOT) for p in ROOT.glob("**/dvc.yaml") if ".venv" not in p.parts)


def stages(pipeline: Path):
    """(name, stage definition, the folder its paths are relative to) for every stage and foreach item."""
    doc = yaml.safe_load((ROOT / pipeline).read_text())
    for name, stage in doc["stages"].items():
        body = stage.get("do", stage)
        wdir = (ROOT / pipeline).parent / body.get("wdir", ".")
        items = stage.get("foreach", [None])
        for item in items.items() if isinstance(items, dict) else items:
            yield name, body, wdir.resolve(), item


def modules_run(cmd: str) -> list[str]:
    """The python modules a stage's command runs (`python -m M` or `accelerate launch -m M`)."""
    words = shlex.split(cmd.replace("${run}", "python -m"))
    return [
        words[i + 1] for i, w in enumerate(words[:-1]) if w == "-m" and words[i + 1].startswith("stages.")
    ]


@pytest.mark.parametrize("pipeline", PIPELINES, ids=str)
def test_every_stage_depends_on_the_code_it_imports(pipeline):
    for name, body, wdir, _ in stages(pipeline):
        deps = {(wdir / re.sub(r"\$\{[^}]+\}", "X", d)).resolve() for d in body.get("deps", [])}
        for module in modules_run(body["cmd"]):
            missing = [p for p in import_closure(module) if p.name != "__init__.py" or "guidance" in p.parts]
            missing = [str(p.relative_to(ROOT)) for p in missing if p.resolve() not in deps]
            assert not missing, f"{pipeline}: stage {name} runs {module} but does not depend on {missing}"


def test_finetunes_params_are_what_its_checkpoint_fingerprints_plus_the_logging_cadence():
    body = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["finetune"]
    listed = {p.removeprefix("finetune.") for p in body["params"] if p.startswith("finetune.")}
    fingerprinted = set(FinetuneParams.model_fields) - set(NOT_FINGERPRINTED)
    logging = {"updates", "decay_updates", "probe_every", "probe_per_class"}  # the log and the run's length
    assert listed == fingerprinted | logging
    assert {"seed", "gamma"} <= set(body["params"]) and "sample" not in body["params"]
    code = {str(p.relative_to(ROOT)) for p in import_closure("stages.finetune")}
    assert {d for d in body["deps"] if d.endswith(".py")} == code


def test_the_lock_check_flags_stale_code_and_params_and_ignores_missing_outputs(tmp_path):
    """A two-stage pipeline in a scratch repository: after `dvc repro` the check passes, also with the
    outputs gone (a clean clone); an edited code dep or param fails it; a stage never run is listed."""
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def sh(*cmd):
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)

    def check():
        return sh(sys.executable, str(ROOT / ".ci/lock_check.py"), ".")

    sh("git", "init", "-q")
    sh("dvc", "init", "-q")
    (tmp_path / "step.py").write_text("import sys; open(sys.argv[1], 'w').write('out')\n")
    (tmp_path / "params.yaml").write_text("lr: 0.1\n")
    stages = {
        "make": {
            "cmd": "python step.py data.txt",
            "deps": ["step.py"],
            "params": ["lr"],
            "outs": ["data.txt"],
        },
        "use": {"cmd": "python step.py result.txt", "deps": ["data.txt", "step.py"], "outs": ["result.txt"]},
    }
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    assert sh("dvc", "repro", "-q").returncode == 0
    assert check().returncode == 0
    for out in ("data.txt", "result.txt"):
        (tmp_path / out).unlink()
    assert check().returncode == 0, check().stdout  # missing outputs: a clean clone, not a failure
    (tmp_path / "step.py").write_text("import sys; open(sys.argv[1], 'w').write('other')\n")
    stale = check()
    assert stale.returncode == 1 and "stale: make: step.py modified" in stale.stdout
    sh("dvc", "repro", "-q")
    (tmp_path / "params.yaml").write_text("lr: 0.2\n")
    assert "param lr modified" in check().stdout
    (tmp_path / "params.yaml").write_text("lr: 0.1\n")
    stages["new"] = {"cmd": "python step.py new.txt", "deps": ["step.py"], "outs": ["new.txt"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    never_run = check()
    assert never_run.returncode == 0 and "never run: new" in never_run.stdout


def _lookup(params: dict, dotted: str) -> bool:
    node = params
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


@pytest.mark.parametrize("params_file", ["params.yaml", "tests/smoke/params.yaml"])
def test_every_param_a_stage_names_is_in_the_params_file(params_file):
    """DVC refuses a stage whose params key is absent from the file, even where the schema has a default."""
    params = yaml.safe_load((ROOT / params_file).read_text())
    for pipeline in PIPELINES:
        if pipeline.parts[0] == "paper":
            continue
        for name, body, _, item in stages(pipeline):
            for entry in body.get("params", []):
                keys = [k for k in (entry if isinstance(entry, dict) else {None: [entry]}).values() if k]
                for key in (k for group in keys for k in group):
                    if isinstance(item, tuple):  # a foreach over a mapping: ${key} is its key
                        key = key.replace("${key}", item[0])
                    elif item is not None:
                        key = key.replace("${item}", str(item))
                    where = f"{pipeline}: stage {name} names {key}"
                    assert _lookup(params, key), f"{where}, absent from {params_file}"


def test_paper_params_name_only_keys_in_its_params_file():
    params = yaml.safe_load((ROOT / "paper/params.yaml").read_text())
    for name, body, _, _ in stages(Path("paper/dvc.yaml")):
        for entry in body.get("params", []):
            if isinstance(entry, str):
                assert _lookup(params, entry), f"paper/dvc.yaml: stage {name} names {entry}, absent"


@pytest.mark.parametrize("pipeline", PIPELINES, ids=str)
def test_every_stage_but_the_validation_depends_on_it(pipeline):
    for name, body, wdir, _ in stages(pipeline):
        if name != "validate_params":
            deps = {(wdir / d).resolve() for d in body.get("deps", [])}
            runs_in = re.match(r"cd (\S+) && ", body["cmd"])  # a study's stages run in the root
            valid = (wdir / runs_in.group(1) if runs_in else wdir) / VALID
            assert valid.resolve() in deps, f"{pipeline}: stage {name} does not depend on {VALID}"


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda p: p["finetune"].update(lr_lroa=1e-3), "finetune.lr_lroa: unknown key"),
        (lambda p: p.update(gamma=-1), "gamma: Input should be greater than 0"),
        (lambda p: p.update(gama=10), "gama: unknown key"),
    ],
    ids=["typo-in-section", "out-of-range", "unknown-top-level"],
)
def test_bad_params_stop_dvc_repro_before_any_output_is_removed(tmp_path, edit, named):
    """A checkout with every stage's outputs in place (stand-ins): `dvc repro` with a bad params.yaml fails
    naming the key, and no file under data/, models/ or metrics/ changed."""
    repo = tmp_path / "repo"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            (repo / f).write_bytes((ROOT / f).read_bytes())
    for out in ("data/labelled/images.parquet", "models/base/base.json", "models/ctrl/control.json"):
        (repo / out).parent.mkdir(parents=True, exist_ok=True)
        (repo / out).write_text("an earlier run's output\n")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    edit(params)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    before = output_files(repo)
    dvc = Path(sys.executable).with_name("dvc")
    run = subprocess.run([str(dvc), "repro"], cwd=repo, capture_output=True, text=True)
    assert run.returncode != 0
    assert named in run.stdout + run.stderr
    assert output_files(repo) == before


def test_the_readmes_exp_show_recipe_gives_the_knobs_and_the_headline_figures():
    """The `dvc exp show --drop … --keep …` line of the README, on this repository's committed metrics."""
    readme = (ROOT / "README.md").read_text()
    line = next(line for line in readme.splitlines() if line.startswith("dvc exp show "))
    cmd = [sys.executable, "-m", "dvc", *shlex.split(line)[1:], "--csv", "--no-pager"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    header = proc.stdout.splitlines()[0].split(",")
    assert set(header) == {
        "Experiment", "gamma", "finetune.solver", "ctrl.accuracy", "ctrl.c_accuracy", "ctrl.objective",
        "optimum.objective",
    }  # fmt: skip


def test_dvc_metrics_show_in_the_root_loads_every_metrics_file_it_lists():
    """Neither paper/ (a DVC subrepo) nor an unrun study makes the root's metrics commands warn."""
    cmd = [sys.executable, "-m", "dvc", "metrics", "show"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "failed to load" not in proc.stdout + proc.stderr
    listed = [line.split()[0] for line in proc.stdout.splitlines()[1:] if line.strip()]
    assert listed == ["metrics/summary.json"]
