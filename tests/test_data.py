from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctrldiff.data import SourceError, load_pixels, mnist5k_path, read_source
from ctrldiff.params import DataParams


def save_images(folder: Path, n: int, size: int = 20) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (size, size + 4), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_folder_with_one_corrupt_file_yields_the_rest_and_names_it(tmp_path):
    save_images(tmp_path / "imgs" / "7", 3)
    bad = tmp_path / "imgs" / "7" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image, ignored")
    records, skipped = read_source(DataParams(source="folder", path=str(tmp_path / "imgs"), resolution=16))
    assert sorted(r.id for r in records) == ["7/img0.png", "7/img1.png", "7/img2.png"]
    assert all(r.pixels.shape == (16, 16) and r.pixels.dtype == np.uint8 for r in records)
    assert [s.file for s in skipped] == [str(bad)]


def test_folder_csv_gives_classes_and_extra_columns(tmp_path):
    save_images(tmp_path / "imgs", 2)
    csv = tmp_path / "extra.csv"
    csv.write_text("file,c,note\nimg0.png,3,x\nimg1.png,5,y\n")
    cfg = DataParams(source="folder", path=str(tmp_path / "imgs"), csv=str(csv), resolution=8, channels=3)
    records, _ = read_source(cfg)
    assert [(r.c, r.extra["note"]) for r in records] == [(3, "x"), (5, "y")]
    assert records[0].pixels.shape == (8, 8, 3)
    row = {"image": None, "path": records[0].path}
    np.testing.assert_array_equal(load_pixels(row, 8, 3), records[0].pixels)


def test_folder_classes_come_from_subfolders_as_imagefolder_reads_them(tmp_path):
    for name in ("dogs", "cats", "birds"):
        save_images(tmp_path / "pets" / name, 2)
    records, _ = read_source(DataParams(source="folder", path=str(tmp_path / "pets"), resolution=8))
    assert {(r.id.split("/")[0], r.c) for r in records} == {("birds", 0), ("cats", 1), ("dogs", 2)}
    for digit in ("3", "10"):  # integer names are the class numbers, not their sorted ranks
        save_images(tmp_path / "digits" / digit, 1)
    records, _ = read_source(DataParams(source="folder", path=str(tmp_path / "digits"), resolution=8))
    assert sorted(r.c for r in records) == [3, 10]


def test_an_image_without_a_class_is_named_never_class_zero(tmp_path):
    save_images(tmp_path / "imgs" / "a", 1)
    save_images(tmp_path / "imgs", 1)  # imgs/img0.png sits outside every class subfolder
    with pytest.raises(SourceError, match=r"imgs/img0.png has no class c.*subfolder"):
        read_source(DataParams(source="folder", path=str(tmp_path / "imgs")))
    csv = tmp_path / "classes.csv"
    csv.write_text("file,c\na/img0.png,1\n")  # no row for img0.png
    with pytest.raises(SourceError, match=r"classes.csv has no row for image img0.png"):
        read_source(DataParams(source="folder", path=str(tmp_path / "imgs"), csv=str(csv)))


def test_csv_without_file_column_is_named(tmp_path):
    save_images(tmp_path / "imgs", 1)
    csv = tmp_path / "extra.csv"
    csv.write_text("name,c\nimg0.png,1\n")
    with pytest.raises(SourceError, match="extra.csv.*'file'"):
        read_source(DataParams(source="folder", path=str(tmp_path / "imgs"), csv=str(csv)))


def test_missing_or_empty_folder_fails_naming_it(tmp_path):
    with pytest.raises(SourceError, match="nowhere"):
        read_source(DataParams(source="folder", path=str(tmp_path / "nowhere")))
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    (tmp_path / "empty" / "cats" / "bad.png").write_bytes(b"garbage")
    with pytest.raises(SourceError, match="no usable image.*empty"):
        read_source(DataParams(source="folder", path=str(tmp_path / "empty")))


def test_unknown_source_is_refused():
    cfg = DataParams.model_construct(
        source="imagenet", path=None, csv=None, resolution=28, channels=1, max_images=None
    )
    with pytest.raises(SourceError, match="imagenet"):
        read_source(cfg)


def write_ava(root: Path, lines: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "AVA.txt").write_text("\n".join(lines) + "\n")


def test_ava_mean_score_from_votes_and_missing_images_skipped(tmp_path):
    root = tmp_path / "ava"
    write_ava(root, ["1 100 0 0 0 0 10 0 0 0 0 10 1 2 3", "2 101 1 0 0 0 0 0 0 0 0 0 0 0 3"])
    (root / "images").mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "images" / "100.jpg")
    records, skipped = read_source(DataParams(source="ava", path=str(root), resolution=16, channels=3))
    assert [r.id for r in records] == ["100"]
    assert records[0].extra == {"ava_score": 7.5, "ava_votes": 20}  # (5*10 + 10*10) / 20
    assert skipped[0].file.endswith("101.jpg") and "missing" in skipped[0].reason


def test_malformed_ava_line_is_named(tmp_path):
    root = tmp_path / "ava"
    write_ava(root, ["1 100 0 0 0 0 10 0 0 0 0 10 1 2 3", "2 101 1 2 three"])
    with pytest.raises(SourceError, match=r"AVA.txt line 2"):
        read_source(DataParams(source="ava", path=str(root)))
    with pytest.raises(SourceError, match="AVA.txt not found"):
        read_source(DataParams(source="ava", path=str(tmp_path)))


def test_embedded_sources_read_real_digits():
    assert mnist5k_path().name == "mnist_5k.csv.gz"
    records, skipped = read_source(DataParams(source="mnist5k", max_images=50), seed=1)
    assert len(records) == 50 and not skipped
    assert records[0].pixels.shape == (28, 28) and records[0].pixels.max() > 200
    digits, _ = read_source(DataParams(source="sklearn_digits", resolution=16, max_images=30))
    assert len(digits) == 30 and {r.c for r in digits} <= set(range(10))
