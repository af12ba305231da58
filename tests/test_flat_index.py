import numpy as np
import pytest

from retrieval_prune.index.base import load_index
from retrieval_prune.index.flat import FlatIndex
from retrieval_prune.index.storage import IndexCorruptedError
from retrieval_prune.pipeline import make_pipeline
from retrieval_prune.types import MultiVectors

from . import naive
from .conftest import random_docs


def brute_force(queries, docs, alive=None):
    """Obviously-correct exact MaxSim: (n_q, n_docs) scores, -inf for empty/deleted docs."""
    out = np.full((len(queries), len(docs)), -np.inf)
    for qi in range(len(queries)):
        q = queries.doc(qi).astype(np.float64)
        for di in range(len(docs)):
            d = docs.doc(di).astype(np.float64)
            if d.shape[0] == 0 or (alive is not None and not alive[di]):
                continue
            out[qi, di] = (q @ d.T).max(axis=1).sum()
    return out


def check_against_brute(index, queries, docs, k, alive=None):
    res = index.search(queries, k=k)
    ref = brute_force(queries, docs, alive)
    for qi in range(len(queries)):
        # scores within the float32 rounding bound of the operands, ids equal up to
        # near-ties within those bounds (tests/naive.py)
        bound = naive.maxsim_bound(queries.doc(qi), docs.embeddings, docs.offsets)
        naive.assert_topk_close(res.scores[qi], res.ids[qi], ref[qi], bound)


def test_flat_matches_brute_force_with_empty_docs():
    docs = random_docs(40, dim=24, empty={0, 7, 39})
    queries = random_docs(5, dim=24, seed=1)
    index = FlatIndex()
    index.add(docs, [f"d{i}" for i in range(len(docs))])
    check_against_brute(index, queries, docs, k=10)
    res = index.search(queries, k=100)  # more than there are documents
    assert {0, 7, 39}.isdisjoint(set(res.ids.ravel().tolist()))
    assert (res.ids[:, 37:] == -1).all()


def test_save_load_identical_results_and_mmap(tmp_path):
    docs = random_docs(30, dim=8)
    queries = random_docs(4, dim=8, seed=3)
    index = make_pipeline("exact").build(docs, [str(i) for i in range(30)], texts=["t"] * 30)
    before = index.search(queries, k=5)
    index.save(tmp_path / "ix")
    again = load_index(tmp_path / "ix")
    after = again.search(queries, k=5)
    np.testing.assert_array_equal(before.ids, after.ids)
    np.testing.assert_array_equal(before.scores, after.scores)
    assert again.texts == ["t"] * 30 and again.pipeline_spec == "flat"
    assert isinstance(again._emb, np.memmap)


def test_delete_compact_keeps_external_ids(tmp_path):
    docs = random_docs(20, dim=8)
    ids = [f"doc-{i}" for i in range(20)]
    index = FlatIndex()
    index.add(docs, ids)
    index.delete(["doc-3", "doc-11"])
    alive = np.ones(20, bool)
    alive[[3, 11]] = False
    queries = random_docs(3, dim=8, seed=5)
    check_against_brute(index, queries, docs, k=20, alive=alive)
    before = index.search(queries, k=5).to_run(["a", "b", "c"])
    index.compact()
    assert len(index) == 18 and index.n_positions == 18
    assert index.search(queries, k=5).to_run(["a", "b", "c"]) == before
    index.save(tmp_path / "ix")
    assert load_index(tmp_path / "ix").search(queries, k=5).to_run(["a", "b", "c"]) == before


def test_add_then_delete_equals_fresh_build():
    docs = random_docs(12, dim=8)
    extra = random_docs(5, dim=8, seed=9)
    queries = random_docs(3, dim=8, seed=2)
    a = FlatIndex()
    a.add(docs, [str(i) for i in range(12)])
    a.add(extra, [f"x{i}" for i in range(5)])
    a.delete([f"x{i}" for i in range(5)])
    b = FlatIndex()
    b.add(docs, [str(i) for i in range(12)])
    qids = ["q0", "q1", "q2"]
    assert a.search(queries, k=6).to_run(qids) == b.search(queries, k=6).to_run(qids)


def test_bad_input_is_rejected_and_changes_nothing():
    docs = random_docs(5, dim=8)
    index = FlatIndex()
    index.add(docs, list("abcde"))
    emb = random_docs(2, dim=8, seed=4).embeddings.copy()
    emb[0, 0] = np.inf
    bad = MultiVectors(emb, random_docs(2, dim=8, seed=4).offsets)
    with pytest.raises(ValueError, match="NaN or Inf"):
        index.add(bad, ["f", "g"])
    with pytest.raises(ValueError, match="dim=4"):
        index.add(random_docs(2, dim=4), ["f", "g"])
    with pytest.raises(ValueError, match="already in the index"):
        index.add(random_docs(1, dim=8), ["a"])
    with pytest.raises(ValueError, match="duplicate id"):
        index.add(random_docs(2, dim=8), ["z", "z"])
    with pytest.raises(KeyError, match="unknown document id"):
        index.delete(["a", "nope"])
    with pytest.raises(ValueError, match="k=0"):
        index.search(docs[0:1], k=0)
    with pytest.raises(ValueError, match="dim=4"):
        index.search(random_docs(1, dim=4), k=1)
    assert len(index) == 5 and index.n_positions == 5 and index.alive.all()
    with pytest.raises(ValueError, match="empty"):
        make_pipeline("exact").build(random_docs(0, dim=8), [])


def test_corrupted_index_file_named(tmp_path):
    index = FlatIndex()
    index.add(random_docs(5, dim=8), list("abcde"))
    gen = index.save(tmp_path / "ix")
    raw = bytearray((gen / "embeddings.npy").read_bytes())
    raw[-3] ^= 0xFF
    (gen / "embeddings.npy").write_bytes(bytes(raw))
    with pytest.raises(IndexCorruptedError, match="embeddings.npy"):
        load_index(tmp_path / "ix")
