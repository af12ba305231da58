"""One contract suite over every registered token-stage plug-in (third-party ones too).

The fixtures are synthetic (seeded; labelled synthetic): documents drawn around a few
topic directions, plus the awkward cases — an empty document, a one-token document,
exact duplicate vectors, zero vectors — with float32 importance weights ([CLS] first).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from retrieval_prune import registry
from retrieval_prune.preprocess.base import KINDS, TokenPreprocessor
from retrieval_prune.types import MultiVectors

PLUGINS = sorted(registry.available("tokens"))
DIM = 16


def synthetic_docs(seed: int = 0, n_docs: int = 24, with_weights: bool = True) -> MultiVectors:
    """Seeded synthetic documents with structure and every awkward case."""
    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((6, DIM)).astype(np.float32)
    docs = []
    for _ in range(n_docs):
        n = int(rng.integers(2, 40))
        x = topics[rng.integers(0, 6, n)] + 0.3 * rng.standard_normal((n, DIM)).astype(np.float32)
        docs.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    docs[1] = np.zeros((0, DIM), np.float32)  # empty document
    docs[2] = docs[2][:1]  # one token
    docs[3] = np.repeat(docs[3][:2], 5, axis=0)  # exact duplicates only (2 distinct vectors)
    docs[4] = docs[4].copy()
    docs[4][1:4] = 0.0  # zero vectors
    docs[5] = np.zeros((6, DIM), np.float32)  # all-zero document
    docs[6] = docs[6][:2]  # two tokens: just the protected one and one more
    weights = None
    if with_weights:
        weights = []
        for d in docs:
            w = rng.random(d.shape[0]).astype(np.float32)
            if d.shape[0]:
                w[0] = 1.0  # [CLS] attends to itself most
            weights.append(w)
        weights[3] = np.full(docs[3].shape[0], 0.5, np.float32)  # tied importances
    return MultiVectors.from_list(docs, weights=weights, dim=DIM)


def _bounds(step, lengths, kind):
    if hasattr(step, "length_bounds"):
        return step.length_bounds(lengths, kind)
    return TokenPreprocessor.length_bounds(step, lengths, kind)


def _applies_to(step):
    return getattr(step, "applies_to", ("documents",))


def _same(a: MultiVectors, b: MultiVectors) -> bool:
    same_w = (a.weights is None) == (b.weights is None) and (
        a.weights is None or np.array_equal(a.weights, b.weights)
    )
    return (
        np.array_equal(a.offsets, b.offsets)
        and np.array_equal(a.embeddings, b.embeddings)
        and same_w
    )


def _quiet(step, docs, kind="documents"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return step.transform(docs, kind=kind)


@pytest.fixture(scope="module")
def docs():
    return synthetic_docs()


@pytest.fixture(params=PLUGINS)
def cls(request):
    return registry.get(request.param)


def test_builtin_plugins_registered():
    assert {"attn_prune", "pool", "merge", "crisp"} <= set(PLUGINS)


def test_spec_round_trips(cls):
    for step in [cls(), cls(**(getattr(cls, "identity_params", None) or {}))]:
        again = registry.build(step.spec)
        assert again == step and again.spec == step.spec
        assert registry.build_pipeline(step.spec) == [step]


def test_fit_returns_self_and_stage(cls, docs):
    step = cls()
    assert step.stage == "tokens"
    assert step.fit(docs) is step


@pytest.mark.parametrize("kind", KINDS)
def test_output_is_valid_and_within_budget(cls, docs, kind):
    step = cls()
    before = docs.embeddings.copy()
    out = _quiet(step, docs, kind)
    assert np.array_equal(docs.embeddings, before), "input was modified"
    assert isinstance(out, MultiVectors) and len(out) == len(docs)
    assert out.offsets[0] == 0 and out.offsets[-1] == out.n_tokens
    assert np.all(np.diff(out.offsets) >= 0)
    assert out.dim == docs.dim and out.embeddings.dtype == np.float32
    assert np.isfinite(out.embeddings).all()
    lo, hi = _bounds(step, docs.lengths, kind)
    assert np.all(lo <= out.lengths) and np.all(out.lengths <= hi), (lo, out.lengths, hi)
    assert np.all(out.lengths[docs.lengths > 0] >= 1), "a non-empty document was emptied"
    assert np.all(out.lengths[docs.lengths == 0] == 0)
    if docs.weights is not None:
        assert out.weights is not None and np.isfinite(out.weights).all()
    if kind not in _applies_to(step):
        assert _same(out, docs)


def test_budget_is_met_exactly_where_declared(cls, docs):
    step = cls()
    lo, hi = _bounds(step, docs.lengths, "documents")
    exact = lo == hi
    out = _quiet(step, docs)
    assert np.array_equal(out.lengths[exact], lo[exact])


def test_deterministic(cls):
    a = _quiet(registry.build(cls().spec), synthetic_docs(seed=3))
    b = _quiet(registry.build(cls().spec), synthetic_docs(seed=3))
    assert _same(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_documents_are_independent_of_their_batch(cls, docs, kind):
    step = cls()
    full = _quiet(step, docs, kind)
    idx = np.array([7, 0, 12, 3])
    part = _quiet(step, docs[idx], kind)
    assert _same(part, full[idx])


@pytest.mark.parametrize("kind", KINDS)
def test_identity_setting(cls, docs, kind):
    params = getattr(cls, "identity_params", None)
    if params is None:
        pytest.skip(f"{cls.name} declares no identity_params")
    out = cls(**params).transform(docs, kind=kind)
    assert _same(out, docs)


def test_protected_tokens_survive(cls, docs):
    if "protect" not in cls.params:
        pytest.skip(f"{cls.name} has no protect parameter")
    step = cls(protect=2)
    for kind in _applies_to(step):
        out = _quiet(step, docs, kind)
        for i in range(len(docs)):
            p = min(2, docs.lengths[i])
            assert np.array_equal(out.doc(i)[:p], docs.doc(i)[:p])
            assert np.array_equal(out.doc_weights(i)[:p], docs.doc_weights(i)[:p])


def test_weights_optional_or_required(cls):
    bare = synthetic_docs(with_weights=False)
    step = cls()
    if getattr(step, "needs_importance", False):
        with pytest.raises(ValueError, match="importance"):
            step.transform(bare)
    else:
        out = _quiet(step, bare)
        assert out.weights is None and len(out) == len(bare)


def test_bad_input_is_rejected(cls, docs):
    step = cls()
    with pytest.raises(ValueError, match="kind"):
        step.transform(docs, kind="passages")
    with pytest.raises(TypeError):
        step.transform(docs.embeddings)
    bad = docs.embeddings.copy()
    bad[5, 0] = np.nan
    for kind in _applies_to(step):
        with pytest.raises(ValueError, match="NaN"):
            step.transform(MultiVectors(bad, docs.offsets, docs.weights), kind=kind)


def test_all_empty_and_no_documents(cls):
    step = cls()
    empty = MultiVectors(np.zeros((0, DIM), np.float32), np.zeros(3, np.int64))
    none = MultiVectors(np.zeros((0, DIM), np.float32), np.zeros(1, np.int64))
    for mv in (empty, none):
        out = step.transform(mv)
        assert len(out) == len(mv) and out.n_tokens == 0
