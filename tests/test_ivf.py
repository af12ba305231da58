"""Staged search (ivf / hnsw index types): kernels against NumPy, exhaustive staged search
against brute force over the same codes, budgets, specs, persistence."""

import numpy as np
import pytest

from retrieval_prune import registry
from retrieval_prune.index.base import load_index
from retrieval_prune.index.hnsw import HNSWIndex
from retrieval_prune.index.ivf import IVFIndex, sign_words
from retrieval_prune.index.staged import _select_idx
from retrieval_prune.kernels import ivf as K
from retrieval_prune.pipeline import ALIASES, make_pipeline
from retrieval_prune.types import MultiVectors
from tests import naive
from tests.conftest import random_docs

ALL = "n_candidates=100000,n_rerank=100000"
EXHAUSTIVE = [
    f"residual:k=32,nbits=2 | ivf:nprobe=32,{ALL}",
    f"residual:k=32,nbits=2 | ivf:nprobe=32,{ALL},probe=hamming,t_cs=0.2",
    f"residual:k=32,nbits=4 | hnsw:nprobe=32,{ALL},ef=40",
    f"pca:dim=8 | residual:k=32,nbits=1 | ivf:nprobe=32,{ALL}",
    f"kmeans:k=32 | ivf:nprobe=32,{ALL}",
    # int8 codebooks: the int8 x int8 stage-1 table must not leak into the final scores
    f"residual:k=32,nbits=2,centroid_bits=8 | ivf:nprobe=32,{ALL}",
    f"kmeans:k=32,centroid_bits=8 | ivf:nprobe=32,{ALL}",
]


def clustered_docs(n_docs=400, dim=16, seed=0, n_topics=24, empty=(7,), topic_seed=1000):
    """Synthetic documents drawn around shared topic centres (labelled synthetic)."""
    centres = np.random.default_rng(topic_seed).standard_normal((n_topics, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n_docs):
        n = 0 if i in empty else int(rng.integers(1, 30))
        t = rng.integers(0, n_topics, 3)[rng.integers(0, 3, n)]
        x = centres[t] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
        docs.append((x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)).astype(np.float32))
    return MultiVectors.from_list(docs, dim=dim)


@pytest.fixture(scope="module")
def data():
    docs = clustered_docs()
    queries = clustered_docs(25, seed=9, empty=())
    return docs, [f"d{i}" for i in range(len(docs))], queries


# -- kernels against NumPy ------------------------------------------------------------------------
def test_build_ivf_matches_numpy():
    rng = np.random.default_rng(0)
    off = np.concatenate([[0], np.cumsum(rng.integers(0, 9, 60))]).astype(np.int64)
    codes = rng.integers(0, 20, off[-1]).astype(np.uint16)
    list_off, docs = K.build_ivf_kernel(codes, off, 20)
    doc_of = np.repeat(np.arange(60), np.diff(off))
    for c in range(20):
        want = np.unique(doc_of[codes == c])
        np.testing.assert_array_equal(docs[list_off[c] : list_off[c + 1]], want)


def test_topn_and_hamming_probe_match_numpy():
    rng = np.random.default_rng(1)
    t = rng.standard_normal((50, 16)).astype(np.float32)  # 7 real columns, 9 of padding
    # (16 wide: the vector path; the first n rows fill the lists, later ones pass a
    # threshold compare per 16 lanes)
    t[:, 7:] = 100.0  # padding columns must never be read
    t[3, 2] = t[4, 2] = t[:, 2].max() + 1  # a tie at the top: lower id first
    t[10:14, 5] = 5.0  # a four-way tie across the cut of the top 3
    for n in (1, 3, 5):
        out = np.empty((7, n), np.int64)
        rng_ = np.full(2, np.nan, np.float32)
        K.topn_cols_kernel(t, 7, n, out, rng_)
        for i in range(7):
            want = np.lexsort((np.arange(50), -t[:, i]))[:n]
            np.testing.assert_array_equal(out[i], want)
        # min and max are exact operations: the fused range equals numpy's, padding unread
        assert (rng_[0], rng_[1]) == (t[:, :7].min(), t[:, :7].max())
    c = rng.standard_normal((40, 70)).astype(np.float32)
    q = rng.standard_normal((6, 70)).astype(np.float32)
    got = np.empty((6, 4), np.int64)
    K.hamming_probe_kernel(sign_words(q), sign_words(c), 4, got)
    dist = ((q[:, None, :] > 0) != (c[None, :, :] > 0)).sum(axis=2)
    for i in range(6):
        np.testing.assert_array_equal(got[i], np.lexsort((np.arange(40), dist[i]))[:4])


