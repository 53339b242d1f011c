"""(image, label) pairs -> a calibrated classifier p̂(y | x).

Used for the CTRL reward (compressibility), the second label (ink) and the digit classifier that
measures fidelity to c. A small CNN on [-1, 1] pixels, or for JPEG compressibility the ordinal size
model of ``jpeg_size`` (``classifier.compressibility_model``); either is differentiable in its input
(the reward and the guidance baselines back-propagate through it) and calibrated by temperature
scaling: one scalar T fitted on validation NLL (Guo et al. 2017).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from ctrldiff.data import table_images
from ctrldiff.jpeg_size import JpegSizeNet, fit_jpeg_size, size_errors
from ctrldiff.labels import bin_scores
from ctrldiff.oracles import oracle_scores, to_model_space, to_uint8
from ctrldiff.params import ClassifierParams


class ClassifierError(ValueError):
    """A saved classifier that is missing, corrupt, or does not match what the caller expects."""


def _block(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU()]


class SmallCNN(nn.Module):
    """Five 3x3 conv blocks (two downsamplings), global average pooling, a linear head.

    GroupNorm rather than BatchNorm: one image's prediction (and gradient) never depends on the
    other images in its batch, which matters when it is used as a reward.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            *_block(in_channels, w),
            *_block(w, w),
            *_block(w, 2 * w, stride=2),
            *_block(2 * w, 2 * w),
            *_block(2 * w, 4 * w, stride=2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * w, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (used for the Fréchet distance)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def build_net(arch: dict) -> nn.Module:
    """An untrained network of the architecture a saved ``config.json`` records (no kind: a SmallCNN)."""
    kind, args = arch.get("kind", "cnn"), {k: v for k, v in arch.items() if k != "kind"}
    if kind == "cnn":
        return SmallCNN(**args)
    if kind == "jpeg_size":
        return JpegSizeNet(**args)
    raise ClassifierError(f"unknown classifier kind {kind!r}; known: cnn, jpeg_size")


class Classifier(nn.Module):
    """A trained network, its temperature, and what its classes mean (``meta``)."""

    def __init__(self, net: nn.Module, arch: dict, temperature: float = 1.0, meta: dict | None = None):
        super().__init__()
        self.net, self.arch, self.meta = net, arch, meta or {}
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated logits."""
        return self.net(x) / self.temperature

    def log_prob(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """log p̂(y | x) per image, calibrated."""
        return self(x).log_softmax(-1).gather(1, y[:, None]).squeeze(1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in self.net.state_dict().items()}, directory / "model.safetensors"
        )
        config = {"arch": self.arch, "temperature": float(self.temperature), "meta": self.meta}
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> Classifier:
        directory = Path(directory)
        config_path, weights = directory / "config.json", directory / "model.safetensors"
        if not config_path.is_file() or not weights.is_file():
            raise ClassifierError(
                f"{directory}: no saved classifier (expected config.json and model.safetensors)"
            )
        try:
            config = json.loads(config_path.read_text())
            net = build_net(config["arch"])
            net.load_state_dict(load_file(weights))
        except Exception as err:  # corrupt JSON, truncated safetensors, wrong shapes
            raise ClassifierError(f"{directory}: cannot load classifier: {err}") from err
        return cls(net, config["arch"], config["temperature"], config["meta"]).eval()

    def check_classes(self, expected: list, thresholds: list[float] | None = None) -> None:
        """Refuse a classifier trained for other classes (or other class boundaries)."""
        classes = self.meta.get("classes")
        if classes != list(expected):
            raise ClassifierError(
                f"classifier for task {self.meta.get('task')!r} has classes {classes}, expected {expected}"
            )
        if thresholds is not None and not np.allclose(self.meta.get("thresholds", []), thresholds):
            raise ClassifierError(
                f"classifier for task {self.meta.get('task')!r} was trained with thresholds "
                f"{self.meta.get('thresholds')}, expected {thresholds}"
            )


def train_network(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    num_classes: int,
    cfg: ClassifierParams,
    seed: int,
    desc: str = "classifier",
    class_weights: torch.Tensor | None = None,
) -> SmallCNN:
    """Train a SmallCNN with AdamW and a one-cycle schedule on images in [-1, 1]; ``class_weights``
    weigh each class's examples in the cross-entropy (see ``real_prior_weights``)."""
    torch.manual_seed(seed)
    net = SmallCNN(x_train.shape[1], num_classes, cfg.width)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-len(x_train) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    bar = tqdm(range(cfg.epochs), desc=desc, unit="epoch")
    for _ in bar:
        order = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for i in range(0, len(x_train), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            loss = F.cross_entropy(net(x_train[idx]), y_train[idx], weight=class_weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        bar.set_postfix(loss=f"{total / len(x_train):.3f}")
    return net.eval()


@torch.no_grad()
def predict_logits(net: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    return torch.cat([net(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def fit_temperature(
    logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor | None = None
) -> float:
    """The scalar T minimising the (class-weighted) NLL of softmax(logits / T) on held-out data
    (LBFGS on log T)."""
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels, weight=class_weights)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def reliability(probs: torch.Tensor, labels: torch.Tensor, n_bins: int) -> dict:
    """Per-bin confidence, accuracy and count of the top-class prediction, and the ECE."""
    conf, pred = probs.max(-1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    bins = torch.bucketize(conf, edges[1:-1], right=True)
    count = torch.bincount(bins, minlength=n_bins).float()
    safe = count.clamp(min=1)
    acc = torch.bincount(bins, weights=correct, minlength=n_bins) / safe
    mean_conf = torch.bincount(bins, weights=conf, minlength=n_bins) / safe
    ece = float(((acc - mean_conf).abs() * count).sum() / len(labels))
    return {
        "ece": ece,
        "accuracy": acc.tolist(),
        "confidence": mean_conf.tolist(),
        "count": count.int().tolist(),
    }


def calibration_report(logits: torch.Tensor, labels: torch.Tensor, temperature: float, n_bins: int) -> dict:
    """Validation accuracy, NLL and ECE before and after dividing the logits by ``temperature``."""
    before, after = logits, logits / temperature
    return {
        "accuracy": float((logits.argmax(-1) == labels).float().mean()),
        "nll_before": float(F.cross_entropy(before, labels)),
        "nll_after": float(F.cross_entropy(after, labels)),
        "reliability_before": reliability(before.softmax(-1), labels, n_bins),
        "reliability_after": reliability(after.softmax(-1), labels, n_bins),
    }


def task_tensors(
    table: pd.DataFrame, meta: dict, task: str, split: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images in [-1, 1], class indices and c of one split's rows that carry this task's label.

    Rows without the label (-1, e.g. the other half in multi-task) are left out.
    """
    spec = meta["tasks"][task]
    part = table[(table[spec["column"]] >= 0) & (table.split == split)]
    x = to_model_space(table_images(part, meta["resolution"], meta["channels"]))
    y = torch.tensor(part[spec["column"]].map({c: i for i, c in enumerate(spec["classes"])}).to_numpy())
    return x, y.long(), torch.tensor(part["c"].to_numpy()).long()


def with_labelled_copies(
    x: torch.Tensor, y: torch.Tensor, spec: dict, cfg: ClassifierParams, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The images followed by ``cfg.copies`` shifted, noisy versions of each, labelled by the task's oracle.

    Each copy is rolled by up to ``copy_shift`` pixels along each axis (JPEG sizes depend on where
    the 8x8 blocks fall) and gets Gaussian noise whose standard deviation is drawn uniformly in
    [0, copy_noise] 8-bit levels (sampled images carry faint noise, real digits a black
    background), then is rounded and clipped as a stored image is. The copies' labels are
    recomputed by the oracle, never inherited: noise and shifts change the JPEG size.
    """
    if cfg.copies == 0:
        return x, y
    rng = np.random.default_rng(seed)
    pixels = to_uint8(x)
    copies = []
    for _ in range(cfg.copies):
        shifts = rng.integers(-cfg.copy_shift, cfg.copy_shift + 1, size=(len(pixels), 2))
        moved = np.stack([np.roll(p, tuple(s), axis=(0, 1)) for p, s in zip(pixels, shifts, strict=True)])
        sd = rng.uniform(0.0, cfg.copy_noise, size=(len(pixels),) + (1,) * (pixels.ndim - 1))
        noisy = moved + sd * rng.standard_normal(pixels.shape)
        copies.append(np.clip(np.round(noisy), 0, 255).astype(np.uint8))
    copies = np.concatenate(copies)
    labels = bin_scores(oracle_scores(copies, spec), spec["thresholds"])
    return torch.cat([x, to_model_space(copies)]), torch.cat([y, torch.from_numpy(labels).long()])


def real_prior_weights(y: torch.Tensor, n_real: int, num_classes: int) -> torch.Tensor:
    """Per-class weights that give labels ``y`` (the first ``n_real`` real, the rest copies) the
    class shares of the real images alone: share among the real / share among all.

    Noise makes most copies least compressible (about 3 in 4 land in class 0), which skews the
    prior the classifier learns (and so CTRL's reward) and stalls training on the majority class;
    weighted, the copies teach what noise does to a class without changing how common it is.
    """
    real = torch.bincount(y[:n_real], minlength=num_classes).float() / n_real
    every = torch.bincount(y, minlength=num_classes).float() / len(y)
    return torch.where(every > 0, real / every.clamp(min=1e-12), torch.zeros_like(real))


def labelled_subset(table: pd.DataFrame, meta: dict, task: str, n: int, seed: int) -> pd.DataFrame:
    """n rows drawn at random among those labelled for ``task``; each keeps its train/val split."""
    labelled = table[table[meta["tasks"][task]["column"]] >= 0]
    if not 0 < n <= len(labelled):
        raise ClassifierError(f"asked for {n} labelled images of task {task!r}; the data has {len(labelled)}")
    return labelled.sample(n=n, random_state=seed)


def fit_task(
    table: pd.DataFrame, meta: dict, task: str, cfg: ClassifierParams, seed: int
) -> tuple[Classifier, dict]:
    """Train and calibrate the classifier of one labelled task; return it with its metrics.

    Rows without this task's label (-1, e.g. the other half in multi-task) are left out.
    Training uses the 'train' split; T, NLL, ECE and the confusion matrix use 'val'.
    """
    if task not in meta["tasks"]:
        raise ClassifierError(
            f"task {task!r} is not labelled in this dataset; known: {sorted(meta['tasks'])}"
        )
    spec = meta["tasks"][task]
    classes = spec["classes"]
    if len(classes) < 2:
        raise ClassifierError(f"task {task!r} has {len(classes)} class(es); a classifier needs at least 2")
    size_model = spec.get("score") == "jpeg_bytes" and cfg.compressibility_model == "dct"
    if size_model and meta["channels"] != 1:
        raise ClassifierError(
            f"classifier.compressibility_model 'dct' models single-channel JPEG; the data has "
            f"{meta['channels']} channels: set classifier.compressibility_model: cnn"
        )
    x_train, y_train, _ = task_tensors(table, meta, task, "train")
    x_val, y_val, _ = task_tensors(table, meta, task, "val")
    n_real_train, n_real_val = len(x_train), len(x_val)
    train_weights = val_weights = None
    copies = cfg.copies if "score" in spec else 0  # only a task with an oracle can label copies
    if copies:
        x_train, y_train = with_labelled_copies(x_train, y_train, spec, cfg, seed)
        x_val, y_val = with_labelled_copies(x_val, y_val, spec, cfg, seed + 1)
        train_weights = real_prior_weights(y_train, n_real_train, len(classes))
        val_weights = real_prior_weights(y_val, n_real_val, len(classes))
    if size_model:
        arch = {"kind": "jpeg_size", "quality": spec["jpeg_quality"], "thresholds": spec["thresholds"]}
        net = fit_jpeg_size(x_train, y_train, arch["quality"], arch["thresholds"], train_weights)
    else:
        arch = {"in_channels": meta["channels"], "num_classes": len(classes), "width": cfg.width}
        net = train_network(x_train, y_train, len(classes), cfg, seed, f"train {task}", train_weights)

    val_logits = predict_logits(net, x_val)
    temperature = fit_temperature(val_logits, y_val, val_weights)
    report = calibration_report(val_logits, y_val, temperature, cfg.ece_bins)
    train_acc = float((predict_logits(net, x_train).argmax(-1) == y_train).float().mean())
    pred = val_logits.argmax(-1)
    confusion = torch.zeros(len(classes), len(classes), dtype=torch.long)
    confusion.index_put_((y_val, pred), torch.ones_like(y_val), accumulate=True)

    clf_meta = {
        "task": task,
        "classes": classes,
        "thresholds": spec.get("thresholds"),
        "column": spec["column"],
        "resolution": meta["resolution"],
        "channels": meta["channels"],
    }
    metrics = {
        "task": task,
        "n_train": len(x_train),
        "n_val": len(x_val),
        "copies": copies,
        "train_accuracy": train_acc,
        "val_accuracy": report["accuracy"],
        "val_accuracy_real": float((pred[:n_real_val] == y_val[:n_real_val]).float().mean()),
        "temperature": temperature,
        "val_nll_before": report["nll_before"],
        "val_nll_after": report["nll_after"],
        "val_ece_before": report["reliability_before"]["ece"],
        "val_ece_after": report["reliability_after"]["ece"],
        "confusion": confusion.tolist(),
    }
    if size_model:  # how far the predicted JPEG sizes of the real validation images are from the oracle's
        real_val = x_val[:n_real_val]
        metrics |= {
            f"val_size_{k}": v
            for k, v in size_errors(net, real_val, oracle_scores(to_uint8(real_val), spec)).items()
        }
    return Classifier(net, arch, temperature, clf_meta), metrics | {"_report": report}
