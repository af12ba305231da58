"""One writer at a time, signed folders, stale writers refused, merges, bounded k, and the
small version of the reliability acceptance run (scripts/reliability.py --quick)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from retrieval_prune.index import storage
from retrieval_prune.index.base import load_index
from retrieval_prune.retrieve import HashingEncoder, Retriever
from retrieval_prune.safejson import JSONLimitError, loads_bounded

ROOT = Path(__file__).resolve().parents[1]


def _index(path, n=6):
    ids = [f"d{i}" for i in range(n)]
    return Retriever.from_texts(ids, [f"word{i} common text" for i in range(n)],
                                HashingEncoder(dim=16), path=path)


def test_second_writer_waits_then_names_the_holder(tmp_path):
    root = tmp_path / "ix"
    _index(root)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from retrieval_prune.index import storage\n"
         f"with storage.write_lock({str(root)!r}):\n    print('held', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with pytest.raises(storage.IndexLockedError, match=f"pid {holder.pid}"):
            storage.write_generation(root, {"a": np.arange(3)}, {}, lock_timeout=0.3)
        assert time.monotonic() - t0 >= 0.3
        assert storage.lock_holder(root) == holder.pid
    finally:
        holder.kill()
        holder.wait()
    # the kernel dropped the dead holder's lock: the next writer goes through at once
    storage.write_generation(root, {"a": np.arange(3)}, {}, lock_timeout=5)


def test_lock_is_reentrant_in_one_thread(tmp_path):
    with storage.write_lock(tmp_path / "ix"), storage.write_lock(tmp_path / "ix", timeout=0):
        storage.write_generation(tmp_path / "ix", {"a": np.arange(2)}, {}, lock_timeout=0)
    assert storage.current_generation(tmp_path / "ix").name == "gen-000001"


def test_stale_retriever_cannot_overwrite_another_writers_commit(tmp_path):
    root = tmp_path / "ix"
    _index(root)
    a, b = Retriever.from_index(root), Retriever.from_index(root)
    with a.transaction():
        a.add(["from-a"], ["alpha"])
    b.add(["from-b"], ["beta"])
    with pytest.raises(storage.IndexChangedError, match="another writer committed"):
        b.save()
    c = Retriever.from_index(root)
    with c.transaction():  # c is current; a transaction on a stale copy merges instead
        c.delete(["d0"])
    with a.transaction() as tx:
        a.add(["from-a2"], ["gamma"])
    live = set(Retriever.from_index(root).index.doc_ids) - {"d0"}
    assert {"from-a", "from-a2"} <= live and "d0" not in Retriever.from_index(root)
    assert tx.generation == storage.current_generation(root)


def test_failed_body_or_save_puts_memory_back(tmp_path, monkeypatch):
    root = tmp_path / "ix"
    r = _index(root)
    with pytest.raises(RuntimeError):
        with r.transaction():
            r.add(["x"], ["x text"])
            raise RuntimeError("boom")
    assert "x" not in r

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(storage, "write_generation", fail)
    with pytest.raises(OSError):
        with r.transaction():
            r.add(["y"], ["y text"])
    monkeypatch.undo()
    assert "y" not in r and len(r) == 6


def test_refresh_adopts_other_processes_commits(tmp_path):
    root = tmp_path / "ix"
    _index(root)
    reader, writer = Retriever.from_index(root), Retriever.from_index(root)
    with writer.transaction():
        writer.add(["new"], ["brand new words"])
    assert "new" not in reader and reader.refresh() and "new" in reader
    assert not reader.refresh()  # nothing changed since


def test_signed_folders(tmp_path, monkeypatch):
    root = tmp_path / "ix"
    monkeypatch.setenv(storage.SIGNING_KEY_ENV, "k1")
    _index(root)
    assert "hmac-sha256:" in (root / "CURRENT").read_text()
    assert len(load_index(root)) == 6
    monkeypatch.setenv(storage.SIGNING_KEY_ENV, "other")
    with pytest.raises(storage.IndexCorruptedError, match="signature does not match"):
        load_index(root)
    monkeypatch.delenv(storage.SIGNING_KEY_ENV)
    assert len(load_index(root)) == 6  # without a key the signature is not needed
    gen = storage.current_generation(root)
    (root / "CURRENT").write_text(f"{gen.name}\n{storage.sha256_file(gen / 'manifest.json')}\n")
    monkeypatch.setenv(storage.SIGNING_KEY_ENV, "k1")
    with pytest.raises(storage.IndexCorruptedError, match="not signed"):
        load_index(root)


def test_huge_k_is_clamped_before_allocation(tmp_path):
    r = _index(tmp_path / "ix")
    t0 = time.perf_counter()
    hits = r.retrieve("common", k=1_000_000_000)
    assert len(hits) == 6 and time.perf_counter() - t0 < 30
    res = r.index.search(r.pipeline.transform_queries(r.encoder.encode_queries(["common"])), k=10**9)
    assert res.ids.shape == (1, 6)


def test_bounded_json():
    assert loads_bounded(b'{"a": ["]]]", {"b": 1}]}') == {"a": ["]]]", {"b": 1}]}
    with pytest.raises(JSONLimitError, match="100000 levels"):
        loads_bounded(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(JSONLimitError, match="NaN"):
        loads_bounded(b"[NaN]")


def test_manifest_schema_refuses_paths_and_bad_versions(tmp_path):
    root = tmp_path / "ix"
    _index(root)
    gen = storage.current_generation(root)
    original = (gen / "manifest.json").read_bytes()

    def craft(edit):
        man = json.loads(original)
        edit(man)
        raw = json.dumps(man).encode()
        (gen / "manifest.json").write_bytes(raw)
        (root / "CURRENT").write_text(f"{gen.name}\n{storage.sha256_file(gen / 'manifest.json')}\n")

    craft(lambda m: m["files"].__setitem__("/etc/hostname", {"kind": "native", "size": 1, "sha256": "0" * 64}))
    with pytest.raises(storage.IndexCorruptedError, match="plain file name"):
        load_index(root)
    craft(lambda m: m.__setitem__("format_version", -5))
    with pytest.raises(storage.IndexCorruptedError, match="not a known version"):
        load_index(root)
    craft(lambda m: m["meta"].__setitem__("dim", "16"))
    with pytest.raises(storage.IndexCorruptedError, match="meta.dim"):
        load_index(root)


def test_reliability_quick_run(tmp_path):
    """The small version of eval/results/reliability.md: every check must pass."""
    out = tmp_path / "rel.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "reliability.py"), "--quick", "-q",
                           "--json", str(out)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["verdicts"] and all(v["passed"] for v in rep["verdicts"])
    assert rep["writers"]["trials"] == 3 and rep["crafted"]["cases"] > 100


def test_index_save_refuses_to_overwrite_a_newer_commit(tmp_path):
    root = tmp_path / "ix"
    _index(root)
    a, b = load_index(root), load_index(root)
    a.delete(["d1"])
    a.save(root)
    b.delete(["d2"])
    with pytest.raises(storage.IndexChangedError, match="another writer committed"):
        b.save(root)
    b.save(tmp_path / "copy")  # elsewhere is fine
    a.delete(["d3"])
    a.save(root)  # its own commits do not count against it
    assert set(load_index(root).doc_ids) >= {"d0"} and len(load_index(root)) == 4
