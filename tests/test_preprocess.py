"""Plug-in specific checks for the token preprocessors (synthetic, seeded data).

The shared contract (budgets, identity, protection, determinism...) is in
``test_plugin_contract.py``; here: each plug-in against a slow, obviously-correct NumPy
reference or data with a known answer, and the error messages.
"""

from __future__ import annotations

import doctest
import warnings

import numpy as np
import pytest

from retrieval_prune import registry
from retrieval_prune.kernels import tokens as K
from retrieval_prune.pipeline import make_pipeline
from retrieval_prune.preprocess import base as pre_base
from retrieval_prune.preprocess.tokens import attention, crisp, merge, pool
from retrieval_prune.types import MultiVectors


def unit(x):
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.where(n > 0, x / np.where(n > 0, n, 1), 0).astype(np.float32)


def clustered_doc(rng, n_centers, per, dim=32, noise=0.02):
    """A synthetic document: ``per`` noisy copies of each of ``n_centers`` directions."""
    centers = unit(rng.standard_normal((n_centers, dim)))
    x = np.repeat(centers, per, axis=0) + noise * rng.standard_normal((n_centers * per, dim))
    x = unit(x)[rng.permutation(n_centers * per)]
    return centers, x


def partition(labels):
    """Canonical form of a clustering: sorted tuple of member tuples."""
    groups = {}
    for t, lab in enumerate(labels):
        groups.setdefault(int(lab), []).append(t)
    return sorted(tuple(g) for g in groups.values())


def assert_recovers(centers, out_vectors):
    cos = unit(out_vectors) @ centers.T
    assert cos.shape[0] == centers.shape[0]
    assert np.all(cos.max(axis=1) > 0.99)
    assert sorted(cos.argmax(axis=1)) == list(range(centers.shape[0]))


# -- pool -------------------------------------------------------------------------------
def test_pool_recovers_known_clusters():
    rng = np.random.default_rng(0)
    centers, x = clustered_doc(rng, 6, 3)
    cls_tok = rng.standard_normal((1, 32)).astype(np.float32)
    docs = MultiVectors.from_list([np.vstack([cls_tok, x])])
    out = registry.build("pool:factor=3").transform(docs)
    assert out.n_tokens == 1 + 6
    assert np.array_equal(out.embeddings[0], cls_tok[0])
    assert_recovers(centers, out.embeddings[1:])
    assert np.allclose(np.linalg.norm(out.embeddings[1:], axis=1), 1, atol=1e-5)


