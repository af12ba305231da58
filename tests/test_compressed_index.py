"""CompressedIndex: recall against exact MaxSim, save/load, deletes, empty documents.

Data here is synthetic (seeded topic-clustered unit vectors), not a benchmark.
"""

import json

import numpy as np
import pytest

from retrieval_prune.index.base import load_index
from retrieval_prune.index.compressed import CompressedIndex, blocked_maxsim
from retrieval_prune.types import MultiVectors
from tests import naive

DIM = 64
N_DOCS = 300


def naive_maxsim(queries: MultiVectors, docs: MultiVectors) -> np.ndarray:
    """Obviously-correct MaxSim scores (n_q, n_docs); empty documents get -inf."""
    out = np.full((len(queries), len(docs)), -np.inf, np.float64)
    for i in range(len(queries)):
        q = queries.doc(i).astype(np.float64)
        for j in range(len(docs)):
            d = docs.doc(j).astype(np.float64)
            if d.shape[0]:
                out[i, j] = (q @ d.T).max(axis=1).sum() if q.shape[0] else 0.0
    return out


def exact_and_bound(index, queries):
    """Float64 scores ``(n_q, n_docs)`` of what the index scores (transformed query vs
    decoded documents, or the float32 code table) and the float32 rounding bound derived
    from those operands (tests/naive.py); the asymmetric binary scan adds its int16 table's
    rounding, ``n_q * n_bytes * scale / 2`` (kernels.ops.maxsim_binary)."""
    from retrieval_prune.kernels import ops

    codec = index.storage_codec
    qside = index._query_side(index.chain.transform(queries.embeddings))
    off = np.asarray(index._offsets)
    dec = None if codec.score_kind == "table" else index.decode_documents()
    exact = np.empty((len(queries), len(off) - 1))
    bound = np.empty_like(exact)
    for r in range(len(queries)):
        a, b = queries.offsets[r], queries.offsets[r + 1]
        if dec is None:
            t, codes = qside[:, a:b], index._parts["codes"]
            exact[r], bound[r] = naive.code_scores(t, codes, off), naive.code_sum_bound(t, codes, off)
            continue
        qq = qside[a:b]
        exact[r], bound[r] = naive.maxsim_scores(qq, dec, off), naive.maxsim_bound(qq, dec, off)
        if codec.score_kind == "binary" and codec.score != "hamming":
            lut = ops.binary_lut(qq)
            bound[r] += lut.n_q * lut.lut.shape[1] * lut.scale / 2 * (1 + naive.EPS32)
    return exact, bound


