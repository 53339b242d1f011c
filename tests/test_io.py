import pytest

from ctrldiff.io import atomic_dir, atomic_path, confusion_pairs, read_json, write_json


def test_interrupted_writes_leave_the_old_file_and_no_debris(tmp_path):
    target = tmp_path / "m.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert read_json(target) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_atomic_dir_replaces_the_whole_directory(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "old.txt").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("2")
        raise RuntimeError("killed")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    with atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("2")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_confusion_pairs_lists_one_row_per_counted_item(tmp_path):
    path = tmp_path / "confusion.csv"
    confusion_pairs(path, [[2, 0], [1, 3]], ("actual", "predicted"))
    rows = path.read_text().splitlines()
    assert rows[0] == "actual,predicted" and sorted(rows[1:]) == ["0,0", "0,0", "1,0", "1,1", "1,1", "1,1"]