def test_pool_matches_scipy_ward():
    hierarchy = pytest.importorskip("scipy.cluster.hierarchy")
    rng = np.random.default_rng(1)
    for n in [2, 3, 7, 20, 57]:
        x = rng.standard_normal((n, 24)).astype(np.float32)
        u = unit(x)
        z = hierarchy.linkage(u.astype(np.float64), method="ward")
        ma, mb, mh = K.ward_tree(K._sq_dists(K._unit_rows(x)))
        np.testing.assert_allclose(np.sort(mh), z[:, 2] ** 2, rtol=1e-4, atol=1e-5)
        for c in sorted({1, max(1, n // 2), max(1, n // 3), n - 1}):
            raw = np.empty(n, np.int64)
            K.ward_labels(x, np.array([0, n]), np.zeros(1, np.int64), np.array([c]), raw)
            ref = hierarchy.fcluster(z, t=c, criterion="maxclust")
            assert partition(raw) == partition(ref), (n, c)


def test_pool_mean_weights_and_normalize():
    x = np.array([[1, 0], [0, 1], [0, 1], [1, 0]], np.float32)
    w = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    docs = MultiVectors(x, np.array([0, 4]), w)
    out = registry.build("pool:factor=2,protect=0,normalize=false").transform(docs)
    assert np.array_equal(out.embeddings, [[1, 0], [0, 1]])  # first appearance order
    np.testing.assert_allclose(out.weights, [0.5, 0.5])  # weights summed
    y = np.array([[1, 0], [0.6, 0.8]], np.float32)
    raw = registry.build("pool:factor=2,protect=0,normalize=false").transform(
        MultiVectors(y, np.array([0, 2]))
    )
    np.testing.assert_allclose(raw.embeddings, [[0.8, 0.4]])
    normed = registry.build("pool:factor=2,protect=0").transform(MultiVectors(y, np.array([0, 2])))
    np.testing.assert_allclose(normed.embeddings, unit(np.array([[0.8, 0.4]])), rtol=1e-6)


# -- attn_prune -------------------------------------------------------------------------
def test_attn_prune_keeps_the_top_weights():
    rng = np.random.default_rng(2)
    lens = [1, 2, 5, 9, 33]
    docs = MultiVectors.from_list(
        [rng.standard_normal((n, 8)).astype(np.float32) for n in lens],
        weights=[rng.permutation(n).astype(np.float32) for n in lens],
    )
    for keep in [0.2, 0.4, 0.6, 0.8]:
        out = registry.build(f"attn_prune:keep={keep}").transform(docs)
        for i, n in enumerate(lens):
            w = docs.doc_weights(i)
            m = n - 1
            k = int(np.ceil(round(keep * m, 9)))
            kept = np.sort(np.concatenate([[0], 1 + np.argsort(-w[1:], kind="stable")[:k]]))
            assert np.array_equal(out.doc(i), docs.doc(i)[kept])
            assert np.array_equal(out.doc_weights(i), w[kept])


def test_attn_prune_budget_is_ceil_without_float_noise():
    # 0.6 * 5 = 3.0000000000000004 in floating point: the budget must be 3, not 4
    assert pre_base.frac_count(0.6, 5) == 3
    assert pre_base.frac_count(0.4, 5) == 2 and pre_base.frac_count(0.41, 5) == 3
    x = np.eye(6, dtype=np.float32)
    docs = MultiVectors(x, np.array([0, 6]), np.arange(6, dtype=np.float32))
    assert registry.build("attn_prune:keep=0.6").transform(docs).n_tokens == 1 + 3


def test_attn_prune_adaptive_threshold():
    rng = np.random.default_rng(3)
    lens = [4, 10, 40]
    docs = MultiVectors.from_list(
        [rng.standard_normal((n, 8)).astype(np.float32) for n in lens],
        weights=[rng.random(n).astype(np.float32) for n in lens],
    )
    for k in [-0.5, 0.0, 0.5, 1.0]:
        out = registry.build(f"attn_prune:mode=adaptive,std={k}").transform(docs)
        for i in range(len(lens)):
            w = docs.doc_weights(i).astype(np.float64)
            rest = w[1:]
            keep = np.concatenate([[True], rest >= rest.mean() + k * rest.std()])
            assert np.array_equal(out.doc(i), docs.doc(i)[keep]), (k, i)


def test_attn_prune_needs_importance_and_leaves_queries():
    docs = MultiVectors(np.eye(4, dtype=np.float32), np.array([0, 4]))
    step = registry.build("attn_prune")
    with pytest.raises(
        ValueError, match="build with importance: the encoder must return attention"
    ):
        step.transform(docs)
    assert step.transform(docs, kind="queries") is docs
    assert make_pipeline("attn_prune:keep=0.6").needs_importance
    assert not make_pipeline("pool:factor=2").needs_importance


def test_attn_prune_never_empties_and_warns_once_with_count():
    x = np.eye(4, dtype=np.float32)
    w = np.array([0.1, 0.9, 0.3, 0.7], np.float32)
    docs = MultiVectors(x, np.array([0, 2, 2, 4]), w)
    with pytest.warns(RuntimeWarning, match="2 of 2 non-empty documents") as rec:
        out = registry.build("attn_prune:keep=0,protect=0").transform(docs)
    assert len(rec) == 1
    assert out.lengths.tolist() == [1, 0, 1]
    assert np.array_equal(out.weights, w[[1, 3]])  # the most important token of each


# -- merge ------------------------------------------------------------------------------
def naive_merge(x, target, threshold):
    """Greedy agglomeration on cosine of group sums; returns per-token group labels."""
    groups = [[t] for t in range(len(x))]
    while len(groups) > target:
        sums = np.array([x[g].astype(np.float64).sum(axis=0) for g in groups])
        u = unit(sums.astype(np.float32))
        sim = u @ u.T
        np.fill_diagonal(sim, -np.inf)
        a, b = np.unravel_index(np.argmax(sim), sim.shape)
        if sim[a, b] < threshold:
            break
        a, b = min(a, b), max(a, b)
        groups[a] = groups[a] + groups[b]
        del groups[b]
    labels = np.empty(len(x), np.int64)
    for gi, g in enumerate(groups):
        labels[g] = gi
    return labels


def test_merge_matches_naive_greedy():
    rng = np.random.default_rng(4)
    for n, keep, thr in [(6, 0.5, None), (15, 0.3, None), (25, 0.0, 0.6), (30, 0.2, 0.3)]:
        _, x = clustered_doc(rng, 5, n // 5 + 1, dim=16, noise=0.4)
        x = x[:n]
        spec = f"merge:keep={keep},protect=0" + ("" if thr is None else f",threshold={thr}")
        step = registry.build(spec)
        raw = np.empty(n, np.int64)
        target = step._targets(np.array([n]))
        K.merge_labels(
            x, np.array([0, n]), np.zeros(1, np.int64), target, -2.0 if thr is None else thr, raw
        )
        ref = naive_merge(x, int(target[0]), -2.0 if thr is None else thr)
        assert partition(raw) == partition(ref), spec


def test_merge_threshold_and_size_weighted_mean():
    a = np.array([1, 0, 0], np.float32)
    b = unit(np.array([1, 0.05, 0], np.float32))
    c = np.array([0, 1, 0], np.float32)
    docs = MultiVectors(np.stack([a, b, c, a]), np.array([0, 4]))
    # threshold only: the three near-identical vectors merge, the orthogonal one stays
    out = registry.build("merge:keep=0,threshold=0.9,protect=0,normalize=false").transform(docs)
    assert out.n_tokens == 2
    np.testing.assert_allclose(out.embeddings[0], (a + b + a) / 3, rtol=1e-6)
    assert np.array_equal(out.embeddings[1], c)
    # orthogonal vectors are never merged above a positive threshold
    eye = MultiVectors(np.eye(5, dtype=np.float32), np.array([0, 5]))
    same = registry.build("merge:keep=0,threshold=0.5").transform(eye)
    assert np.array_equal(same.embeddings, eye.embeddings)


# -- crisp ------------------------------------------------------------------------------
def test_crisp_k_at_least_n_is_identity_up_to_order():
    rng = np.random.default_rng(5)
    docs = MultiVectors.from_list(
        [rng.standard_normal((n, 8)).astype(np.float32) for n in [1, 4, 8]]
    )
    out = registry.build("crisp:q=8,d=8").transform(docs)
    for i in range(len(docs)):
        got = out.doc(i)[np.lexsort(out.doc(i).T)]
        want = docs.doc(i)[np.lexsort(docs.doc(i).T)]
        assert np.array_equal(got, want)


def test_crisp_fixed_k_query_and_document_sides():
    rng = np.random.default_rng(6)
    mv = MultiVectors.from_list(
        [rng.standard_normal((n, 8)).astype(np.float32) for n in [3, 20, 50]]
    )
    step = registry.build("crisp:q=4,d=10")
    assert step.transform(mv).lengths.tolist() == [3, 10, 10]
    assert step.transform(mv, kind="queries").lengths.tolist() == [3, 4, 4]
    rel = registry.build("crisp:rel=0.25")
    assert rel.transform(mv).lengths.tolist() == [1, 5, 13]
    assert rel.transform(mv, kind="queries").lengths.tolist() == [1, 5, 13]
    assert registry.build("crisp").spec.startswith("crisp:q=8,d=32,")


def test_crisp_recovers_known_clusters():
    rng = np.random.default_rng(7)
    centers, x = clustered_doc(rng, 8, 4, noise=0.02)
    out = registry.build("crisp:q=8,d=8").transform(MultiVectors.from_list([x]))
    assert_recovers(centers, out.embeddings)


def naive_lloyd(x, init, iters):
    cent = x[init].astype(np.float64)
    labels = None
    for _ in range(iters):
        d2 = ((x[:, None, :].astype(np.float64) - cent[None]) ** 2).sum(-1)
        new = d2.argmin(axis=1)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        for c in range(len(cent)):
            if np.any(labels == c):
                cent[c] = x[labels == c].mean(axis=0)
    return labels


def test_crisp_kernel_matches_naive_lloyd_and_drops_empty_clusters():
    rng = np.random.default_rng(8)
    for n, k in [(10, 3), (40, 8), (64, 16)]:
        x = rng.standard_normal((n, 12)).astype(np.float32)
        init = K.kmeans_pp_init(x, k, 0)
        assert len(set(init.tolist())) == k
        lab = np.empty(n, np.int64)
        K.lloyd(x, init, 10, lab)
        assert partition(lab) == partition(naive_lloyd(x, init, 10))
    # three distinct vectors asked for five clusters: at most three, never zero vectors
    x = np.repeat(np.eye(3, dtype=np.float32), 4, axis=0)
    out = registry.build("crisp:d=5").transform(MultiVectors(x, np.array([0, 12])))
    assert out.n_tokens == 3 and np.all(np.linalg.norm(out.embeddings, axis=1) > 0.99)


def test_crisp_rejects_mixed_k_settings():
    with pytest.raises(ValueError, match="either rel= .* or q=/d="):
        registry.build("crisp:q=4,rel=0.5")


# -- registry errors, weights, pipeline -------------------------------------------------
def test_unknown_plugin_and_bad_params_say_what_exists():
    with pytest.raises(
        ValueError, match="unknown component 'pooling'.*attn_prune.*crisp.*merge.*pool"
    ):
        registry.build("pooling:factor=2")
    with pytest.raises(ValueError, match="factor=0 must be >= 1"):
        registry.build("pool:factor=0")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['bogus'\]; known: factor"):
        registry.build("pool:bogus=1")
    with pytest.raises(ValueError, match="'drop' is not one of \\['top', 'adaptive'\\]"):
        registry.build("attn_prune:mode=drop")
    with pytest.raises(ValueError, match="keep=1.5 must be <= 1.0"):
        registry.build("attn_prune:keep=1.5")
    with pytest.raises(ValueError, match="not a valid int"):
        registry.build("crisp:q=two")


@pytest.mark.parametrize("spec", ["pool:factor=3", "merge:keep=0.3", "crisp:d=4"])
def test_merging_plugins_conserve_total_weight(spec):
    rng = np.random.default_rng(9)
    lens = [1, 5, 17, 30]
    docs = MultiVectors.from_list(
        [unit(rng.standard_normal((n, 8))) for n in lens],
        weights=[rng.random(n).astype(np.float32) for n in lens],
    )
    out = registry.build(spec).transform(docs)
    for i in range(len(lens)):
        np.testing.assert_allclose(out.doc_weights(i).sum(), docs.doc_weights(i).sum(), rtol=1e-5)


def test_pipeline_applies_steps_and_reports():
    rng = np.random.default_rng(10)
    docs = MultiVectors.from_list(
        [unit(rng.standard_normal((n, 8))) for n in [5, 12, 40]],
        weights=[rng.random(n).astype(np.float32) for n in [5, 12, 40]],
    )
    queries = MultiVectors.from_list([unit(rng.standard_normal((32, 8)))])
    pipe = make_pipeline("attn_prune:keep=0.8 | pool:factor=2 | crisp:q=8,d=32")
    out = pipe.transform_documents(docs)
    assert [r["vectors_after"] for r in pipe.reports] == [
        1 + 4 + 1 + 9 + 1 + 32,
        1 + 2 + 1 + 5 + 1 + 16,
        1 + 2 + 1 + 5 + 1 + 16,
    ]
    assert out.n_tokens == pipe.reports[-1]["vectors_after"]
    assert pipe.transform_queries(queries).n_tokens == 8  # only crisp touches queries
    assert "pool:factor=2,normalize=true,protect=1" in pipe.spec


def test_protocol_stages():
    """Every registered pre-codec plug-in implements its stage's protocol, each stage has
    exactly one protocol, and the registry refuses unknown stages and out-of-order specs."""
    protocols = {
        p.stage: p
        for p in (pre_base.DataPreprocessor, pre_base.ModelPreprocessor,
                  pre_base.TokenPreprocessor, pre_base.TablePreprocessor)
    }  # fmt: skip
    assert set(protocols) == set(pre_base.PREPROCESS_STAGES) and len(protocols) == 4
    assert set(pre_base.PREPROCESS_STAGES) <= set(registry.STAGES)
    for name, cls in registry.available().items():
        if cls.stage in protocols:
            assert issubclass(cls, protocols[cls.stage]), (name, cls.stage)
    bad = type("BadStage", (pre_base.TokenPreprocessor,), {"name": "bad_stage", "stage": "nope"})
    with pytest.raises(ValueError, match="stage"):
        registry.register(bad)
    assert "bad_stage" not in registry.available()
    with pytest.raises(ValueError, match="out of order"):
        registry.build_pipeline("f32 | pool:factor=2")  # a token plug-in after the codec


@pytest.mark.parametrize("module", [attention, pool, merge, crisp, pre_base])
def test_docstring_examples(module):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