def test_gather_skips_dead_and_repeats():
    list_off = np.array([0, 3, 5, 6], np.int64)
    docs = np.array([0, 2, 4, 2, 3, 1], np.int32)
    alive = np.array([1, 1, 1, 1, 0], np.uint8)
    mark = np.zeros(5, np.int32)
    out = np.empty(5, np.int32)
    n = K.gather_kernel(np.array([0, 1, 0], np.int64), list_off, docs, alive, mark, 1, out)
    assert sorted(out[:n].tolist()) == [0, 2, 3]
    n = K.gather_kernel(np.array([2], np.int64), list_off, docs, alive, mark, 2, out)
    assert out[:n].tolist() == [1]


def test_select_breaks_ties_by_position():
    cand = np.array([3, 5, 8, 9, 12])
    s = np.array([1.0, 2.0, 2.0, 2.0, 0.5], np.float32)
    assert cand[_select_idx(s, 2)].tolist() == [5, 8]
    assert cand[_select_idx(s, 9)].tolist() == cand.tolist()


# -- staged search == brute force at exhaustive budgets ---------------------------------------------
@pytest.mark.parametrize("spec", EXHAUSTIVE)
def test_exhaustive_staged_search_equals_bruteforce(data, spec):
    docs, ids, queries = data
    index = make_pipeline(spec).build(docs, ids)
    # Residual codes: both rerank with residual_rerank_kernel on the same codebook (an
    # int8 one decodes like its dequantised copy: test_rerank_from_int8_codebook_...):
    # same kernel, same order, bit-identical on every CPU. Centroid codes are not: the
    # staged rerank takes the stage-1 table (centroid_table_kernel) or a BLAS table of one
    # query, brute force a BLAS table of the whole batch (other blocking, other rounding),
    # so both are checked against float64 MaxSim within the operands' rounding bound.
    same_kernels = index.storage_codec.score_kind == "residual"
    for q in (queries, queries[0:1]):
        got, ref = index.search(q, k=10), index.search_bruteforce(q, k=10)
        if same_kernels:
            np.testing.assert_array_equal(got.ids, ref.ids)
            np.testing.assert_array_equal(got.scores, ref.scores)
            continue
        qt = index.chain.transform(q.embeddings)
        dec, off = index.decode_documents(), np.asarray(index._offsets)
        for r in range(len(q)):
            qq = qt[q.offsets[r] : q.offsets[r + 1]]
            exact = naive.maxsim_scores(qq, dec, off)
            bound = naive.maxsim_bound(qq, dec, off)  # from the operands: any CPU's order
            for res in (got, ref):
                naive.assert_topk_close(res.scores[r], res.ids[r], exact, bound)
    empty_doc = 7
    assert empty_doc not in index.search(queries, k=len(docs)).ids


def test_empty_query_and_k_beyond_the_corpus(data):
    docs, ids, _ = data
    index = make_pipeline(EXHAUSTIVE[0]).build(docs[:12], ids[:12])
    q = MultiVectors.from_list([np.zeros((0, 16), np.float32), docs.doc(1)])
    res = index.search(q, k=20)
    assert res.ids.shape == (2, 12)  # k is clamped to the live documents
    assert (res.scores[0][res.ids[0] >= 0] == 0).all()  # an empty query scores 0
    assert 7 not in res.ids[0] and 7 not in res.ids[1]  # the empty document never matches
    assert (res.ids[1] >= 0).sum() == 11 and res.ids[1, 0] == 1


def test_small_budgets_keep_recall_on_clustered_data(data):
    docs, ids, queries = data
    index = make_pipeline("residual:k=64,nbits=2 | ivf:nprobe=4,n_candidates=64,n_rerank=24").build(docs, ids)
    got, ref = index.search(queries, k=10), index.search_bruteforce(queries, k=10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.ids, ref.ids, strict=False)])
    assert recall >= 0.9
    index.configure(nprobe=1, n_candidates=12, n_rerank=10)
    small = index.search(queries, k=10)
    assert (small.ids >= 0).all()  # budgets below k are raised to k


