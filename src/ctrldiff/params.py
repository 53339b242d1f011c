"""One validated schema for ``params.yaml``: every stage loads its parameters through here.

A typo, a wrong type or an out-of-range value fails at start-up with the key's dotted name,
instead of surfacing as a confusing error half-way through a stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator


class ParamsError(ValueError):
    """A ``params.yaml`` that does not match the schema; the message names file and key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(_Section):
    """Where the offline images come from and at which size they are used."""

    source: Literal["mnist5k", "sklearn_digits", "folder", "ava"] = "mnist5k"
    path: str | None = None  # the image folder (folder) or AVA root holding AVA.txt (ava)
    csv: str | None = None  # folder only: CSV with a `file` column, optional `c` and extra columns
    resolution: int = Field(28, ge=8, le=1024)
    channels: Literal[1, 3] = 1
    max_images: int | None = Field(None, ge=1)  # seeded subsample, for smoke runs

    @model_validator(mode="after")
    def _path_for_file_sources(self) -> DataParams:
        if self.source in ("folder", "ava") and not self.path:
            raise ValueError(f"data.path is required when data.source is {self.source!r}")
        return self


def _check_thresholds(section: str, binning: str, thresholds: list[float], num_classes: int) -> None:
    """Fixed cut points: num_classes - 1 distinct values (any order; classes count from the top)."""
    if binning != "thresholds":
        return
    if len(thresholds) != num_classes - 1:
        raise ValueError(
            f"{section}.thresholds needs num_classes - 1 = {num_classes - 1} values, got {len(thresholds)}"
        )
    if len(set(thresholds)) != len(thresholds):
        raise ValueError(f"{section}.thresholds must be distinct")


class SecondLabelParams(_Section):
    """The second image property, labelled on a disjoint half of the images (multi-task).

    ink: share of bright pixels (embedded digits); aesthetic: the CLIP aesthetic scorer (paper scale).
    """

    property: Literal["ink", "aesthetic"] = "ink"
    num_classes: int = Field(2, ge=2)
    binning: Literal["quantile", "thresholds"] = "quantile"  # quantiles of its own half, or fixed cuts
    thresholds: list[float] = Field(default_factory=list)  # e.g. [5.7] for the paper's aesthetic cut

    @model_validator(mode="after")
    def _thresholds_match_classes(self) -> SecondLabelParams:
        _check_thresholds("label.second", self.binning, self.thresholds, self.num_classes)
        return self


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
        _check_thresholds("label", self.binning, self.thresholds, self.num_classes)
        if self.thresholds and min(self.thresholds) <= 0:
            raise ValueError("label.thresholds must be positive byte counts")
        return self


