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


# ======================================================================================
# Data, model and table stages: the same promises for every registered plug-in — spec
# round trip, identity setting bit for bit, determinism, input never mutated, save -> load
# round trip (model/table), exact budgets (data), bad input. Fixtures: a tiny random BERT
# with MiniLM's tokenizer (synthetic weights) and the adi collection's texts.
# ======================================================================================
import copy  # noqa: E402

import torch  # noqa: E402

DATA_PLUGINS = sorted(registry.available("data"))
MODEL_PLUGINS = sorted(registry.available("model"))
TABLE_PLUGINS = sorted(registry.available("table"))


def _tiny_bert(seed=0):
    from tests.conftest import tiny_colbert

    return tiny_colbert(seed=seed)


def _copy(model):
    tok, model.tokenizer = model.tokenizer, None
    out = copy.deepcopy(model)
    model.tokenizer = out.tokenizer = tok
    return out


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def adi_texts(data_dir):
    from retrieval_prune.data.beir import load_beir

    c = load_beir(data_dir / "adi", split="test")
    _, q = c.judged_queries()
    return list(c.doc_texts), list(q)


@pytest.fixture
def model_setup(adi_texts):
    """(base, fine-tuned, context): the fine-tune moves every tensor but the word table."""
    from retrieval_prune.encode.checkpoint import colbert_spec
    from retrieval_prune.encode.model import TextTokenizer, collate
    from retrieval_prune.preprocess.base import ModelContext

    base = _tiny_bert()
    ft = _copy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if "word_embeddings" not in name:
                p.add_(1e-2 * torch.randn(p.shape, generator=g))
    tt = TextTokenizer(ft.tokenizer, colbert_spec(doc_maxlen=64))
    docs, queries = adi_texts
    cal = [collate(tt.documents(docs[:8]), range(8), tt.pad_id),
           collate(tt.queries(queries[:8]), range(8), tt.pad_id)]
    base_sd = {k: v for k, v in _state(base).items() if k != "projection.weight"}
    # training steps (needs_training plug-ins: loraprune): the recipe over 8 adi pairs
    from retrieval_prune.train.data import load_pairs
    from retrieval_prune.train.recipe import training_context

    pairs = load_pairs("adi", split="test", allow_eval_split=True, negatives="none",
                       max_queries=8)
    loss_fn, batches = training_context(ft, [], steps=2, batch_size=4, pairs=[pairs],
                                        progress=False)
    ctx = ModelContext(base=base_sd, base_identity={"name": "tiny", "sha256": "0" * 64},
                       calibration=cal, loss_fn=loss_fn, batches=batches, steps=2,
                       progress=False)
    return base, ft, ctx


def test_every_stage_has_plugins():
    assert {"gmp", "dare"} <= set(MODEL_PLUGINS)
    assert DATA_PLUGINS and TABLE_PLUGINS


@pytest.mark.parametrize("name", DATA_PLUGINS + MODEL_PLUGINS + TABLE_PLUGINS)
def test_stage_spec_round_trips(name):
    cls = registry.get(name)
    step = cls()
    assert registry.build(step.spec).spec == step.spec
    assert step.stage in ("data", "model", "table")
    with pytest.raises(ValueError):
        registry.build(f"{name}:no_such_param=1")


# -- model ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODEL_PLUGINS)
def test_model_step_contract(name, model_setup, tmp_path):
    from retrieval_prune.encode.checkpoint import load_checkpoint, save_checkpoint

    _, ft, ctx = model_setup
    cls = registry.get(name)
    before = _state(ft)
    a = cls().apply(ft, ctx)
    b = cls().apply(ft, ctx)
    assert _same_state(_state(ft), before), "the input model was mutated"
    assert _same_state(_state(a.model), _state(b.model)), "not deterministic"
    assert a.report.stage == "model" and a.report.step == cls().spec
    assert 0.0 <= a.report.kept_fraction <= 1.0
    assert a.report.bytes_after <= a.report.bytes_before
    delta = (ctx.base, ctx.base_identity) if a.delta_of is not None else None
    save_checkpoint(a.model, tmp_path / "c", masks=a.masks, delta_base=delta)
    if delta is None:
        back = load_checkpoint(tmp_path / "c").model
        assert _same_state(_state(back), _state(a.model))
    if cls.identity_params is not None:
        same = cls(**cls.identity_params).apply(ft, ctx)
        assert _same_state(_state(same.model), before), "identity setting changed the model"


