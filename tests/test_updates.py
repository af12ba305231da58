"""Live updates of staged indexes: add/delete/compact by external id, codebook drift,
streaming build, bad input that must leave the index on disk untouched, CLI commands."""

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from retrieval_prune.cli import main
from retrieval_prune.index import storage
from retrieval_prune.index.base import load_index
from retrieval_prune.index.staged import DRIFT_WARN, StagedIndex, build_streaming
from retrieval_prune.pipeline import make_pipeline
from retrieval_prune.retrieve import HashingEncoder, Retriever
from retrieval_prune.types import MultiVectors
from tests.test_ivf import clustered_docs

SPECS = [
    "residual:k=32,nbits=2 | ivf:nprobe=3,n_candidates=40,n_rerank=16",
    "pca:dim=8 | residual:k=32,nbits=2 | hnsw:nprobe=3,n_candidates=40,n_rerank=16",
]


def fresh_like(index: StagedIndex) -> StagedIndex:
    """An empty index with the same spec and the same fitted codebook."""
    other = type(index).from_spec(index.spec)
    other.chain.load_state(index.chain.state_arrays())
    other.info = json.loads(json.dumps(index.info))
    other._after_fit()
    return other


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def corpus():
    docs = clustered_docs(300, seed=3)
    extra = clustered_docs(60, seed=4, empty=(5,))
    queries = clustered_docs(20, seed=5, empty=())
    return docs, extra, queries


@pytest.mark.parametrize("spec", SPECS)
def test_add_then_delete_equals_a_fresh_build(corpus, spec, tmp_path):
    docs, extra, queries = corpus
    ids = [f"a{i}" for i in range(len(docs))]
    index = make_pipeline(spec).build(docs, ids)
    fresh = fresh_like(index)
    fresh.add(docs, ids)
    ref = fresh.search(queries, k=10)

    new_ids = [f"b{i}" for i in range(len(extra))]
    index.add(extra, new_ids)
    assert any(i >= len(docs) for row in index.search(queries, k=10).ids for i in row)
    index.delete(new_ids)
    for stage in ("tombstones", "compacted", "reloaded"):
        if stage == "compacted":
            index.compact()
            assert index.n_positions == len(docs)
        if stage == "reloaded":
            index.save(tmp_path / "ix")
            index = load_index(tmp_path / "ix")
        got = index.search(queries, k=10)
        np.testing.assert_array_equal(got.ids, ref.ids, err_msg=stage)
        np.testing.assert_array_equal(got.scores, ref.scores, err_msg=stage)
        assert [got.doc_ids[i] for i in got.ids[0]] == [ref.doc_ids[i] for i in ref.ids[0]]


def test_ids_survive_compaction_and_reload(corpus, tmp_path):
    docs, extra, queries = corpus
    index = make_pipeline(SPECS[0]).build(docs, [f"a{i}" for i in range(len(docs))])
    index.add(extra, [f"b{i}" for i in range(len(extra))])
    index.delete([f"a{i}" for i in range(0, 300, 3)])
    before = index.search(queries, k=10)
    ext_before = [before.external(q) for q in range(len(queries))]
    index.compact()
    index.save(tmp_path / "ix")
    index = load_index(tmp_path / "ix")
    after = index.search(queries, k=10)
    assert [after.external(q) for q in range(len(queries))] == ext_before
    assert index.position_of("b7") == index.doc_ids.index("b7")
    with pytest.raises(KeyError):
        index.position_of("a3")
    index.add(extra[0:1], ["a3"])  # a deleted id may come back
    assert index.doc_ids[index.position_of("a3")] == "a3"


def test_codebook_drift_is_reported(corpus):
    docs, extra, _ = corpus
    index = make_pipeline(SPECS[0]).build(docs, [f"a{i}" for i in range(len(docs))])
    d = index.drift()
    assert d["fit_mse"] > 0 and d["added_tokens"] == 0 and d["rebuild_recommended"] is False
    index.add(extra, [f"b{i}" for i in range(len(extra))])
    d = index.drift()
    assert d["added_tokens"] == extra.n_tokens and 0.5 < d["ratio"] < DRIFT_WARN
    rng = np.random.default_rng(0)  # vectors from elsewhere: the codebook does not fit them
    far = rng.standard_normal((400, 16)).astype(np.float32) * 3
    with pytest.warns(UserWarning, match="drift"):
        index.add(MultiVectors(far, np.array([0, 200, 400])), ["far1", "far2"])
    d = index.drift()
    assert d["ratio"] > DRIFT_WARN and d["rebuild_recommended"] is True


@pytest.mark.parametrize("spec", SPECS)
def test_streaming_build_equals_in_memory_build(corpus, spec, tmp_path):
    docs, _, queries = corpus
    ids = [f"a{i}" for i in range(len(docs))]
    ref = make_pipeline(spec).build(docs, ids)
    streamed = fresh_like(ref)
    batches = ((docs[a : a + 37], ids[a : a + 37]) for a in range(0, len(docs), 37))
    build_streaming(streamed, tmp_path / "ix", batches)
    loaded = load_index(tmp_path / "ix")
    a, b = ref.search(queries, k=10), loaded.search(queries, k=10)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert loaded.doc_ids == ids
    with pytest.raises(ValueError, match="duplicate id"):
        build_streaming(fresh_like(ref), tmp_path / "ix", [(docs[:2], ["x", "x"])])
    assert load_index(tmp_path / "ix").doc_ids == ids  # the failed build left the index alone
    assert not [p for p in (tmp_path / "ix").iterdir() if p.name.startswith(".tmp")]