class ClassifierParams(_Section):
    """The classifiers trained on (image, label) pairs and temperature-calibrated."""

    # JPEG compressibility: cnn, the SmallCNN every task uses (the epochs ... width keys below), or
    # dct, the ordinal size model on JPEG's 8x8 DCT (ctrldiff.jpeg_size; single-channel images).
    compressibility_model: Literal["cnn", "dct"] = "cnn"
    epochs: int = Field(15, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    width: int = Field(32, ge=4)
    ece_bins: int = Field(15, ge=2)
    # Shifted, noisy copies of each labelled image, labelled by the task's own oracle (tasks without
    # one, like the digit, get none): more pairs, and the faint noise generated images carry.
    copies: int = Field(0, ge=0)
    copy_shift: int = Field(2, ge=0)  # each copy rolled by up to this many pixels along each axis
    copy_noise: float = Field(16.0, ge=0, le=255)  # copy noise sd drawn uniformly in [0, this] 8-bit levels


class BaseParams(_Section):
    """The pre-trained model p_pre(x | c): trained here (embedded) or loaded (stable-diffusion)."""

    kind: Literal["embedded", "stable-diffusion"] = "embedded"
    pretrained: str | None = None  # stable-diffusion: hub id or local diffusers folder
    prompts: str | None = None  # stable-diffusion: text file, one prompt (one class c) per line
    block_out_channels: list[int] = [32, 64, 64]
    attention_levels: list[int] = [2]  # which resolution levels get cross-attention to c
    layers_per_block: int = Field(1, ge=1)
    cross_attention_dim: int = Field(64, ge=8)
    attention_head_dim: int = Field(8, ge=1)
    norm_num_groups: int = Field(8, ge=1)
    num_train_timesteps: int = Field(1000, ge=10)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"  # what the denoiser learns
    train_steps: int = Field(800, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    cond_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    ema_decay: float = Field(0.995, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _consistent(self) -> BaseParams:
        if self.kind == "stable-diffusion" and not (self.pretrained and self.prompts):
            raise ValueError(
                "base.pretrained and base.prompts are required when base.kind is stable-diffusion"
            )
        if any(ch % self.norm_num_groups for ch in self.block_out_channels):
            raise ValueError("base.block_out_channels must all be divisible by base.norm_num_groups")
        if any(not 0 <= i < len(self.block_out_channels) for i in self.attention_levels):
            raise ValueError("base.attention_levels must index base.block_out_channels")
        return self


class SampleParams(_Section):
    """The evaluation sampler: a balanced set of (c, y) requests with fixed seeds."""

    steps: int = Field(10, ge=1)
    eta: float = Field(1.0, ge=0.0)
    guidance_scale: float = Field(2.0, ge=1.0)
    n_per_request: int = Field(8, ge=1)  # images per (c, y) pair
    batch_size: int = Field(80, ge=1)
    seed: int = 1000  # request i uses seed + i


ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")  # the paper's LoRA targets


class RolloutParams(_Section):
    """The sampler CTRL's training rollouts use, and so the base sampler p_pre its KL is measured
    against. Its own section, so that changing how `sample` evaluates never retrains CTRL."""

    steps: int = Field(10, ge=1)  # DDIM steps, diffusers' "leading" grid
    eta: float = Field(1.0, ge=0.0)
    guidance_scale: float = Field(2.0, ge=1.0)  # classifier-free guidance on c (NULL c and NULL y)


class BaseRolloutsParams(_Section):
    """The base's own trajectories (stage `base_rollouts`, with the `finetune.rollout` sampler): the
    `weighted` solver fits their reweighting, and the `optimum` stage reweights their images."""

    n_per_c: int = Field(300, ge=1)  # trajectories per base class c
    seed: int = 300_000  # trajectory i uses seed + i, disjoint from the evaluation's and tuning's
    batch_size: int = Field(100, ge=1)


class FinetuneParams(_Section):
    """CTRL fine-tuning: the solver of its KL-regularised RL step, and its rollouts' sampler.

    backprop: direct back-propagation through the last K rollout steps (the paper's Algorithm 2);
    weighted: reward-weighted regression of each step's mean onto the base's own trajectories,
    reweighted by p̂(y | x0)^gamma (solvers/weighted.py); adjoint: Adjoint Matching, each step's
    control regressed onto the reward's lean adjoint on the current model's rollouts
    (solvers/adjoint.py). ``batch_size`` counts trajectories for every solver.
    """

    solver: Literal["backprop", "weighted", "adjoint"] = "backprop"
    rollout: RolloutParams = RolloutParams()
    min_ess: float = Field(5.0, gt=0)  # weighted: warn where a (c, y) rests on fewer effective base images
    updates: int = Field(150, ge=1)
    batch_size: int = Field(16, ge=1)  # trajectories per process per micro-step
    grad_accumulation: int = Field(1, ge=1)
    grad_steps: int = Field(10, ge=1)  # truncated back-propagation: the last K denoising steps
    base_last_steps: int = Field(0, ge=0)  # the last N stochastic steps keep the base's kernel (no control)
    checkpointing: bool = False  # recompute each denoiser call in backward (less memory, more time)
    lora_rank: int = Field(4, ge=1)
    # peft target_modules (name suffixes): attention projections, plus ResNet convs conv1/conv2
    lora_targets: list[str] = Field(default_factory=lambda: list(ATTENTION), min_length=1)
    lr_lora: float = Field(3e-3, gt=0)
    lr_embedding: float = Field(3e-2, gt=0)
    # Linear learning-rate warm-up: Adam's first steps move every coordinate by the full rate.
    warmup_updates: int = Field(0, ge=0)
    # Linear decay of both rates to 0 over the last updates (0: constant after the warm-up). It halves the
    # rollout KL and pays in accuracy only late in a long run (README, "CTRL against its targets").
    decay_updates: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    clip_grad_norm: float = Field(5.0, gt=0)
    kl_reduction: Literal["sum", "mean"] = "sum"  # sum: true KL; mean: the authors' per-dimension KL
    # `dvc exp run -S` rewrites params.yaml and drops the quotes: YAML then reads `no` as false.
    mixed_precision: Annotated[
        Literal["no", "fp16", "bf16"], BeforeValidator(lambda v: "no" if v is False else v)
    ] = "no"
    checkpoint_every: int = Field(25, ge=1)
    probe_every: int = Field(10, ge=1)
    probe_per_class: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _schedule_fits(self) -> FinetuneParams:
        if self.decay_updates and self.warmup_updates + self.decay_updates > self.updates:
            raise ValueError(
                f"finetune.warmup_updates ({self.warmup_updates}) + finetune.decay_updates "
                f"({self.decay_updates}) exceed finetune.updates ({self.updates})"
            )
        return self


class BaselinesParams(_Section):
    """The guidance baselines: each method's scale is picked by a sweep on seeds of its own."""

    tune_per_request: int = Field(1, ge=1)  # images per (c, y) for each candidate scale
    tune_seed: int = 50_000  # tuning request i uses tune_seed + i, disjoint from sample.seed's
    min_c_accuracy: float = Field(0.9, ge=0, le=1)  # pick the best macro-F1 at or above this fidelity
    reconstruction: list[float] = Field(default_factory=lambda: [0.125, 0.25, 0.5, 1.0, 2.0], min_length=1)
    dps: list[float] = Field(default_factory=lambda: [0.1, 0.2, 0.4, 0.8, 1.6], min_length=1)
    classifier_guidance: list[float] = Field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0], min_length=1)
    cfg: list[float] = Field(default_factory=lambda: [1.0, 2.0, 4.0], min_length=1)  # w_y
    svdd: list[int] = Field(default_factory=lambda: [2, 4, 8], min_length=1)  # candidates M
    svdd_temperature: float = Field(0.0, ge=0)  # 0: keep the best candidate
    noisy_classifier_steps: int = Field(1500, ge=1)
    noisy_classifier_batch: int = Field(128, ge=1)
    noisy_classifier_lr: float = Field(2e-3, gt=0)
    cfg_train_steps: int = Field(600, ge=1)
    cfg_batch_size: int = Field(64, ge=1)
    # CFG's denoising fit has rates of its own: CTRL's are tuned for RL, not for regression
    cfg_lr_lora: float = Field(3e-3, gt=0)
    cfg_lr_embedding: float = Field(3e-2, gt=0)
    cfg_dropout: float = Field(0.1, ge=0, lt=1)  # y and c dropped to NULL independently


class EfficiencyParams(_Section):
    """Sample efficiency: CTRL (classifier on n labelled pairs) against CFG (trained on the same n)."""

    sizes: list[Annotated[int, Field(ge=20)]] = Field(default_factory=lambda: [250, 1000, 4000], min_length=1)


class MultitaskParams(_Section):
    """Two labels from disjoint halves (compressibility on one, the second label on the other).

    y is the joint class.
    """

    compressibility_classes: int = Field(2, ge=2)
    # empty: cut at the quantiles of its own half; else fixed byte counts (the paper: [70000])
    compressibility_thresholds: list[float] = Field(default_factory=list)
    # reward = w1 log p̂(compressibility | x) + w2 log p̂(ink | x)
    weights: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [1.0, 1.0], min_length=2, max_length=2
    )

    @model_validator(mode="after")
    def _thresholds_match_classes(self) -> MultitaskParams:
        binning = "thresholds" if self.compressibility_thresholds else "quantile"
        cuts, k = self.compressibility_thresholds, self.compressibility_classes
        _check_thresholds("multitask.compressibility", binning, cuts, k)
        return self