@pytest.mark.parametrize("name", MODEL_PLUGINS)
def test_model_step_refuses_non_finite(name, model_setup):
    _, ft, ctx = model_setup
    bad = _copy(ft)
    with torch.no_grad():
        bad.projection.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        registry.get(name)().apply(bad, ctx)


# -- table ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TABLE_PLUGINS)
def test_table_step_contract(name, adi_texts, tmp_path):
    from retrieval_prune.encode.checkpoint import colbert_spec, load_checkpoint, save_checkpoint
    from retrieval_prune.encode.model import TextTokenizer, collate

    model = _tiny_bert()
    spec = colbert_spec(doc_maxlen=64)
    docs, queries = adi_texts
    before = _state(model)
    cls = registry.get(name)
    a = cls().apply(model, docs + queries, spec)
    b = cls().apply(model, docs + queries, spec)
    assert _same_state(_state(model), before), "the input model was mutated"
    assert _same_state(_state(a.model), _state(b.model)), "not deterministic"
    assert a.report.stage == "table"
    rows = a.model.backbone.embeddings.word_embeddings.weight.shape[0]
    assert a.id_map.shape == (before["backbone.embeddings.word_embeddings.weight"].shape[0],)
    assert int((a.id_map >= 0).sum()) == rows
    # the vectors of every calibration text are unchanged
    for kind, texts in (("documents", docs[:40]), ("queries", queries)):
        ot, nt = TextTokenizer(model.tokenizer, spec), TextTokenizer(a.model.tokenizer, spec)
        tk_o = getattr(ot, kind)(texts)
        tk_n = getattr(nt, kind)(texts)
        bo, bn = collate(tk_o, range(len(texts)), ot.pad_id), collate(tk_n, range(len(texts)), nt.pad_id)
        with torch.inference_mode():
            vo = model(bo.input_ids, bo.attention_mask, bo.vector_mask).vectors
            vn = a.model(bn.input_ids, bn.attention_mask, bn.vector_mask).vectors
        assert torch.equal(vo, vn), f"{kind} vectors changed"
    save_checkpoint(a.model, tmp_path / "c", spec=spec)
    back = load_checkpoint(tmp_path / "c").model
    assert _same_state(_state(back), _state(a.model))
    with pytest.raises((ValueError, TypeError)):
        cls().apply(model, "one string is not a list", spec)


# -- data -------------------------------------------------------------------------------
def _pair_sets(adi_texts, seed=0):
    """adi's queries as two 'collections' with synthetic unit pair embeddings and scores
    (the selection rules' mechanics; adi has no train split, so nothing trains on it)."""
    from retrieval_prune.preprocess.base import PairSet

    _, queries = adi_texts
    rng = np.random.default_rng(seed)
    sets = []
    for name, n in (("adi-a", len(queries)), ("adi-b", 57)):
        topics = rng.standard_normal((5, 24))
        e = topics[rng.integers(0, 5, n)] + 0.3 * rng.standard_normal((n, 24))
        e[3] = e[2]  # an exact duplicate pair
        e = (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)
        sets.append(PairSet(name, [f"{name}-{i}" for i in range(n)], e, rng.random(n)))
    return sets


@pytest.mark.parametrize("name", DATA_PLUGINS)
def test_data_step_contract(name, adi_texts):
    sets = _pair_sets(adi_texts)
    frozen = copy.deepcopy(sets)
    cls = registry.get(name)
    a = cls().select(sets)
    b = cls().select(sets)
    for s, f in zip(sets, frozen, strict=True):
        assert s.query_ids == f.query_ids and np.array_equal(s.embeddings, f.embeddings)
        assert np.array_equal(s.scores, f.scores)
    assert a.kept == b.kept and a.aliases == b.aliases, "not deterministic"
    for s in sets:
        kept = a.kept[s.name]
        assert kept and set(kept) <= set(s.query_ids)
        assert kept == [q for q in s.query_ids if q in set(kept)], "input order not kept"
        for removed, to in a.aliases[s.name].items():
            assert removed not in kept and to in kept
        if "keep" in cls.params:
            assert len(kept) == max(1, round(cls().keep * len(s)))
    assert a.report.stage == "data" and a.report.step == cls().spec
    if cls.identity_params is not None:
        same = cls(**cls.identity_params).select(sets)
        assert all(same.kept[s.name] == s.query_ids for s in sets)
    with pytest.raises(ValueError):
        cls().select([])
