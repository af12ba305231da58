"""Kernels against the naive references in tests/naive.py (small seeded synthetic data)."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval_prune.kernels import ops
from tests import naive


def make_docs(rng, lengths, dim, normalise=True):
    """Synthetic CSR documents with the given token counts."""
    off = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=off[1:])
    x = rng.standard_normal((int(off[-1]), dim)).astype(np.float32)
    if normalise and x.size:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, off


def assert_search_close(s, i, q, qoff, d, off, alive=None):
    """Each query's top-k row against float64 MaxSim, within the operand-derived rounding
    bound of every document (tests/naive.py::maxsim_bound): near-ties may swap, nothing
    else may."""
    for r in range(len(qoff) - 1):
        qq = q[qoff[r] : qoff[r + 1]]
        exact = naive.maxsim_scores(qq, d, off)
        naive.assert_topk_close(s[r], i[r], exact, naive.maxsim_bound(qq, d, off), alive)


# awkward document lengths: empty, one token, partial blocks of 4 and 6, long ones
LENGTHS = [0, 1, 2, 3, 5, 7, 8, 9, 0, 16, 17, 31, 33, 1, 4, 64]

#: the register-blocking variants of the float kernels (kernels/simd.py). Both are plain
#: LLVM IR that runs on any x86-64 CPU (they differ in speed only), so both are tested on
#: every host; only the VNNI and AVX2 integer kernels need their instructions (skipped
#: where the host lacks them).
ISAS = ["avx2", "avx512"]


@pytest.fixture(params=ISAS)
def each_isa(request):
    """Run the test once per kernel variant (through ``ops.isa_variant``)."""
    with ops.isa_variant(request.param):
        yield request.param


@pytest.mark.usefixtures("each_isa")
@pytest.mark.parametrize("dim", [8, 128, 384])
@pytest.mark.parametrize("nq", [1, 5, 16, 17, 32, 33])
def test_maxsim_scores_vs_naive(dim, nq):
    rng = np.random.default_rng(dim * 100 + nq)
    d, off = make_docs(rng, LENGTHS, dim)
    q = rng.standard_normal((nq, dim)).astype(np.float32)
    got = ops.maxsim_scores(q, d, off)
    ref = naive.maxsim_scores(q, d, off)
    assert got.dtype == np.float32 and got.shape == (len(LENGTHS),)
    assert np.array_equal(np.isinf(got), np.isinf(ref))
    naive.assert_maxsim_close(got, q, d, off)  # bound from the operands (naive.maxsim_bound)
    # rerank on a candidate subset (with padding) gives the same numbers
    cand = np.array([3, -1, 0, 15, 3, 8], np.int64)
    rr = ops.maxsim_rerank(q, d, off, cand)
    exp = np.where(cand >= 0, got[cand], -np.inf).astype(np.float32)
    np.testing.assert_array_equal(rr, exp)


@pytest.mark.usefixtures("each_isa")
@pytest.mark.parametrize("dim", [16, 128, 384])
def test_maxsim_search_vs_naive(dim):
    rng = np.random.default_rng(dim)
    d, off = make_docs(rng, LENGTHS * 3, dim)
    qlens = [1, 5, 32, 33, 0, 17]
    q, qoff = make_docs(rng, qlens, dim)
    for k in (1, 3, 10, 100):
        s, i = ops.maxsim_search(q, qoff, d, off, k)
        assert s.shape == (len(qlens), k) and s.dtype == np.float32 and i.dtype == np.int64
        assert_search_close(s, i, q, qoff, d, off)  # bound from the operands
        # empty documents are never returned
        empty = np.flatnonzero(np.diff(off) == 0)
        assert not np.isin(i, empty).any()


def test_maxsim_search_k_larger_than_docs_pads():
    rng = np.random.default_rng(1)
    d, off = make_docs(rng, [3, 0, 2], 8)
    q, qoff = make_docs(rng, [4], 8)
    s, i = ops.maxsim_search(q, qoff, d, off, k=5)
    assert i[0, 2:].tolist() == [-1, -1, -1]
    assert np.isneginf(s[0, 2:]).all()
    assert sorted(i[0, :2].tolist()) == [0, 2]


def test_maxsim_search_alive_mask_and_ties():
    rng = np.random.default_rng(2)
    base, boff = make_docs(rng, [4, 6, 5], 32)
    # documents 0..8: three copies of each base doc -> exact ties
    docs = [base[boff[j] : boff[j + 1]] for j in (0, 1, 2, 0, 1, 2, 0, 1, 2)]
    off = np.zeros(10, np.int64)
    np.cumsum([x.shape[0] for x in docs], out=off[1:])
    d = np.concatenate(docs)
    q = rng.standard_normal((7, 32)).astype(np.float32)
    qoff = np.array([0, 7])
    s, i = ops.maxsim_search(q, qoff, d, off, k=9)
    # ties ordered by lower id: each group of three equal scores has increasing ids
    for g in range(3):
        grp = i[0, 3 * g : 3 * g + 3]
        assert s[0, 3 * g] == s[0, 3 * g + 1] == s[0, 3 * g + 2]
        assert list(grp) == sorted(grp)
        assert len({int(x) % 3 for x in grp}) == 1  # copies of the same base document
    alive = np.ones(9, bool)
    alive[[0, 4, 8]] = False
    s2, i2 = ops.maxsim_search(q, qoff, d, off, k=9, alive=alive)
    assert not np.isin(i2, [0, 4, 8]).any()
    assert (i2[0, 6:] == -1).all()
    assert_search_close(s2, i2, q, qoff, d, off, alive)  # bound from the operands
    # uint8 mask is the same as bool
    s3, i3 = ops.maxsim_search(q, qoff, d, off, k=9, alive=alive.astype(np.uint8))
    np.testing.assert_array_equal(i3, i2)


@pytest.mark.usefixtures("each_isa")
def test_maxsim_duplicate_and_zero_vectors():
    rng = np.random.default_rng(3)
    v = rng.standard_normal((1, 24)).astype(np.float32)
    d = np.concatenate([np.repeat(v, 5, axis=0), np.zeros((3, 24), np.float32)])
    off = np.array([0, 5, 8])
    q = np.concatenate([v, -v, np.zeros((1, 24), np.float32)])
    got = ops.maxsim_scores(q, d, off)
    naive.assert_maxsim_close(got, q, d, off)  # bound from the operands (naive.maxsim_bound)


def test_maxsim_all_empty_and_no_queries():
    d = np.zeros((0, 16), np.float32)
    off = np.zeros(4, np.int64)
    q = np.ones((2, 16), np.float32)
    s, i = ops.maxsim_search(q, np.array([0, 2]), d, off, k=2)
    assert (i == -1).all() and np.isneginf(s).all()
    assert np.isneginf(ops.maxsim_scores(q, d, off)).all()
    d2, off2 = make_docs(np.random.default_rng(0), [2, 3], 16)
    s, i = ops.maxsim_search(np.zeros((0, 16), np.float32), np.array([0]), d2, off2, k=2)
    assert s.shape == (0, 2)


def test_maxsim_validation_errors():
    rng = np.random.default_rng(4)
    d, off = make_docs(rng, [2, 3], 16)
    q = rng.standard_normal((3, 16)).astype(np.float32)
    qoff = np.array([0, 3])
    with pytest.raises(ValueError, match="k=0"):
        ops.maxsim_search(q, qoff, d, off, 0)
    with pytest.raises(ValueError, match="dim=8"):
        ops.maxsim_search(q[:, :8], qoff, d, off, 1)
    with pytest.raises(ValueError, match="d_offsets"):
        ops.maxsim_search(q, qoff, d, np.array([0, 2, 4]), 1)
    bad = q.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ops.maxsim_search(bad, qoff, d, off, 1)
    with pytest.raises(ValueError, match="alive"):
        ops.maxsim_search(q, qoff, d, off, 1, alive=np.ones(3, bool))
    with pytest.raises(ValueError, match="cand_ids"):
        ops.maxsim_rerank(q, d, off, [0, 2])


def test_maxsim_float64_input_is_coerced():
    rng = np.random.default_rng(5)
    d, off = make_docs(rng, [3, 4], 16)
    q = rng.standard_normal((2, 16))
    got = ops.maxsim_scores(q, d.astype(np.float64), off.astype(np.int32))
    # the wrapper coerces to float32 first: the bound is that of the float32 operands
    naive.assert_maxsim_close(got, q.astype(np.float32), d, off)


# ---- centroid codes -----------------------------------------------------------------
def make_codes(rng, lengths, n_centroids):
    off = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=off[1:])
    dt = np.uint8 if n_centroids <= 256 else np.uint16
    return rng.integers(0, n_centroids, int(off[-1])).astype(dt), off


@pytest.mark.parametrize("n_centroids", [7, 256, 300])
@pytest.mark.parametrize("nq", [1, 5, 16, 32, 33, 70])
def test_code_scores_f32_and_u8_vs_naive(n_centroids, nq):
    rng = np.random.default_rng(n_centroids * 7 + nq)
    dim = 24
    cent = rng.standard_normal((n_centroids, dim)).astype(np.float32)
    q = rng.standard_normal((nq, dim)).astype(np.float32)
    codes, off = make_codes(rng, LENGTHS * 2, n_centroids)
    table = ops.code_table(cent, q)
    naive.assert_dot_close(table, cent, q)  # bound from the operands: any CPU's order
    got = ops.maxsim_code_scores(table, codes, off)
    ref = naive.code_scores(table, codes, off)
    assert got.dtype == np.float32 and np.array_equal(np.isinf(got), np.isinf(ref))
    fin = np.isfinite(ref)
    # max over table entries is exact; only the sum over n_q lanes rounds: gamma_{n_q}
    sum_err = naive.code_sum_bound(table, codes, off)
    naive.assert_within(got, ref, sum_err, "float32 code scores")
    # uint8 table: equal to its own naive reference, and within n_q * scale / 2 of float
    qt = ops.quantize_table(table)
    got8 = ops.maxsim_code_scores(qt, codes, off)
    ref8 = naive.code_scores_u8(qt.t8, qt.scale, qt.lo, codes, off)
    assert np.array_equal(np.isinf(got8), np.isinf(ref8))
    # integer sums are exact; float32(scale * sum + offset) rounds once (u = eps32 / 2)
    naive.assert_within(got8, ref8, 0.5 * naive.EPS32 * np.abs(ref8), "uint8 code scores")
    # quantisation (n_q * scale / 2), plus the rounding of both scores derived above
    rounding = 0.5 * naive.EPS32 * np.abs(ref8[fin]) + sum_err[fin]
    assert np.all(np.abs(got8[fin] - ref[fin]) <= nq * qt.scale / 2 * (1 + naive.EPS32) + rounding)
    # candidate subset with padding
    cand = np.array([5, -1, 0, 1, 5])
    sub = ops.maxsim_code_scores(table, codes, off, cand_ids=cand)
    np.testing.assert_array_equal(sub, np.where(cand >= 0, got[cand], -np.inf).astype(np.float32))


@pytest.mark.parametrize("quant", [False, True])
def test_code_search_vs_naive(quant):
    rng = np.random.default_rng(11)
    cent = rng.standard_normal((40, 16)).astype(np.float32)
    q = rng.standard_normal((9, 16)).astype(np.float32)
    codes, off = make_codes(rng, LENGTHS * 4, 40)
    table = ops.code_table(cent, q)
    t = ops.quantize_table(table) if quant else table
    scores = ops.maxsim_code_scores(t, codes, off)
    alive = rng.random(len(off) - 1) > 0.2
    for k in (1, 5, 200):
        s, i = ops.maxsim_code_search(t, codes, off, k, alive=alive)
        rs, ri = naive.topk(scores.astype(np.float64), k, alive)
        # same per-document kernel as maxsim_code_scores, same order: equal bit for bit
        np.testing.assert_array_equal(s, rs.astype(np.float32))
        np.testing.assert_array_equal(i, ri)
        assert not np.isin(i, np.flatnonzero(~alive)).any()


def test_code_validation():
    codes = np.array([0, 1, 9], np.uint8)
    off = np.array([0, 3])
    with pytest.raises(ValueError, match="K=4"):
        ops.maxsim_code_scores(np.zeros((4, 2), np.float32), codes, off)
    with pytest.raises(ValueError, match="offsets"):
        ops.maxsim_code_scores(np.zeros((10, 2), np.float32), codes, np.array([0, 2]))


# ---- the score table (both variants; the int8 kernels) ---------------------------------
def _isa_code(name):
    from retrieval_prune.kernels import simd

    return simd.ISA_AVX2 if name == "avx2" else simd.ISA_AVX512


# K: partial blocks of 2, 3, 4, 6 and 8 rows and a chunked table (K >= 512)
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dim", [8, 24, 128, 384])
@pytest.mark.parametrize("k", [1, 5, 7, 13, 515])
def test_score_table_f32_both_variants(isa, dim, k):
    from retrieval_prune.kernels.codes import centroid_table_kernel
    from retrieval_prune.kernels.ops import _pack

    rng = np.random.default_rng(dim * 1000 + k)
    c = rng.standard_normal((k, dim)).astype(np.float32)
    for n_q in (1, 16, 17, 48):
        q = rng.standard_normal((n_q, dim)).astype(np.float32)
        qp = _pack(q, np.array([0, n_q], np.int64))[0]
        nv = -(-n_q // 16)
        out = np.full((k, nv * 16), np.nan, np.float32)
        centroid_table_kernel(qp, nv, dim, c.reshape(-1), k, out.reshape(-1), _isa_code(isa))
        naive.assert_dot_close(out[:, :n_q], c, q)  # tolerance from the operands
        assert np.all(out[:, n_q:] == 0)  # padding lanes are zero


def _int8_inputs(rng, n_q, k, dim):
    from retrieval_prune.compress.kmeans import _quantize_int8
    from retrieval_prune.kernels import codes as ck
    from retrieval_prune.kernels.ops import _pack

    q = rng.standard_normal((n_q, dim)).astype(np.float32)
    c8, scale = _quantize_int8(rng.standard_normal((k, dim)).astype(np.float32))
    c8[0, : min(3, dim)] = -128  # not made by _quantize_int8, but a valid int8 codebook
    qp = _pack(q, np.array([0, n_q], np.int64))[0]
    nv = -(-n_q // 16)
    q8f, qs = np.empty_like(qp), np.empty(nv * 16, np.float32)
    ck.quantize_query_i8(qp, nv, dim, q8f, np.empty(0, np.uint8), qs)
    return qp, nv, c8, scale, q8f, qs


@pytest.mark.parametrize("dim", [2, 6, 24, 128, 130, 384])
@pytest.mark.parametrize("k", [1, 3, 65, 515])
def test_int8_table_kernels_agree_bit_for_bit(dim, k):
    """The int8 table's integer dot products are exact in every kernel, so the portable
    kernel (both variants), the AVX2 ``vpmaddwd`` kernel (where the host has AVX2) and the
    dispatching wrapper give the same float32 table, equal to NumPy's integer products
    scaled the same way."""
    from retrieval_prune.kernels import codes as ck
    from retrieval_prune.kernels.simd import HAS_AVX2

    rng = np.random.default_rng(dim * 7 + k)
    for n_q in (1, 16, 17, 48):
        qp, nv, c8, scale, q8f, qs = _int8_inputs(rng, n_q, k, dim)
        tables = []
        for isa in ISAS:
            t = np.full((k, nv * 16), np.nan, np.float32)
            ck.centroid_table_i8_kernel(q8f, nv, dim, c8.reshape(-1), qs, scale, k,
                                        t.reshape(-1), _isa_code(isa))  # fmt: skip
            tables.append(t)
        np.testing.assert_array_equal(tables[0], tables[1])
        # exact integer dots (< 2**24); (qs * scale) and the product round once each
        q8 = q8f.reshape(nv, dim, 16).transpose(0, 2, 1).reshape(nv * 16, dim)[:n_q]
        dots = c8.astype(np.int64) @ q8.astype(np.int64).T
        want = dots.astype(np.float32) * (qs[None, :n_q] * scale[:, None])
        np.testing.assert_allclose(tables[0][:, :n_q], want, rtol=2 * naive.EPS32, atol=0)
        assert np.all(tables[0][:, n_q:] == 0)
        corr = (-128 * c8.astype(np.int32).sum(axis=1)).astype(np.int32)
        for isa in ISAS:
            got = np.full_like(tables[0], np.nan)
            ck.centroid_table_i8(qp, nv, dim, c8.reshape(-1), corr, scale, k, got.reshape(-1),
                                 _isa_code(isa))  # fmt: skip
            np.testing.assert_array_equal(got, tables[0])
        if not HAS_AVX2:
            continue
        got = np.full_like(tables[0], np.nan)
        ck.centroid_table_i8_avx2_kernel(ck._pairs16(q8f, nv, dim), nv, dim, c8.reshape(-1),
                                         qs, scale, k, got.reshape(-1))  # fmt: skip
        np.testing.assert_array_equal(got, tables[0])


def test_int8_table_path_follows_the_host():
    from retrieval_prune.kernels import codes as ck
    from retrieval_prune.kernels.simd import HAS_AVX2, HAS_VNNI

    for dim in (24, 128, 384):
        want = "vnni" if HAS_VNNI else ("avx2" if HAS_AVX2 else "portable")
        assert ck.int8_table_path(dim) == want
        # the AVX2 variant never takes the AVX-512 VNNI kernel
        assert ck.int8_table_path(dim, _isa_code("avx2")) == ("avx2" if HAS_AVX2 else "portable")
    assert ck.int8_table_path(7) == "portable"  # odd dims: no int16 pairs


def test_isa_variant_switch_and_errors():
    before = ops.current_isa()
    with ops.isa_variant("avx512"):
        assert ops.current_isa() == "avx512"
        with ops.isa_variant("avx2"):
            assert ops.current_isa() == "avx2"
        assert ops.current_isa() == "avx512"
    assert ops.current_isa() == before
    with pytest.raises(ValueError, match="avx2"):
        with ops.isa_variant("sse"):
            pass


# ---- residuals ------------------------------------------------------------------------
@pytest.mark.usefixtures("each_isa")
@pytest.mark.parametrize("nbits", [1, 2, 4])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dim", [32, 24])  # 16-lane decode, and the per-byte one (24 % 16)
def test_residual_decode_and_rerank_vs_naive(nbits, normalize, dim):
    rng = np.random.default_rng(nbits * 10 + normalize + dim)
    K = 16
    cent = rng.standard_normal((K, dim)).astype(np.float32)
    bv = np.sort(rng.standard_normal(1 << nbits)).astype(np.float32) * 0.1
    lengths = LENGTHS
    off = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=off[1:])
    n = int(off[-1])
    codes = rng.integers(0, K, n).astype(np.uint8)
    packed = rng.integers(0, 256, (n, dim * nbits // 8)).astype(np.uint8)
    dec = ops.residual_decode(codes, packed, cent, bv, nbits, normalize=normalize)
    ref = naive.residual_decode(codes, packed, cent, bv, nbits, normalize=normalize)
    # centroid + bucket value rounds once (u = eps32 / 2); normalising adds the float32
    # sum of dim squares (gamma_dim, halved by the sqrt), sqrt, divide and multiply, with
    # slack for a reciprocal-sqrt estimate under fastmath: (dim + 4) * eps32 relative
    rel = (dim + 4) * naive.EPS32 if normalize else 0.5 * naive.EPS32
    naive.assert_within(dec, ref, rel * np.abs(ref) + naive.TINY32, "decoded residuals")
    q = rng.standard_normal((5, dim)).astype(np.float32)
    cand = np.array([3, 0, -1, 15, 8, 1])
    got = ops.maxsim_residual_rerank(q, codes, packed, off, cent, bv, nbits, cand, normalize)
    full = naive.maxsim_scores(q, ref, off)
    exp = np.where(cand >= 0, full[cand], -np.inf)
    # per dot product (1.5 dim + 4) u covers the dot (gamma_dim), the decode's rounding and
    # the inverse norm; (dim + 2) * eps32 = (2 dim + 4) u, the default of naive.maxsim_bound
    bound = naive.maxsim_bound(q, ref, off)
    naive.assert_within(got, exp, np.where(cand >= 0, bound[cand], 0.0), "residual rerank")
    # all documents when cand_ids is None
    allv = ops.maxsim_residual_rerank(q, codes, packed, off, cent, bv, nbits, None, normalize)
    assert allv.shape == (len(lengths),)


@pytest.mark.parametrize("nbits", [1, 2, 4])
@pytest.mark.parametrize("dim", [32, 24])
def test_rerank_from_int8_codebook_equals_dequantised(nbits, dim):
    """The rerank kernel decoding int8 codebook rows (times their scale) scores exactly as
    it does on the dequantised float32 codebook."""
    from retrieval_prune.compress.kmeans import _dequantize_int8, _quantize_int8
    from retrieval_prune.kernels.codes import residual_rerank_kernel
    from retrieval_prune.kernels.ops import _pack

    rng = np.random.default_rng(nbits + dim)
    c8, scale = _quantize_int8(rng.standard_normal((16, dim)).astype(np.float32))
    cent = _dequantize_int8(c8, scale)
    per = 8 // nbits
    bv = np.sort(rng.standard_normal(1 << nbits)).astype(np.float32) * 0.1
    lut = np.ascontiguousarray(bv[np.arange(256)[:, None] >> (np.arange(per) * nbits) & ((1 << nbits) - 1)])
    off = np.zeros(len(LENGTHS) + 1, np.int64)
    np.cumsum(LENGTHS, out=off[1:])
    n = int(off[-1])
    codes = rng.integers(0, 16, n).astype(np.uint8)
    packed = rng.integers(0, 256, (n, dim * nbits // 8)).astype(np.uint8)
    q = rng.standard_normal((20, dim)).astype(np.float32)
    qp = _pack(q, np.array([0, 20], np.int64))[0]
    ids = np.arange(len(LENGTHS), dtype=np.int64)
    max_len = int(max(LENGTHS))
    outs = []
    for src, sc, use in ((cent.reshape(-1), np.zeros(0, np.float32), False), (c8.reshape(-1), scale, True)):
        out = np.empty(ids.size, np.float32)
        residual_rerank_kernel(qp, 2, 20, codes, packed, src, sc, use, dim, lut, per, True, off, ids,
                               max_len, out)  # fmt: skip
        outs.append(out)
    np.testing.assert_array_equal(outs[0], outs[1])
    # as in test_residual_decode_and_rerank_vs_naive: naive.maxsim_bound's default covers
    # the dot, the decode's rounding and the inverse norm
    got = np.where(np.diff(off) > 0, outs[1], -np.inf)  # the raw kernel writes -FLT_MAX there
    naive.assert_maxsim_close(got, q, naive.residual_decode(codes, packed, cent, bv, nbits, normalize=True), off)


def test_residual_validation():
    cent = np.zeros((4, 16), np.float32)
    with pytest.raises(ValueError, match="nbits=3"):
        ops.residual_decode(np.zeros(1, np.uint8), np.zeros((1, 6), np.uint8), cent, np.zeros(8), 3)
    with pytest.raises(ValueError, match="bucket_values"):
        ops.residual_decode(np.zeros(1, np.uint8), np.zeros((1, 4), np.uint8), cent, np.zeros(3), 2)
    with pytest.raises(ValueError, match="packed"):
        ops.residual_decode(np.zeros(1, np.uint8), np.zeros((1, 5), np.uint8), cent, np.zeros(4), 2)


# ---- sign bits ------------------------------------------------------------------------
@pytest.mark.usefixtures("each_isa")
@pytest.mark.parametrize("dim", [64, 128, 384, 72])
@pytest.mark.parametrize("nq", [1, 5, 32, 33])
def test_maxsim_binary_and_hamming_vs_naive(dim, nq):
    rng = np.random.default_rng(dim + nq)
    x, off = make_docs(rng, LENGTHS, dim)
    x[3] = x[2]  # duplicate vectors
    bits = ops.sign_bits(x)
    assert np.array_equal(bits, np.packbits(x > 0, axis=1, bitorder="little"))
    q = rng.standard_normal((nq, dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    # asymmetric, within the documented int16-table error bound
    lut = ops.binary_lut(q)
    got = ops.maxsim_binary(lut, bits, off)
    ref = naive.maxsim_binary(q, bits, off)
    assert np.array_equal(np.isinf(got), np.isinf(ref))
    fin = np.isfinite(ref)
    # int16 table rounding (n_q * n_bytes * scale / 2; integer sums exact), plus the one
    # rounding of float32(scale * sum) (u = eps32 / 2)
    bound = nq * lut.lut.shape[1] * lut.scale / 2 * (1 + naive.EPS32) + 0.5 * naive.EPS32 * np.abs(ref[fin])
    assert np.all(np.abs(got[fin] - ref[fin]) <= bound)
    np.testing.assert_array_equal(ops.maxsim_binary(q, bits, off), got)
    # bits vs bits: exact integers
    planar = ops.to_planar(bits, off, dim)
    assert planar.words.shape[1] % 8 == 0
    h = ops.maxsim_hamming(q, planar)
    href = naive.maxsim_hamming(q, bits, off, dim)
    assert np.array_equal(np.isinf(h), np.isinf(href))
    np.testing.assert_array_equal(h[fin], href[fin].astype(np.float32))
    # query given as canonical bits gives the same scores
    np.testing.assert_array_equal(ops.maxsim_hamming(ops.sign_bits(q), planar), h)
    cand = np.array([4, -1, 0, 1])
    np.testing.assert_array_equal(
        ops.maxsim_hamming(q, planar, cand), np.where(cand >= 0, h[cand], -np.inf)
    )
    np.testing.assert_array_equal(
        ops.maxsim_binary(lut, bits, off, cand), np.where(cand >= 0, got[cand], -np.inf)
    )


def test_popcount_intrinsic():
    from numba import njit

    from retrieval_prune.kernels.simd import popcount

    @njit
    def pc(x):
        return popcount(x)

    for v in (0, 1, 255, 2**63, 2**64 - 1, 0x5555):
        assert pc(np.uint64(v)) == bin(v).count("1")
    assert pc(np.uint8(7)) == 3


@pytest.mark.parametrize("n", [1, 7, 300, 5000])
@pytest.mark.usefixtures("each_isa")
def test_hamming_scan_128_vs_naive(n):
    rng = np.random.default_rng(n)
    codes = rng.integers(0, 256, (n, 16)).astype(np.uint8)
    codes[n // 2] = codes[0]  # duplicates -> ties
    q = np.concatenate([codes[:1], rng.integers(0, 256, (2, 16)).astype(np.uint8)])
    for k in (1, 10, n + 3):
        dist, ids = ops.hamming_scan_128(q, codes, k)
        rd, ri = naive.hamming_topk(q, codes, k)
        assert dist.dtype == np.int32 and ids.dtype == np.int64
        np.testing.assert_array_equal(dist, rd)
        np.testing.assert_array_equal(ids, ri)
        # one query at a time (the AVX2 variant has its own single-query loop)
        for r in range(q.shape[0]):
            dist, ids = ops.hamming_scan_128(q[r], codes, k)
            np.testing.assert_array_equal(dist, rd[r : r + 1])
            np.testing.assert_array_equal(ids, ri[r : r + 1])
    # codes starting 16/32/48 bytes past a 64-byte boundary (the kernel peels to alignment)
    words = codes.view("<u8")
    for shift in range(4):
        buf = np.zeros(2 * n + 8 + 8, np.uint64)
        base = (-(buf.ctypes.data // 8)) % 8 + 2 * shift
        moved = buf[base : base + 2 * n].reshape(n, 2)
        moved[...] = words
        dist, ids = ops.hamming_scan_128(q, moved, 7)
        rd, ri = naive.hamming_topk(q, codes, 7)
        np.testing.assert_array_equal(dist, rd)
        np.testing.assert_array_equal(ids, ri)
        dist, ids = ops.hamming_scan_128(q[1], moved, 7)
        np.testing.assert_array_equal(dist, rd[1:2])
        np.testing.assert_array_equal(ids, ri[1:2])
    # uint64 words and a single 1-D query give the same answer
    d1, i1 = ops.hamming_scan_128(q[0].view("<u8"), codes.view("<u8"), 5)
    d2, i2 = ops.hamming_scan_128(q[:1], codes, 5)
    np.testing.assert_array_equal(d1, d2)
    np.testing.assert_array_equal(i1, i2)


@pytest.mark.slow
def test_bench_kernels_json_shape():
    from retrieval_prune.evaluation import bench_kernels
    from retrieval_prune.kernels.simd import HAS_AVX2, HAS_VNNI, ISA_NAME

    names = ["maxsim_f32", "score_table_f32", "score_table_i8", "score_table_i8_d384"]
    res = bench_kernels.run(threads=(1,), n_docs=64, progress=False, kernels=names)
    assert set(res) == {"machine", "roofs", "kernels"}
    roofs = {"sgemm_gflops", "read_gbps"} | ({"vnni_gops"} if HAS_VNNI else set())
    roofs |= {"avx2_i8_gops", "avx2_i16_gops"} if HAS_AVX2 else set()
    assert set(res["roofs"]["1"]) == roofs
    # the CPU's features and the variant the run measured are recorded
    kern = res["machine"]["kernels"]
    assert kern["isa"] == ISA_NAME
    assert {"avx2", "fma", "avx512f", "avx512vnni"} <= set(kern["flags"])
    assert "cpu_model" in res["machine"]
    for name, unit in zip(names, ["GFLOP/s", "GFLOP/s", "GOP/s", "GOP/s"], strict=True):
        row = res["kernels"][name]["1"]
        assert set(row) == {"throughput", "unit", "ratio_to_roof"} and row["unit"] == unit
        assert row["throughput"] > 0 and row["ratio_to_roof"] > 0
    assert "OPENBLAS_CORETYPE" in res["machine"]
    with pytest.raises(ValueError, match="unknown kernels"):
        bench_kernels.run(threads=(1,), kernels=["nope"], progress=False)
