"""Kernels against the naive references in tests/naive.py (small seeded synthetic data)."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval_prune.index import ops
from tests import naive


def make_docs(rng, lengths, dim, normalise=True):
    """Synthetic CSR documents with the given token counts."""
    off = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=off[1:])
    x = rng.standard_normal((int(off[-1]), dim)).astype(np.float32)
    if normalise and x.size:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, off


def assert_topk_matches(scores, ids, ref_scores, ref_ids, rtol=1e-5, atol=1e-5):
    """Equal score lists; ids may differ only where reference scores are (near) tied."""
    np.testing.assert_allclose(scores, ref_scores, rtol=rtol, atol=atol)
    for r in range(ids.shape[0]):
        for c in range(ids.shape[1]):
            if ids[r, c] != ref_ids[r, c]:
                near = np.abs(ref_scores[r] - ref_scores[r, c]) <= atol + rtol * abs(
                    ref_scores[r, c]
                )
                assert ids[r, c] in set(ref_ids[r][near].tolist()), (r, c, ids[r], ref_ids[r])


# awkward document lengths: empty, one token, a partial block of 4, long ones
LENGTHS = [0, 1, 2, 3, 5, 7, 8, 9, 0, 16, 17, 31, 33, 1, 4, 64]


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
    fin = np.isfinite(ref)
    np.testing.assert_allclose(got[fin], ref[fin], rtol=1e-5, atol=1e-4)
    # rerank on a candidate subset (with padding) gives the same numbers
    cand = np.array([3, -1, 0, 15, 3, 8], np.int64)
    rr = ops.maxsim_rerank(q, d, off, cand)
    exp = np.where(cand >= 0, got[cand], -np.inf).astype(np.float32)
    np.testing.assert_array_equal(rr, exp)


@pytest.mark.parametrize("dim", [16, 128, 384])
def test_maxsim_search_vs_naive(dim):
    rng = np.random.default_rng(dim)
    d, off = make_docs(rng, LENGTHS * 3, dim)
    qlens = [1, 5, 32, 33, 0, 17]
    q, qoff = make_docs(rng, qlens, dim)
    for k in (1, 3, 10, 100):
        s, i = ops.maxsim_search(q, qoff, d, off, k)
        rs, ri = naive.maxsim_search(q, qoff, d, off, k)
        assert s.shape == (len(qlens), k) and s.dtype == np.float32 and i.dtype == np.int64
        assert_topk_matches(s, i, rs, ri)
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
    rs, ri = naive.maxsim_search(q, qoff, d, off, 9, alive=alive)
    assert_topk_matches(s2, i2, rs, ri)
    # uint8 mask is the same as bool
    s3, i3 = ops.maxsim_search(q, qoff, d, off, k=9, alive=alive.astype(np.uint8))
    np.testing.assert_array_equal(i3, i2)


def test_maxsim_duplicate_and_zero_vectors():
    rng = np.random.default_rng(3)
    v = rng.standard_normal((1, 24)).astype(np.float32)
    d = np.concatenate([np.repeat(v, 5, axis=0), np.zeros((3, 24), np.float32)])
    off = np.array([0, 5, 8])
    q = np.concatenate([v, -v, np.zeros((1, 24), np.float32)])
    got = ops.maxsim_scores(q, d, off)
    np.testing.assert_allclose(got, naive.maxsim_scores(q, d, off), rtol=1e-5, atol=1e-5)


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
    np.testing.assert_allclose(got, naive.maxsim_scores(q, d, off), rtol=1e-5, atol=1e-5)
