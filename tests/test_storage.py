import json
import os

import numpy as np
import pytest

from retrieval_prune.index import storage


def _write(root, n=10, **meta):
    arrays = {"a": np.arange(n, dtype=np.float32), "b": np.ones((n, 3), np.int64)}
    return storage.write_generation(root, arrays, {"hello": "world", **meta})


def test_round_trip_and_manifest(tmp_path):
    gen = _write(tmp_path / "ix")
    meta, arrays, g = storage.read_generation(tmp_path / "ix")
    assert g == gen and meta["hello"] == "world"
    np.testing.assert_array_equal(arrays["a"], np.arange(10, dtype=np.float32))
    assert isinstance(arrays["a"], np.memmap)
    man = json.loads((gen / "manifest.json").read_text())
    assert man["format"] == storage.FORMAT_NAME and man["format_version"] == storage.FORMAT_VERSION
    for fname, entry in man["files"].items():
        assert entry["size"] == (gen / fname).stat().st_size and len(entry["sha256"]) == 64


def test_new_generation_replaces_and_gc(tmp_path):
    root = tmp_path / "ix"
    for i in range(4):
        _write(root, n=5 + i)
    _, arrays, gen = storage.read_generation(root)
    assert arrays["a"].shape == (8,) and gen.name == "gen-000004"
    gens = sorted(p.name for p in root.iterdir() if p.name.startswith("gen-"))
    assert gens == ["gen-000003", "gen-000004"]  # one older generation kept for pinned readers


def test_crashed_writer_leaves_old_generation(tmp_path, monkeypatch):
    root = tmp_path / "ix"
    _write(root, n=3)

    def boom(*a, **k):
        raise RuntimeError("crash before the pointer swap")

    monkeypatch.setattr(storage.os, "replace", boom)
    with pytest.raises(RuntimeError):
        _write(root, n=7)
    monkeypatch.undo()
    _, arrays, _ = storage.read_generation(root)
    assert arrays["a"].shape == (3,)
    _write(root, n=4)  # the next writer cleans the orphan
    assert not any(p.name.startswith(".tmp-gen-") for p in root.iterdir())


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_corruption_is_named(tmp_path, damage):
    gen = _write(tmp_path / "ix")
    target = gen / "b.npy"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-5])
    elif damage == "flip":
        raw = bytearray(target.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        target.write_bytes(bytes(raw))
    elif damage == "delete":
        target.unlink()
    else:
        target = gen / "manifest.json"
        target.write_text("{not json")
    with pytest.raises(storage.IndexCorruptedError, match=target.name):
        storage.read_generation(tmp_path / "ix")


def test_newer_format_version_is_refused(tmp_path):
    gen = _write(tmp_path / "ix")
    man = json.loads((gen / "manifest.json").read_text())
    man["format_version"] = storage.FORMAT_VERSION + 1
    (gen / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ValueError, match="newer"):
        storage.read_generation(tmp_path / "ix")


def test_object_arrays_refused_and_nothing_written(tmp_path):
    with pytest.raises(TypeError, match="object"):
        storage.write_generation(tmp_path / "ix", {"x": np.array([{}], dtype=object)}, {})
    assert not (tmp_path / "ix" / "CURRENT").exists()
    assert not [p for p in (tmp_path / "ix").iterdir() if p.name.startswith(("gen-", ".tmp"))]


def test_missing_index(tmp_path):
    with pytest.raises(FileNotFoundError):
        storage.read_generation(tmp_path / "none")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(storage.IndexCorruptedError, match="CURRENT"):
        storage.read_generation(tmp_path / "empty")
