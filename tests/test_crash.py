"""Crash safety and corruption of staged indexes: kill -9 during writes (a few iterations
here, >= 200 with ``-m slow`` or scripts/crash_test.py), damaged files named in a clear
error, readers pinned to their generation, streamed .npy files."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from retrieval_prune.index import storage
from retrieval_prune.index.base import load_index
from retrieval_prune.pipeline import make_pipeline
from tests.test_ivf import clustered_docs

ROOT = Path(__file__).resolve().parents[1]
SPEC = "residual:k=16,nbits=2 | hnsw:nprobe=16,n_candidates=10000,n_rerank=10000"


@pytest.fixture
def saved(tmp_path):
    docs = clustered_docs(120, seed=2)
    queries = clustered_docs(6, seed=8, empty=())
    index = make_pipeline(SPEC).build(docs, [f"d{i}" for i in range(len(docs))])
    index.save(tmp_path / "ix")
    index.delete(["d4"])
    index.save(tmp_path / "ix")  # an older generation stays on disk
    return tmp_path / "ix", queries


def results(index, queries):
    r = index.search(queries, k=5)
    return r.ids.tolist(), r.scores.tolist()


def test_every_damaged_file_is_named(saved):
    root, queries = saved
    ref = results(load_index(root), queries)
    gen = storage.current_generation(root)
    rng = np.random.default_rng(0)
    files = [root / "CURRENT", *sorted(p for p in gen.iterdir() if p.is_file())]
    assert any(p.name == "centroids.hnsw" for p in files)
    for path in files:
        original = path.read_bytes()
        damages = [original[: len(original) // 2], original[:-1]]
        for _ in range(3):
            raw = bytearray(original)
            pos = int(rng.integers(len(raw) * 8))
            raw[pos // 8] ^= 1 << (pos % 8)
            damages.append(bytes(raw))
        for damaged in damages:
            path.write_bytes(damaged)
            try:
                got = results(load_index(root), queries)
            except (storage.IndexCorruptedError, ValueError) as exc:
                names = {path.name} | ({"CURRENT", "manifest.json"} if path.name in ("CURRENT", "manifest.json") else set())
                assert any(n in str(exc) for n in names), (path.name, str(exc))
            else:  # only a harmless change may open, and then it must answer the same
                assert got == ref, path.name
            finally:
                path.write_bytes(original)
    assert results(load_index(root), queries) == ref


def test_pointer_checksum_guards_the_manifest(saved):
    root, _ = saved
    gen = storage.current_generation(root)
    man_path = gen / "manifest.json"
    man = json.loads(man_path.read_text())
    man["meta"]["spec"] = man["meta"]["spec"].replace("nprobe=16", "nprobe=15")  # valid JSON
    man_path.write_text(json.dumps(man, indent=1))
    with pytest.raises(storage.IndexCorruptedError, match="manifest.json"):
        load_index(root)
    # a pointer flipped to the older generation is caught too
    pointer = (root / "CURRENT").read_text()
    older = f"gen-{int(gen.name.split('-')[1]) - 1:06d}"
    assert (root / older).is_dir()
    (root / "CURRENT").write_text(pointer.replace(gen.name, older))
    with pytest.raises(storage.IndexCorruptedError, match="manifest.json"):
        load_index(root)


def test_pointer_without_checksum_is_refused(saved):
    root, _ = saved
    name = (root / "CURRENT").read_text().split("\n")[0]
    (root / "CURRENT").write_text(name + "\n")  # would switch the manifest check off
    with pytest.raises(storage.IndexCorruptedError, match="without the manifest's sha256"):
        load_index(root)


def test_readers_keep_their_generation(saved):
    root, queries = saved
    reader = load_index(root)
    before = results(reader, queries)
    writer = load_index(root)
    for i in range(5, 40):  # several newer generations; the reader's is garbage-collected
        writer.delete([f"d{i}"])
        writer.save(root)
    assert results(reader, queries) == before  # mmapped files outlive their unlinking
    assert results(load_index(root), queries) != before


def test_npy_appender_and_streamed_generation(tmp_path):
    root = tmp_path / "ix"
    scratch = storage.scratch_dir(root)
    with storage.NpyAppender(scratch / "a.npy", np.uint16, (3,)) as app:
        for i in range(4):
            app.append(np.full((i, 3), i, np.uint16))
    app_path = app.close()
    gen = storage.write_generation(root, {"b": np.arange(3)}, {"x": 1}, npy_files={"a": app_path})
    meta, arrays, _ = storage.read_generation(root)
    assert arrays["a"].shape == (6, 3) and arrays["a"].dtype == np.uint16
    np.testing.assert_array_equal(arrays["a"][:, 0], [1, 2, 2, 3, 3, 3])
    assert isinstance(arrays["a"], np.memmap) and (gen / "a.npy").is_file()
    assert not scratch.joinpath("a.npy").exists()
    with pytest.raises(ValueError, match="rows of shape"):
        storage.NpyAppender(tmp_path / "c.npy", np.float32, (2,)).append(np.zeros((1, 3)))


def test_crashed_scratch_folders_are_cleaned(tmp_path):
    root = tmp_path / "ix"
    storage.write_generation(root, {"a": np.arange(2)}, {})
    mine = storage.scratch_dir(root)  # this process is alive: its scratch is kept
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    leftover = root / f".tmp-scratch-{dead}-x"  # a writer that died before its commit
    leftover.mkdir()
    (leftover / "half.npy").write_bytes(b"\x93NUMPY")
    legacy = root / ".tmp-gen-abc"  # written before names carried a PID
    legacy.mkdir()
    storage.write_generation(root, {"a": np.arange(3)}, {})
    assert not leftover.exists() and not legacy.exists() and mine.exists()


def _run_crash_script(tmp_path, iterations, flips):
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "crash_test.py"), "--iterations", str(iterations),
         "--flips", str(flips), "--docs", "300", "--workdir", str(tmp_path / "work"),
         "--json", str(out)],
        capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_kill9_during_writes_quick(tmp_path):
    report = _run_crash_script(tmp_path, iterations=3, flips=1)
    assert report["crash"]["iterations"] == 3 and report["violations"] == 0
    assert report["corruption"]["violations"] == 0 and report["corruption"]["trials"] > 50


@pytest.mark.slow
def test_kill9_during_writes_full(tmp_path):
    report = _run_crash_script(tmp_path, iterations=200, flips=16)
    assert report["crash"]["iterations"] == 200 and report["violations"] == 0