# -- specs and persistence ------------------------------------------------------------------------
def test_spec_round_trip_and_defaults():
    for name, cls in (("ivf", IVFIndex), ("hnsw", HNSWIndex)):
        index = make_pipeline(f"pca:dim=8 | residual:nbits=1 | {name}:nprobe=3").index
        assert isinstance(index, cls) and index.nprobe == 3
        again = cls.from_spec(index.spec)
        assert again == index and again.spec == index.spec
        assert make_pipeline(index.spec).index == index
        assert registry.get(name) is cls
    assert make_pipeline("ivf").index.chain.spec.startswith("residual:")
    assert "default" in ALIASES and make_pipeline("default").spec.endswith(
        make_pipeline(ALIASES["default"]).index.spec
    )


def test_budgets_follow_k_like_plaid_unless_set():
    auto = make_pipeline("residual:nbits=1 | ivf").index
    assert auto.budgets(10) == (256, 64) and auto.budgets(100) == (1024, 256)
    assert auto.budgets(1000) == (4096, 1024)
    fixed = make_pipeline("residual:nbits=1 | ivf:n_candidates=512,n_rerank=300").index
    assert fixed.budgets(10) == fixed.budgets(100) == (512, 300)
    assert make_pipeline("residual:nbits=1 | ivf:n_candidates=512").index.budgets(10) == (512, 128)


def test_bad_specs_and_params():
    with pytest.raises(ValueError, match="centroid codes"):
        make_pipeline("fp16 | ivf")
    with pytest.raises(ValueError, match="nprobe"):
        make_pipeline("residual | ivf:nprobe=0")
    with pytest.raises(ValueError, match="probe"):
        make_pipeline("residual | ivf:probe=graph")
    index = make_pipeline("residual | ivf").index
    with pytest.raises(ValueError, match="unknown"):
        index.configure(nprob=3)


@pytest.mark.parametrize("spec", [EXHAUSTIVE[0], EXHAUSTIVE[2], "residual:k=32,nbits=2 | ivf:nprobe=2,n_candidates=30,n_rerank=12"])
def test_save_load_gives_identical_results(data, tmp_path, spec):
    docs, ids, queries = data
    index = make_pipeline(spec).build(docs, ids)
    index.delete(["d3", "d11"])
    before = index.search(queries, k=10)
    index.save(tmp_path / "ix")
    loaded = load_index(tmp_path / "ix")
    assert type(loaded) is type(index) and loaded.spec == index.spec
    assert isinstance(np.asarray(loaded._parts["codes"]).base, np.memmap) or hasattr(loaded._parts["codes"], "filename")
    after = loaded.search(queries, k=10)
    np.testing.assert_array_equal(before.ids, after.ids)
    np.testing.assert_array_equal(before.scores, after.scores)


def test_same_seed_same_index(data):
    docs, ids, queries = data
    a = make_pipeline("residual:k=32,nbits=2 | hnsw:nprobe=3").build(docs, ids).search(queries, k=10)
    b = make_pipeline("residual:k=32,nbits=2 | hnsw:nprobe=3").build(docs, ids).search(queries, k=10)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.scores, b.scores)


def test_query_dim_mismatch_is_refused(data):
    docs, ids, _ = data
    index = make_pipeline(EXHAUSTIVE[0]).build(docs, ids)
    with pytest.raises(ValueError, match="dim"):
        index.search(random_docs(2, dim=8), k=3)


