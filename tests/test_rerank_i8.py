"""rerank=int8: residual candidates decoded into int8 rows and scored with the int8 table
product, against NumPy (decoded rows), against exact MaxSim within the rounding the two
per-token quantisations allow, on every int8 table path, and as a search parameter."""

import numpy as np
import pytest

from retrieval_prune.index.base import load_index
from retrieval_prune.kernels import codes as C
from retrieval_prune.kernels import rerank as R
from retrieval_prune.pipeline import make_pipeline
from tests import naive
from tests.test_ivf import ALL, clustered_docs

SPECS = [
    f"residual:k=32,nbits=2,centroid_bits=8,normalize=true | ivf:nprobe=32,{ALL},rerank=int8",
    f"residual:k=32,nbits=1 | ivf:nprobe=32,{ALL},rerank=int8",
    f"residual:k=32,nbits=4,normalize=false | ivf:nprobe=32,{ALL},rerank=int8",
]


@pytest.fixture(scope="module")
def data():
    docs = clustered_docs(dim=32)
    queries = clustered_docs(12, dim=32, seed=9, empty=())
    return docs, [f"d{i}" for i in range(len(docs))], queries


def quant_bound(q, dec, off):
    """Per-document bound on |int8 MaxSim - exact MaxSim|: each coordinate of a query token
    and of a document token moves by at most half its step (its largest |coordinate| / 127),
    so <q_i, d_j> moves by at most |q_i|_1 s_j / 2 + |d_j|_1 s_i / 2 + dim s_i s_j / 4; a max
    moves by at most the largest of its entries' moves, a sum by the sum. Plus float32
    rounding of the scaling and the sum (naive.maxsim_bound), and 1 % for the float32
    arithmetic of the steps themselves."""
    q64, d64 = np.asarray(q, np.float64), np.asarray(dec, np.float64)
    sq, sd = np.abs(q64).max(axis=1) / 127, np.abs(d64).max(axis=1) / 127
    e = (np.abs(q64).sum(axis=1)[:, None] * sd[None, :] / 2
         + sq[:, None] * np.abs(d64).sum(axis=1)[None, :] / 2
         + q64.shape[1] * sq[:, None] * sd[None, :] / 4)  # fmt: skip
    per_doc = np.array([
        e[:, off[i] : off[i + 1]].max(axis=1).sum() if off[i + 1] > off[i] else 0.0
        for i in range(len(off) - 1)
    ])  # fmt: skip
    return 1.01 * per_doc + naive.maxsim_bound(q, dec, off)


@pytest.mark.parametrize("spec", SPECS)
def test_int8_rerank_within_the_quantisation_bound_of_exact_maxsim(data, spec):
    docs, ids, queries = data
    index = make_pipeline(spec).build(docs, ids)
    assert index.rerank == "int8"
    qt = index.chain.transform(queries.embeddings)
    dec, off = index.decode_documents(), np.asarray(index._offsets)
    res = index.search(queries, k=15)
    for r in range(len(queries)):
        qq = qt[queries.offsets[r] : queries.offsets[r + 1]]
        exact = naive.maxsim_scores(qq, dec, off)
        naive.assert_topk_close(res.scores[r], res.ids[r], exact, quant_bound(qq, dec, off))
    # the float32 rerank of the same index is untouched by the parameter
    float_res = index.configure(rerank="float32").search(queries, k=15)
    ref = make_pipeline(spec.replace(",rerank=int8", "")).build(docs, ids).search(queries, k=15)
    np.testing.assert_array_equal(float_res.ids, ref.ids)
    np.testing.assert_array_equal(float_res.scores, ref.scores)


def test_decoded_int8_rows_match_numpy(data):
    docs, ids, _ = data
    index = make_pipeline(SPECS[0]).build(docs, ids)
    cache = index._prepare()
    dec, off = index.decode_documents(), np.asarray(index._offsets)
    cand = np.array([3, 0, 7, 250, 3], np.int64)  # any order, repeats, an empty document (7)
    row_off = np.zeros(cand.size + 1, np.int64)
    np.cumsum(off[cand + 1] - off[cand], out=row_off[1:])
    n = int(row_off[-1])
    r8, rs, corr = np.empty(n * dec.shape[1], np.int8), np.empty(n, np.float32), np.empty(n, np.int32)
    packed = cache["packed"]
    R.decode_rows_i8_kernel(
        cache["codes"], packed.reshape(-1), packed.shape[1], cache["codebook"],
        cache["codebook_scale"], True, dec.shape[1], cache["lut"], cache["per"],
        bool(index.storage_codec.normalize), off, cand, row_off, r8, rs, corr,
    )  # fmt: skip
    r8 = r8.reshape(n, dec.shape[1])
    want = np.concatenate([dec[off[d] : off[d + 1]] for d in cand])
    step = np.abs(want).max(axis=1) / 127
    got = r8.astype(np.float64) * rs[:, None]
    # half a step of rounding, plus float32 decoding differences (far below a step)
    assert np.all(np.abs(got - want) <= 0.5 * step[:, None] * 1.01 + 1e-6)
    assert np.all(np.abs(r8).max(axis=1) == 127)  # the step is set by the largest coordinate
    np.testing.assert_array_equal(corr, -128 * r8.astype(np.int32).sum(axis=1))


def test_segment_maxsum_matches_numpy():
    rng = np.random.default_rng(0)
    W, nq = 32, 23
    t = rng.standard_normal((40, W)).astype(np.float32)
    row_off = np.array([0, 5, 5, 6, 40], np.int64)
    out = np.empty(4, np.float32)
    R.segment_maxsum_kernel(t.reshape(-1), W, nq, row_off, out)
    for r in (0, 2, 3):
        m = t[row_off[r] : row_off[r + 1], :nq].max(axis=0).astype(np.float64)
        # max is exact; the float32 sum of nq terms rounds (any order)
        assert abs(out[r] - m.sum()) <= (nq + 2) * naive.EPS32 * np.abs(m).sum()
    assert out[1] == np.float32(-3.4028234663852886e38)


def test_same_scores_on_every_int8_table_path(data, monkeypatch):
    """Integer products are exact: the portable, AVX2 and VNNI table kernels give one table,
    so the int8 rerank ranks alike on every CPU."""
    docs, ids, queries = data
    index = make_pipeline(SPECS[0]).build(docs, ids)
    ref = index.search(queries, k=10)
    monkeypatch.setattr(C, "int8_table_path", lambda dim, isa=None: "portable")
    index._cache = None
    got = index.search(queries, k=10)
    np.testing.assert_array_equal(got.ids, ref.ids)
    np.testing.assert_array_equal(got.scores, ref.scores)


def test_rerank_is_a_search_parameter_that_round_trips(data, tmp_path):
    docs, ids, queries = data
    index = make_pipeline(SPECS[0]).build(docs, ids)
    assert "rerank=int8" in index.spec
    want = index.search(queries, k=10)
    index.save(tmp_path / "ix")
    back = load_index(tmp_path / "ix")
    assert back.rerank == "int8"
    got = back.search(queries, k=10)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.scores, want.scores)
    assert "rerank" not in make_pipeline("residual:nbits=2 | ivf").index.spec  # unset: float32
    with pytest.raises(ValueError, match="rerank"):
        make_pipeline("residual | ivf:rerank=int4")