def test_bad_input_changes_nothing_on_disk(corpus, tmp_path):
    docs, extra, _ = corpus
    root = tmp_path / "ix"
    index = make_pipeline(SPECS[0]).build(docs, [f"a{i}" for i in range(len(docs))])
    index.save(root)
    digest = tree_digest(root)
    index = load_index(root)
    with pytest.raises(ValueError, match="dim=8"):
        index.add(clustered_docs(3, dim=8), ["n1", "n2", "n3"])
    with pytest.raises(ValueError, match="duplicate id"):
        index.add(extra[:2], ["n1", "n1"])
    with pytest.raises(ValueError, match="already in the index"):
        index.add(extra[:1], ["a5"])
    with pytest.raises(KeyError, match="nope"):
        index.delete(["a1", "nope"])
    assert len(index) == len(docs) and bool(index.alive[1])  # nothing half-done
    assert tree_digest(root) == digest

    gen = storage.current_generation(root)
    man_path = gen / "manifest.json"
    man = json.loads(man_path.read_text())
    man["format_version"] = storage.FORMAT_VERSION + 1
    original, pointer = man_path.read_bytes(), (root / "CURRENT").read_bytes()
    man_path.write_text(json.dumps(man))
    (root / "CURRENT").write_text(f"{gen.name}\n{storage.sha256_file(man_path)}\n")
    with pytest.raises(ValueError, match="newer"):
        load_index(root)
    man_path.write_bytes(original)
    (root / "CURRENT").write_bytes(pointer)
    victim = gen / "codes.residuals.npy"
    saved = victim.read_bytes()
    victim.unlink()
    with pytest.raises(storage.IndexCorruptedError, match="codes.residuals.npy"):
        load_index(root)
    victim.write_bytes(saved)
    assert tree_digest(root) == digest
    assert load_index(root).n_positions == len(docs)


# -- command line --------------------------------------------------------------------------------
TEXTS = {
    "d1": "red apples and green pears",
    "d2": "the fast brown fox jumps",
    "d3": "sailing boats on a calm lake",
    "d4": "apples grow on apple trees",
    "d5": "a lake of fresh water",
    "d6": "foxes hunt at night",
}


@pytest.fixture
def text_index(tmp_path):
    root = tmp_path / "ix"
    ids = list(TEXTS) * 1
    Retriever.from_texts(ids, [TEXTS[i] for i in ids], HashingEncoder(dim=16),
                         pipeline="residual:k=8,nbits=2 | ivf:nprobe=2", path=root)
    return root


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_cli_add_delete_compact_inspect(text_index, tmp_path, capsys):
    root = str(text_index)
    new = write_jsonl(tmp_path / "new.jsonl", [
        {"_id": "n1", "title": "Boats", "text": "boats with red sails"},
        {"id": "n2", "text": "green pears in a bowl"},
    ])
    assert main(["add", root, "--data", str(new), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["added"] == 2 and report["documents"] == 8 and report["drift"]["added_tokens"] > 0
    assert main(["delete", root, "d2", "n2"]) == 0
    capsys.readouterr()
    assert main(["inspect", root, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["type"] == "ivf" and info["documents"] == 6 and info["tombstones"] == 2
    assert info["spec"].endswith("ivf:nprobe=2,probe=table")
    assert info["format_version"] == storage.FORMAT_VERSION and info["vectors"] > 0
    assert "codes.codes.npy" in info["files"] and info["bytes"] == sum(info["files"].values())
    assert main(["compact", root]) == 0
    assert main(["inspect", root]) == 0
    out = capsys.readouterr().out
    assert "0 tombstones" in out and "spec" in out and "manifest.json" in out
    index = load_index(root)
    assert sorted(index.doc_ids) == sorted(["d1", "d3", "d4", "d5", "d6", "n1"])
    r = Retriever.from_index(root, encoder=HashingEncoder(dim=16))
    assert r.retrieve("red sails", k=1)[0].id == "n1"


def test_cli_errors_leave_the_index_alone(text_index, tmp_path, capsys):
    root = str(text_index)
    digest = tree_digest(text_index)
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"_id": "d1", "text": "again"}])
    assert main(["add", root, "--data", str(dup)]) == 2
    assert "already in the index" in capsys.readouterr().err
    assert main(["delete", root, "d1", "missing-id"]) == 2
    assert "missing-id" in capsys.readouterr().err
    assert main(["add", root, "--data", str(tmp_path / "none.jsonl")]) == 2
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    assert tree_digest(text_index) == digest


def test_streaming_build_rejects_unfitted_and_wrong_dims(corpus, tmp_path):
    docs, _, _ = corpus
    index = make_pipeline(SPECS[0]).index
    with pytest.raises(ValueError, match="fit"):
        build_streaming(index, tmp_path / "ix", [])
    index.fit(docs)
    with pytest.raises(ValueError, match="dim"):
        build_streaming(index, tmp_path / "ix", [(clustered_docs(2, dim=8), ["x", "y"])])
    with pytest.raises(ValueError, match="empty"):
        build_streaming(index, tmp_path / "ix", [])
    assert not (tmp_path / "ix" / "CURRENT").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_streaming(index, tmp_path / "ix", [(docs[:10], [str(i) for i in range(10)])])
