"""The stages end to end on the smoke parameters, in a temporary working directory."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from ctrldiff.classifier import Classifier
from ctrldiff.data import SourceError
from stages import label, train_classifier

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    """Run label -> train_classifier (compressibility, digit) once with the smoke parameters."""
    work = tmp_path_factory.mktemp("smoke")
    shutil.copy(ROOT / "tests/smoke/params.yaml", work / "params.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        label.main([])
        for task in ("compressibility", "digit"):
            train_classifier.main(["--task", task])
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
    for key in ("val_accuracy", "val_nll_before", "val_nll_after", "val_ece_before", "val_ece_after"):
        assert 0.0 <= clf_metrics[key] < 10.0
    assert (smoke_run / "metrics/classifier/compressibility_reliability.png").stat().st_size > 1000
    clf = Classifier.load(smoke_run / "models/classifier/compressibility")
    clf.check_classes([0, 1, 2, 3], label_metrics["compressibility"]["thresholds_bytes"])
    assert Classifier.load(smoke_run / "models/classifier/digit").meta["classes"] == list(range(10))


def test_failed_label_run_keeps_previous_outputs(smoke_run, monkeypatch):
    monkeypatch.chdir(smoke_run)
    before = (smoke_run / "data/labelled/images.parquet").read_bytes()
    good = (smoke_run / "params.yaml").read_text()
    bad = good.replace("source: mnist5k", f"source: folder\n  path: {smoke_run / 'no-such-folder'}")
    (smoke_run / "params.yaml").write_text(bad)
    try:
        with pytest.raises(SourceError, match="no-such-folder"):
            label.main([])
    finally:
        (smoke_run / "params.yaml").write_text(good)
    assert (smoke_run / "data/labelled/images.parquet").read_bytes() == before
    assert not list((smoke_run / "data").glob(".*tmp"))