def test_centroid_table_kernel_matches_numpy_float32_and_int8():
    from retrieval_prune.compress.kmeans import _quantize_int8
    from retrieval_prune.kernels.codes import centroid_table_kernel
    from retrieval_prune.kernels.ops import _pack
    from tests.naive import assert_dot_close

    rng = np.random.default_rng(3)
    for n_q, k, dim in [(32, 1030, 128), (5, 7, 24), (17, 300, 64)]:
        q = rng.standard_normal((n_q, dim)).astype(np.float32)
        c = rng.standard_normal((k, dim)).astype(np.float32)
        qp = _pack(q, np.array([0, n_q], np.int64))[0]
        nv = -(-n_q // 16)
        out = np.full((k, nv * 16), np.nan, np.float32)
        centroid_table_kernel(qp, nv, dim, c.reshape(-1), k, out.reshape(-1))
        assert_dot_close(out[:, :n_q], c, q)  # tolerance from the operands: any CPU's order
        assert np.all(out[:, n_q:] == 0)  # padding lanes are zero
        c8, _ = _quantize_int8(c)
        # an int8 codebook is read as its integer values (the portable int8 table's input;
        # its scales are applied after: test_int8_score_table_...)
        centroid_table_kernel(qp, nv, dim, c8.reshape(-1), k, out.reshape(-1))
        assert_dot_close(out[:, :n_q], c8.astype(np.float32), q)


def _int8_table_inputs(rng, n_q, k, dim):
    from retrieval_prune.compress.kmeans import _quantize_int8
    from retrieval_prune.kernels.ops import _pack

    q = rng.standard_normal((n_q, dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    c8, scale = _quantize_int8(rng.standard_normal((k, dim)).astype(np.float32))
    qp = _pack(q, np.array([0, n_q], np.int64))[0]
    corr = (-128 * c8.astype(np.int32).sum(axis=1)).astype(np.int32)
    return q, qp, c8, scale, corr


@pytest.mark.parametrize("n_q,k,dim", [(32, 1030, 128), (5, 7, 24), (17, 300, 64), (48, 515, 128)])
def test_int8_score_table_matches_numpy_and_is_the_same_on_every_cpu(n_q, k, dim):
    """int8 x int8 table: the query quantised per token (max |q| -> 127), products summed
    exactly; the VNNI kernel (where the CPU has it) and the portable one agree bit for bit."""
    from retrieval_prune.kernels import codes as ck
    from retrieval_prune.kernels.simd import HAS_VNNI

    rng = np.random.default_rng(n_q + k)
    q, qp, c8, scale, corr = _int8_table_inputs(rng, n_q, k, dim)
    nv = -(-n_q // 16)
    q8f, qs = np.empty_like(qp), np.empty(nv * 16, np.float32)
    qu = np.empty(qp.size, np.uint8)
    ck.quantize_query_i8(qp, nv, dim, q8f, qu, qs)
    s_ref = np.abs(q).max(axis=1) / np.float32(127.0)
    # max is exact; m / 127 rounds once, or twice as m * (1 / 127) under fastmath, NumPy's
    # once: at most 3u = 1.5 eps32 apart
    np.testing.assert_allclose(qs[:n_q], s_ref, rtol=2 * naive.EPS32, atol=0)
    assert np.all(qs[n_q:] == 0)
    q8 = np.rint(q / s_ref[:, None])
    assert np.abs(q8).max() <= 127
    dots = c8.astype(np.int64) @ q8.astype(np.int64).T  # exact integers
    want = dots.astype(np.float32) * (qs[None, :n_q] * scale[:, None])
    portable = np.full((k, nv * 16), np.nan, np.float32)
    ck.centroid_table_i8_kernel(q8f, nv, dim, c8.reshape(-1), qs, scale, k, portable.reshape(-1))
    # integer dots are exact in float32 (< 2**24); (qs * scale) and the product round
    # once each on both sides: at most 4u = 2 eps32 apart
    np.testing.assert_allclose(portable[:, :n_q], want, rtol=2 * naive.EPS32, atol=0)
    assert np.all(portable[:, n_q:] == 0)
    # the approximation itself: within the query's quantisation step of the float table
    c = c8.astype(np.float64) * scale[:, None].astype(np.float64)
    exact = c @ q.astype(np.float64).T
    # q * (1 / qs) rounds twice before rint: |q / qs - q8| <= 1/2 + 127 * eps32 per
    # element; the table itself is within 2 eps32 of the real product (see above)
    step = (0.5 + 127 * naive.EPS32) * qs[None, :n_q].astype(np.float64)
    bound = step * np.abs(c).sum(1)[:, None] + 2 * naive.EPS32 * np.abs(portable[:, :n_q])
    assert np.all(np.abs(portable[:, :n_q] - exact) <= bound)
    dispatched = np.full_like(portable, np.nan)
    ck.centroid_table_i8(qp, nv, dim, c8.reshape(-1), corr, scale, k, dispatched.reshape(-1))
    np.testing.assert_array_equal(dispatched, portable)
    if HAS_VNNI and dim % 4 == 0:
        vnni = np.full_like(portable, np.nan)
        ck.centroid_table_i8_vnni_kernel(qu, nv, dim, c8.reshape(-1), corr, qs, scale, k, vnni.reshape(-1))
        np.testing.assert_array_equal(vnni, portable)


def test_table_range_quantize_and_probe_match_numpy():
    rng = np.random.default_rng(9)
    for n_q, w in [(32, 32), (20, 32), (7, 16), (33, 48)]:
        t = np.zeros((301, w), np.float32)
        t[:, :n_q] = rng.standard_normal((301, n_q))
        t[:, n_q:] = 50.0  # padding columns must never be read
        none = np.zeros(1, np.uint8)
        lo, hi = K.table_range_kernel(t, n_q, none, False)
        assert (lo, hi) == (t[:, :n_q].min(), t[:, :n_q].max())
        keep = (rng.random(301) > 0.4).astype(np.uint8)
        lo2, hi2 = K.table_range_kernel(t, n_q, keep, True)
        assert (lo2, hi2) == (t[:, :n_q].min(), t[keep != 0, :n_q].max())
        inv = np.float32(255.0 / (hi - lo))
        w8 = -(-n_q // 32) * 32
        for use_keep in (False, True):
            out = np.full((301, w8), 77, np.uint8)  # not initialised: every lane is written
            K.quantize_table_kernel(t, n_q, np.float32(lo), inv, keep, use_keep, out)
            want = np.clip((t[:, :n_q] - np.float32(lo)) * inv + np.float32(0.5), 0, 255).astype(np.uint8)
            if use_keep:
                want[keep == 0] = 0
            assert np.abs(out[:, :n_q].astype(int) - want).max() <= 1  # fused multiply-add rounding
            assert np.all(out[:, n_q:] == 0)
        # lane-padded and unpadded tables probe alike
        a, b = np.empty((n_q, 4), np.int64), np.empty((n_q, 4), np.int64)
        ra, rb = np.empty(2, np.float32), np.empty(2, np.float32)
        K.topn_cols_kernel(t, n_q, 4, a, ra)
        K.topn_cols_kernel(np.ascontiguousarray(t[:, :n_q]), n_q, 4, b, rb)
        np.testing.assert_array_equal(a, b)
        # the probe's fused range is the range kernel's, on both paths
        assert tuple(ra) == tuple(rb) == (lo, hi)
        for n in (1, 300, 301):  # the extremes also when the first rows fill whole lists
            K.topn_cols_kernel(t, n_q, n, np.empty((n_q, n), np.int64), ra)
            assert tuple(ra) == (lo, hi)


def test_int8_centroids_round_trip_and_default_uses_them(tmp_path):
    from retrieval_prune.compress.residual import ResidualCodec

    assert "centroid_bits=8" in ALIASES["default"]
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3000, 32)).astype(np.float32)
    codec = ResidualCodec(k=64, nbits=2, centroid_bits=8).fit(x)
    state = codec.state_arrays()
    assert state["centroids"].dtype == np.int8 and state["centroid_scale"].shape == (64,)
    enc = codec.encode(x)
    again = ResidualCodec(k=64, nbits=2, centroid_bits=8).load_state(state)
    np.testing.assert_array_equal(again.decode(enc), codec.decode(enc))
    broken = {k: v for k, v in state.items() if k != "centroid_scale"}
    with pytest.raises(ValueError, match="centroid_scale"):
        ResidualCodec(k=64, nbits=2, centroid_bits=8).load_state(broken)
    # a whole index: saved int8 codebook, same search after reload
    docs = MultiVectors.from_list([rng.standard_normal((6, 32)).astype(np.float32) for _ in range(60)])
    index = IVFIndex.from_codecs("residual:k=16,nbits=2,centroid_bits=8", nprobe=2)
    index.add(docs, [f"d{i}" for i in range(60)])
    index.save(tmp_path / "ix")
    back = load_index(tmp_path / "ix")
    a, b = index.search(docs[:5], k=5), back.search(docs[:5], k=5)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.scores, b.scores)
