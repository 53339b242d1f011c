"""One validated schema for ``params.yaml``: every stage loads its parameters through here.

A typo, a wrong type or an out-of-range value fails at start-up with the key's dotted name,
instead of surfacing as a confusing error half-way through a stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ParamsError(ValueError):
    """A ``params.yaml`` that does not match the schema; the message names file and key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(_Section):
    """Where the offline images come from and at which size they are used."""

    source: Literal["mnist5k", "sklearn_digits", "folder", "ava"] = "mnist5k"
    path: str | None = None  # the image folder (folder) or AVA root holding AVA.txt (ava)
    csv: str | None = None  # folder only: optional CSV with a `file` column and extra columns
    resolution: int = Field(28, ge=8, le=1024)
    channels: Literal[1, 3] = 1
    max_images: int | None = Field(None, ge=1)  # seeded subsample, for smoke runs

    @model_validator(mode="after")
    def _path_for_file_sources(self) -> DataParams:
        if self.source in ("folder", "ava") and not self.path:
            raise ValueError(f"data.path is required when data.source is {self.source!r}")
        return self


class SecondLabelParams(_Section):
    """The second image property, labelled on a disjoint half of the images (multi-task)."""

    property: Literal["ink"] = "ink"
    num_classes: int = Field(2, ge=2)


class LabelParams(_Section):
    """How the JPEG-compressibility label y is computed and binned into classes."""

    jpeg_quality: int = Field(95, ge=1, le=100)
    num_classes: int = Field(4, ge=2)
    binning: Literal["quantile", "thresholds"] = "quantile"
    thresholds: list[float] = Field(default_factory=list)  # bytes; used when binning == thresholds
    second: SecondLabelParams = SecondLabelParams()
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _thresholds_match_classes(self) -> LabelParams:
        if self.binning == "thresholds":
            if len(self.thresholds) != self.num_classes - 1:
                raise ValueError(
                    f"label.thresholds needs num_classes - 1 = {self.num_classes - 1} values, "
                    f"got {len(self.thresholds)}"
                )
            if len(set(self.thresholds)) != len(self.thresholds) or min(self.thresholds) <= 0:
                raise ValueError("label.thresholds must be distinct positive byte counts")
        return self


class ClassifierParams(_Section):
    """The small CNN trained on (image, label) pairs and temperature-calibrated."""

    tasks: list[Literal["compressibility", "digit", "ink"]] = ["compressibility", "digit", "ink"]
    epochs: int = Field(15, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    width: int = Field(32, ge=4)
    ece_bins: int = Field(15, ge=2)


class Params(_Section):
    """The whole ``params.yaml``."""

    seed: int = 0
    gamma: float = Field(10.0, gt=0)  # CTRL guidance strength: the true gamma of the tilted target
    data: DataParams = DataParams()
    label: LabelParams = LabelParams()
    classifier: ClassifierParams = ClassifierParams()


def _key(loc: tuple) -> str:
    return ".".join(str(part) for part in loc) or "<top level>"


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; raise ParamsError naming the file and every bad key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: parameter file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of parameters at the top level")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = "unknown key (typo?)"
            problems.append(f"  {_key(e['loc'])}: {msg}")
        raise ParamsError(f"{path}: invalid parameters\n" + "\n".join(problems)) from None