def topic_corpus(seed=0):
    """Synthetic: 40 topic centres; a document mixes 1-3 topics; queries are noisy
    copies of a few tokens of one document. Documents 5 and 77 are empty."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def tokens(topics, n, noise):
        x = centres[rng.choice(topics, n)] + noise * rng.standard_normal((n, DIM)) / np.sqrt(DIM)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    docs, doc_topics = [], []
    for i in range(N_DOCS):
        topics = rng.choice(40, int(rng.integers(1, 4)), replace=False)
        n = 0 if i in (5, 77) else int(rng.integers(3, 25))
        docs.append(tokens(topics, n, 0.6))
        doc_topics.append(topics)
    queries = []
    for j in range(30):
        d = docs[(j * 7 + 1) % N_DOCS]
        pick = d[rng.integers(0, len(d), 8)]
        q = pick + 0.3 * rng.standard_normal(pick.shape) / np.sqrt(DIM)
        queries.append((q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32))
    return MultiVectors.from_list(docs), MultiVectors.from_list(queries)


@pytest.fixture(scope="module")
def corpus():
    docs, queries = topic_corpus()
    return docs, queries, naive_maxsim(queries, docs)


def ids_of(n):
    return [f"doc-{i}" for i in range(n)]


#: spec -> minimum recall of the exact top-10 (measured on this synthetic set, with margin)
RECALL = {  # measured: 1.0, 1.0, .92, .80, .79, .70, .66, .86, .92, .95, .86, .85, .88
    "f32": 1.0,
    "fp16": 0.99,
    "pca:dim=32": 0.85,
    "kmeans:k=128": 0.72,
    "hkmeans:k=128,score=table": 0.72,
    "hkmeans:k=128": 0.6,
    "kmeans:k=128,score=hamming": 0.55,
    "residual:k=64,nbits=1": 0.78,
    "residual:k=64,nbits=2": 0.85,
    "residual:k=64,nbits=4": 0.9,
    "binary:kind=sign": 0.8,
    "binary:kind=sign,score=hamming": 0.78,
    "pca:dim=32 | residual:k=64,nbits=2": 0.82,
}


@pytest.fixture(scope="module")
def built(corpus):
    docs, _, _ = corpus
    out = {}
    for spec in RECALL:
        index = CompressedIndex.from_spec(spec)
        index.add(docs, ids_of(len(docs)))
        out[spec] = index
    return out


@pytest.mark.parametrize("spec", list(RECALL))
def test_recall_of_exact_top10(spec, corpus, built):
    docs, queries, exact = corpus
    res = built[spec].search(queries, k=10)
    truth = np.argsort(-exact, axis=1, kind="stable")[:, :10]
    recall = np.mean([len(set(truth[i]) & set(res.ids[i])) / 10 for i in range(len(queries))])
    assert recall >= RECALL[spec], f"{spec}: recall@10 {recall:.3f} < {RECALL[spec]}"
    assert 5 not in res.ids and 77 not in res.ids  # empty documents never match


@pytest.mark.parametrize("spec", list(RECALL))
def test_numba_scan_equals_numpy_reference(spec, corpus, built):
    docs, queries, _ = corpus
    index = built[spec]
    index.delete(["doc-1", "doc-50"])
    try:
        res = index.search(queries, k=20)
        ref_s, ref_i = index.search_reference(queries, k=20)
        # both against float64 on the same operands, within their rounding bound
        exact, bound = exact_and_bound(index, queries)
        alive = np.asarray(index.alive).astype(bool)
    finally:
        index.alive[[1, 50]] = 1  # undelete: the fixture is shared
    for r in range(len(queries)):
        naive.assert_topk_close(res.scores[r], res.ids[r], exact[r], bound[r], alive)
        naive.assert_topk_close(ref_s[r], ref_i[r], exact[r], bound[r], alive)
    assert 1 not in res.ids and 50 not in res.ids


def test_f32_scores_equal_exact_maxsim(corpus, built):
    docs, queries, exact = corpus
    res = built["f32"].search(queries, k=10)
    for r in range(len(queries)):  # rounding bound from the operands (tests/naive.py)
        bound = naive.maxsim_bound(queries.doc(r), docs.embeddings, docs.offsets)
        naive.assert_within(res.scores[r], exact[r, res.ids[r]], bound[res.ids[r]])


def test_table_scores_equal_maxsim_on_decoded_vectors(corpus, built):
    docs, queries, _ = corpus
    index = built["kmeans:k=128"]
    decoded = MultiVectors(index.decode_documents(), docs.offsets)
    expect = naive_maxsim(queries, decoded)
    res = index.search(queries, k=5)
    for r in range(len(queries)):  # table = centroids @ q.T, then summed: naive.maxsim_bound
        bound = naive.maxsim_bound(queries.doc(r), decoded.embeddings, docs.offsets)
        naive.assert_within(res.scores[r], expect[r, res.ids[r]], bound[res.ids[r]])


@pytest.mark.parametrize("spec", list(RECALL))
def test_save_load_gives_identical_results(spec, corpus, built, tmp_path):
    docs, queries, _ = corpus
    index = built[spec]
    before = index.search(queries, k=10)
    index.save(tmp_path / "ix")
    loaded = load_index(tmp_path / "ix")
    assert isinstance(loaded, CompressedIndex)
    assert loaded.spec == index.spec and loaded.chain == index.chain
    after = loaded.search(queries, k=10)
    np.testing.assert_array_equal(after.ids, before.ids)
    np.testing.assert_array_equal(after.scores, before.scores)
    assert after.doc_ids == before.doc_ids


def test_saved_folder_holds_codes_not_floats(corpus, built, tmp_path):
    docs, _, _ = corpus
    index = built["pca:dim=32 | residual:k=64,nbits=2"]
    gen = index.save(tmp_path / "ix")
    manifest = json.loads((gen / "manifest.json").read_text())
    files = manifest["files"]
    assert set(files) == {
        "offsets.npy", "codes.codes.npy", "codes.residuals.npy",
        "codec.0.dim_in.npy", "codec.0.components.npy",
        "codec.1.dim_in.npy", "codec.1.centroids.npy", "codec.1.cutoffs.npy",
        "codec.1.bucket_values.npy",
        "doc_ids_blob.npy", "doc_ids_offsets.npy", "alive.npy",
    }  # fmt: skip
    assert files["codes.residuals.npy"]["shape"] == [docs.n_tokens, 8]
    assert files["codes.codes.npy"]["dtype"] == "|u1"
    assert files["codec.1.centroids.npy"]["dtype"] == "<f2"  # codebook kept in half precision
    assert manifest["meta"]["type"] == "compressed"
    assert manifest["meta"]["spec"] == index.spec
    assert manifest["meta"]["info"]["codec"]["code_size"] == 9


def test_delete_and_compact_keep_results(corpus, tmp_path):
    docs, queries, _ = corpus
    index = CompressedIndex.from_spec("residual:k=64,nbits=2")
    index.add(docs, ids_of(len(docs)))
    gone = [f"doc-{i}" for i in range(0, N_DOCS, 3)]
    index.delete(gone)
    res = index.search(queries, k=10)
    assert not set(gone) & {d for q in range(len(queries)) for d, _ in res.external(q)}
    index.compact()
    again = index.search(queries, k=10)
    for q in range(len(queries)):
        assert res.external(q) == again.external(q)
    index.save(tmp_path / "ix")
    loaded = load_index(tmp_path / "ix")
    for q in range(len(queries)):
        assert loaded.search(queries, k=10).external(q) == res.external(q)


def test_fit_first_then_add_in_batches_equals_one_batch(corpus):
    docs, queries, _ = corpus
    one = CompressedIndex.from_spec("residual:k=64,nbits=2")
    one.fit(docs)
    one.add(docs, ids_of(len(docs)))
    two = CompressedIndex.from_spec("residual:k=64,nbits=2")
    two.fit(docs)
    two.add(docs[:100], ids_of(100))
    two.add(docs[100:], ids_of(len(docs))[100:])
    a, b = one.search(queries, k=10), two.search(queries, k=10)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.scores, b.scores)


def test_build_is_deterministic_under_a_seed(corpus):
    docs, queries, _ = corpus
    runs = []
    for _ in range(2):
        index = CompressedIndex.from_spec("kmeans:k=64", seed=7)
        index.add(docs, ids_of(len(docs)))
        runs.append(index.search(queries, k=10))
    np.testing.assert_array_equal(runs[0].ids, runs[1].ids)
    np.testing.assert_array_equal(runs[0].scores, runs[1].scores)


def test_empty_documents_and_empty_batches(corpus):
    docs, queries, _ = corpus
    index = CompressedIndex.from_spec("binary:sign")
    empty = MultiVectors.from_list([np.zeros((0, DIM), np.float32)] * 3)
    with pytest.raises(ValueError, match="no token vectors to fit"):
        index.add(empty, ["e0", "e1", "e2"])
    index.fit(docs)
    index.add(empty, ["e0", "e1", "e2"])  # fitted: an all-empty batch is fine
    res = index.search(queries, k=5)
    assert (res.ids == -1).all() and np.isneginf(res.scores).all()
    index.add(docs[:10], ids_of(10))
    res = index.search(queries, k=20)
    assert set(res.ids[res.ids >= 0].tolist()) <= set(range(3, 13)) - {3 + 5}


def test_bad_input(corpus):
    docs, queries, _ = corpus
    index = CompressedIndex.from_spec("residual:k=64,nbits=2")
    index.add(docs, ids_of(len(docs)))
    wrong = MultiVectors.from_list([np.ones((2, DIM + 1), np.float32)])
    with pytest.raises(ValueError, match="dim=65"):
        index.search(wrong, k=3)
    with pytest.raises(ValueError, match="refitting"):
        index.fit(docs)
    with pytest.raises(ValueError, match="nbits=3 is not supported"):
        CompressedIndex.from_spec("residual:nbits=3")
    with pytest.raises(ValueError, match="n_tokens=3 should be >= k=64"):
        CompressedIndex.from_spec("kmeans:k=64").fit(docs.embeddings[:3])
    tiny = MultiVectors.from_list([docs.embeddings[:3]])
    with pytest.raises(ValueError, match="n_tokens=3 should be >= k=64"):
        CompressedIndex.from_spec("kmeans:k=64").add(tiny, ["x"])  # fit on the first batch


def test_blocked_maxsim_blocks_do_not_change_results(corpus, monkeypatch):
    docs, queries, exact = corpus
    import retrieval_prune.index.compressed as mod

    sim = lambda a, b: queries.embeddings @ docs.embeddings[a:b].T  # noqa: E731
    full = blocked_maxsim(sim, queries.offsets, docs.offsets, 10)
    monkeypatch.setattr(mod, "BLOCK_BYTES", 1)  # one tiny block per document
    small = blocked_maxsim(sim, queries.offsets, docs.offsets, 10)
    np.testing.assert_array_equal(full[1], small[1])
    # two BLAS products of other shapes: each within the operands' bound of exact
    for r in range(len(queries)):
        bound = naive.maxsim_bound(queries.doc(r), docs.embeddings, docs.offsets)[full[1][r]]
        naive.assert_within(small[0][r], full[0][r], 2 * bound)
    truth = np.argsort(-exact, axis=1, kind="stable")[:, :10]
    assert np.mean(full[1] == truth) > 0.98  # ties aside, the exact ranking
    k_big = blocked_maxsim(sim, queries.offsets, docs.offsets, N_DOCS + 5)
    assert (k_big[1][:, -7:] == -1).all()  # 298 non-empty documents, then padding