class AestheticParams(_Section):
    """The aesthetic scorer (label.second.property: aesthetic): local files only, nothing downloaded."""

    clip: str | None = None  # open_clip folder: open_clip_config.json + weights (e.g. ViT-L/14)
    head: str | None = None  # LAION aesthetic predictor MLP weights (.pth or .safetensors)
    batch_size: int = Field(32, ge=1)


class ContinuousParams(_Section):
    """Continuous target compressibility by interpolating CTRL's class embeddings (no retraining)."""

    num_targets: int = Field(16, ge=2)  # targets spread evenly over the classes' achieved range
    per_digit: int = Field(1, ge=1)  # images per (target, digit c)
    seed: int = 90_000  # request i uses seed + i, disjoint from the evaluation's and the tuning's
    rule: Literal["class_means", "calibrated"] = "calibrated"  # see ctrldiff.continuous
    calibration_points: int = Field(4, ge=1)  # calibrated: positions measured per segment between classes
    calibration_per_digit: int = Field(2, ge=1)  # calibrated: images per (position, digit c)
    calibration_seed: int = 95_000  # calibrated: image i uses calibration_seed + i, disjoint from `seed`'s


class Params(_Section):
    """The whole ``params.yaml``."""

    seed: int = 0
    gamma: float = Field(10.0, gt=0)  # CTRL guidance strength: the true gamma of the tilted target
    data: DataParams = DataParams()
    label: LabelParams = LabelParams()
    classifier: ClassifierParams = ClassifierParams()
    base: BaseParams = BaseParams()
    sample: SampleParams = SampleParams()
    base_rollouts: BaseRolloutsParams = BaseRolloutsParams()
    finetune: FinetuneParams = FinetuneParams()
    baselines: BaselinesParams = BaselinesParams()
    efficiency: EfficiencyParams = EfficiencyParams()
    multitask: MultitaskParams = MultitaskParams()
    continuous: ContinuousParams = ContinuousParams()
    aesthetic: AestheticParams = AestheticParams()

    @model_validator(mode="after")
    def _aesthetic_files(self) -> Params:
        if self.label.second.property == "aesthetic" and not (self.aesthetic.clip and self.aesthetic.head):
            raise ValueError(
                "aesthetic.clip and aesthetic.head are required when label.second.property is aesthetic"
            )
        return self

    @model_validator(mode="after")
    def _window_within_rollout(self) -> Params:
        ft = self.finetune
        if ft.grad_steps > ft.rollout.steps:
            raise ValueError(
                f"finetune.grad_steps = {ft.grad_steps} exceeds finetune.rollout.steps = "
                f"{ft.rollout.steps}: the gradient window cannot be longer than the rollout"
            )
        if ft.base_last_steps >= ft.rollout.steps:
            raise ValueError(
                f"finetune.base_last_steps = {ft.base_last_steps} leaves no step of the "
                f"{ft.rollout.steps}-step rollout (finetune.rollout.steps) to the control"
            )
        return self


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
