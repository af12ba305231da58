"""VocabTrim (table stage): the trimmed model encodes every calibration text exactly as before.

A tiny random BERT (2 layers, 64-d) with MiniLM's real tokenizer, and the adi collection's
documents and queries as calibration texts; a hand-made vocabulary for WordPiece's [UNK] corner.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import retrieval_prune.preprocess.table  # noqa: F401  (registers vocabtrim until preprocess imports it)
from retrieval_prune import registry
from retrieval_prune.encode.checkpoint import colbert_spec, load_checkpoint, save_checkpoint
from retrieval_prune.encode.model import ColBERTModel, TextTokenizer, TokenizerSpec, collate
from retrieval_prune.preprocess.base import TablePreprocessor, TableResult
from retrieval_prune.preprocess.table import VocabTrim, query_token_change_share

from .conftest import DATA

COLBERT = colbert_spec(doc_maxlen=64, query_maxlen=32)  # adi documents get cut at 64
ZERO_SHOT = TokenizerSpec()  # the zero-shot encoder's: no markers, 256 / 64
SPECS = {"colbert": COLBERT, "zero-shot": ZERO_SHOT}


def _tiny_model(seed=0, dim=32):
    from tests.conftest import tiny_colbert

    return tiny_colbert(seed=seed, dim=dim)


@pytest.fixture(scope="module")
def texts():
    if not (DATA / "adi").is_dir():
        pytest.skip("../shared/data is not present")
    from retrieval_prune.data.beir import load_beir

    c = load_beir(DATA / "adi")
    return c.doc_texts + list(c.queries.values())


@pytest.fixture(scope="module")
def model():
    return _tiny_model()


@pytest.fixture(scope="module")
def trimmed(model, texts):
    return {name: VocabTrim().apply(model, texts, spec) for name, spec in SPECS.items()}


def _encode(model, spec, texts, path, batch=32):
    tt = TextTokenizer(model.tokenizer, spec)
    tok = getattr(tt, path)(texts)
    out = []
    with torch.no_grad():
        for s in range(0, len(texts), batch):
            b = collate(tok, range(s, min(s + batch, len(texts))), tt.pad_id)
            o = model(b.input_ids, b.attention_mask, b.vector_mask)
            out.append((b.input_ids, o.vectors, o.mask))
    return tok, out


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- registry -----------------------------------------------------------------------------
def test_registered_in_the_table_stage():
    cls = registry.available("table")["vocabtrim"]
    assert cls is VocabTrim and issubclass(cls, TablePreprocessor) and cls.stage == "table"
    assert VocabTrim.identity_params is None  # no setting keeps the whole table


@pytest.mark.parametrize(
    "spec", ["vocabtrim", "vocabtrim:keep=8000", "vocabtrim:keep=16000,single_chars=false"]
)
def test_spec_round_trip(spec):
    step = registry.build(spec)
    assert registry.build(step.spec).spec == step.spec
    assert step.spec.startswith("vocabtrim:keep=")


def test_bad_params_are_refused():
    with pytest.raises(ValueError, match="keep"):
        registry.build("vocabtrim:keep=-1")
    with pytest.raises(ValueError, match="single_chars"):
        registry.build("vocabtrim:single_chars=maybe")


# -- the promise: calibration texts encode exactly as before -------------------------------
@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("path", ["documents", "queries"])
def test_calibration_vectors_are_bit_identical(model, texts, trimmed, name, path):
    spec, res = SPECS[name], trimmed[name]
    assert isinstance(res, TableResult)
    assert res.report.details["calibration_texts_changed"] == 0
    tok_a, a = _encode(model, spec, texts, path)
    tok_b, b = _encode(res.model, spec, texts, path)
    for ia, ib in zip(tok_a.ids, tok_b.ids, strict=True):
        assert res.id_map[np.asarray(ia)].tolist() == ib
    assert tok_a.keep == tok_b.keep and tok_a.attend == tok_b.attend
    for (ids_a, va, ma), (ids_b, vb, mb) in zip(a, b, strict=True):
        assert torch.equal(torch.as_tensor(res.id_map)[ids_a], ids_b)
        assert torch.equal(ma, mb)
        assert torch.equal(va, vb)  # the same rows gathered: no summation changes


def test_trimmed_model_structure(model, trimmed):
    res = trimmed["colbert"]
    new, id_map, d = res.model, res.id_map, res.report.details
    rows = d["rows_after"]
    assert id_map.dtype == np.int64 and id_map.shape == (model.backbone.config.vocab_size,)
    kept = np.flatnonzero(id_map >= 0)
    assert kept.size == rows and id_map[kept].tolist() == list(range(rows))  # old order kept
    assert new.backbone.config.vocab_size == rows
    emb = new.backbone.get_input_embeddings()
    assert tuple(emb.weight.shape) == (rows, model.hidden_size)
    assert torch.equal(emb.weight, model.backbone.get_input_embeddings().weight[torch.as_tensor(kept)])
    assert emb.padding_idx == 0 and new.backbone.config.pad_token_id == 0
    old_tok, tok = model.tokenizer, new.tokenizer
    assert len(tok) == rows and tok.pad_token_id == 0
    for name in ("pad", "unk", "cls", "sep", "mask"):
        old_id = getattr(old_tok, f"{name}_token_id")
        assert getattr(tok, f"{name}_token") == getattr(old_tok, f"{name}_token")
        assert getattr(tok, f"{name}_token_id") == id_map[old_id]
    for marker in ("[unused0]", "[unused1]"):
        assert id_map[old_tok.convert_tokens_to_ids(marker)] >= 0
    assert id_map[old_tok.convert_tokens_to_ids("[unused2]")] == -1
    # the same normalisation (lower-casing, accent stripping, Chinese characters, limits)
    assert tok.backend_tokenizer.normalizer.__getstate__() == old_tok.backend_tokenizer.normalizer.__getstate__()
    assert tok.model_max_length == old_tok.model_max_length
    odd = "Café RÉSUMÉ\t中文"
    assert tok.backend_tokenizer.normalizer.normalize_str(odd) == "cafe resume  中  文 "
    assert tok.tokenize(odd)[:4] == ["c", "##a", "##f", "##e"]  # no longer a piece, yet no [UNK]
    # the report
    r = res.report
    assert r.stage == "table" and r.step == "vocabtrim:keep=0,single_chars=true" and not r.lossless
    assert r.kept_fraction == pytest.approx(rows / d["rows_before"])
    row_bytes = model.hidden_size * 4
    assert (r.bytes_before, r.bytes_after) == (d["rows_before"] * row_bytes, rows * row_bytes)
    assert d["rows_after"] == d["mandatory_or_used"] and d["used_kept"] == d["used"]
    assert d["mandatory"] >= 2 * 997 + 5 + 2  # chars, ##chars, specials, markers
    assert r.to_dict()["details"]["rows_before"] == 30522


def test_input_model_is_untouched(texts):
    model = _tiny_model(seed=1)
    before, vocab, n = _state(model), model.tokenizer.get_vocab(), model.backbone.config.vocab_size
    res = VocabTrim(keep=2500).apply(model, texts, COLBERT)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.tokenizer.get_vocab() == vocab and len(model.tokenizer) == 30522
    assert model.backbone.config.vocab_size == n == 30522
    assert model.backbone.get_input_embeddings().weight.shape[0] == 30522
    assert res.model.tokenizer is not model.tokenizer and res.model.backbone is not model.backbone


def test_deterministic(model, texts, trimmed):
    again = VocabTrim().apply(model, texts, COLBERT)
    first = trimmed["colbert"]
    assert np.array_equal(again.id_map, first.id_map)
    assert again.model.tokenizer.get_vocab() == first.model.tokenizer.get_vocab()
    sa, sb = again.model.state_dict(), first.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert {k: v for k, v in again.report.details.items()} == first.report.details


# -- unseen text --------------------------------------------------------------------------
def test_unseen_words_fall_back_to_kept_pieces(model, texts, trimmed):
    new = trimmed["colbert"].model
    words = ["zyxqvw", "quizzaciously", "Ωmega-12ß"]
    for w in words:
        assert not re.search(w, " ".join(texts), re.IGNORECASE)
        pieces = new.tokenizer.tokenize(w)
        assert pieces and "[UNK]" not in pieces
        assert all(p in new.tokenizer.get_vocab() for p in pieces)
    # without single characters, an unseen character run has no pieces left
    lean = VocabTrim(single_chars=False).apply(model, texts, COLBERT)
    assert lean.report.details["mandatory"] < 40
    assert "[UNK]" in lean.model.tokenizer.tokenize("zyxqvw")
    # ... yet the calibration texts still encode as before
    assert lean.report.details["calibration_texts_changed"] == 0


def test_query_token_change_share(model, texts, trimmed):
    new = trimmed["colbert"].model
    assert query_token_change_share(model, new, COLBERT, texts[-10:]) == 0.0
    share = query_token_change_share(model, new, COLBERT, [texts[-1], "zyxqvw quizzaciously"])
    assert share == 0.5
    with pytest.raises(ValueError, match="no calibration texts"):
        query_token_change_share(model, new, COLBERT, [])


# -- the row budget -----------------------------------------------------------------------
def test_keep_gives_an_exact_row_budget_of_the_most_frequent_pieces(model, texts, trimmed):
    full = trimmed["zero-shot"].report.details
    n_mand = full["mandatory"]
    for k in (n_mand, n_mand + 25, n_mand + 700):
        res = VocabTrim(keep=k).apply(model, texts, ZERO_SHOT)
        assert res.report.details["rows_after"] == k == res.model.backbone.config.vocab_size
        assert int((res.id_map >= 0).sum()) == k == len(res.model.tokenizer)
    big = VocabTrim(keep=full["mandatory_or_used"] + 1000).apply(model, texts, ZERO_SHOT)
    assert np.array_equal(big.id_map, trimmed["zero-shot"].id_map)  # a cap, never a fill

    # the 25 extra rows are the 25 most frequent used non-mandatory pieces (ties: lower id);
    # adi texts are far below 256 tokens, so the untruncated count is the exact one
    res = VocabTrim(keep=n_mand + 25).apply(model, texts, ZERO_SHOT)
    mand = VocabTrim().mandatory_ids(model.tokenizer, ZERO_SHOT)
    ids = model.tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert max(map(len, ids)) < ZERO_SHOT.doc_maxlen - 2
    counts = np.bincount(np.concatenate(ids), minlength=30522)
    cand = [i for i in np.flatnonzero(counts) if i not in set(mand.tolist())]
    top = sorted(cand, key=lambda i: (-counts[i], i))[:25]
    assert sorted(np.flatnonzero(res.id_map >= 0).tolist()) == sorted(set(mand.tolist()) | set(top))


def test_keep_below_mandatory_is_an_error_naming_both(model, texts, trimmed):
    n_mand = trimmed["colbert"].report.details["mandatory"]
    with pytest.raises(ValueError, match=rf"keep=100 is below the {n_mand} mandatory"):
        VocabTrim(keep=100).apply(model, texts, COLBERT)
    # without single characters the floor is the special / marker / punctuation pieces
    res = VocabTrim(keep=100, single_chars=False).apply(model, texts, COLBERT)
    assert res.report.details["rows_after"] == 100


def test_bad_inputs(model, texts):
    with pytest.raises(ValueError, match="no calibration texts"):
        VocabTrim().apply(model, [], COLBERT)
    with pytest.raises(TypeError, match="list of strings"):
        VocabTrim().apply(model, "one text", COLBERT)
    with pytest.raises(TypeError, match="expected str"):
        VocabTrim().apply(model, ["a", 3], COLBERT)
    with pytest.raises(TypeError, match="TokenizerSpec"):
        VocabTrim().apply(model, texts, {"doc_maxlen": 64})
    with pytest.raises(TypeError, match="ColBERTModel"):
        VocabTrim().apply(model.backbone, texts, COLBERT)


# -- checkpoint -----------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path, texts, trimmed):
    res = trimmed["colbert"]
    path = save_checkpoint(res.model, tmp_path / "ckpt", {"table": res.report.to_dict()}, spec=COLBERT)
    ck = load_checkpoint(path)
    assert ck.spec == COLBERT
    assert ck.config["backbone_config"]["vocab_size"] == res.report.details["rows_after"]
    assert ck.model.backbone.config.vocab_size == res.report.details["rows_after"]
    assert ck.model.tokenizer.get_vocab() == res.model.tokenizer.get_vocab()
    sa, sb = ck.model.state_dict(), res.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    sample = texts[:8] + texts[-8:]
    for path_ in ("documents", "queries"):
        _, a = _encode(res.model, COLBERT, sample, path_)
        _, b = _encode(ck.model, COLBERT, sample, path_)
        assert all(torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True))


# -- WordPiece's [UNK] corner, on a hand-made vocabulary -------------------------------------
def _toy_model(tmp_path, vocab):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    (tmp_path / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
    tok = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    torch.manual_seed(0)
    return ColBERTModel(BertModel(cfg), 8, tokenizer=tok).eval()


def test_a_word_the_old_vocabulary_could_not_finish_stays_unk(tmp_path, monkeypatch):
    # "abc": greedy WordPiece takes "ab", then finds no "##c": the word is [UNK]. Keeping only
    # what the output shows ([UNK]) would let the small vocabulary find "a" + "##bc" instead.
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused0]", "[unused1]",
             "ab", "a", "##bc", "x", "##x", "b", "##b"]
    model = _toy_model(tmp_path, vocab)
    spec = colbert_spec(doc_maxlen=16, query_maxlen=8)
    texts = ["abc x", "a xbc"]  # the second text uses "a" and "##bc"
    assert model.tokenizer.tokenize("abc x") == ["[UNK]", "x"]
    res = VocabTrim(single_chars=False).apply(model, texts, spec)
    assert res.report.details["unk_words"] == 1
    assert res.model.tokenizer.tokenize("abc x") == ["[UNK]", "x"]
    _, a = _encode(model, spec, texts, "documents")
    _, b = _encode(res.model, spec, texts, "documents")
    assert torch.equal(a[0][1], b[0][1])
    # without the walk's pieces the self-check catches the changed tokenization
    from retrieval_prune.preprocess.table import vocabtrim as vt

    monkeypatch.setattr(vt._Usage, "_failed_walk", lambda self, word: [])
    with pytest.raises(RuntimeError, match="1 calibration texts tokenize differently"):
        VocabTrim(single_chars=False).apply(model, texts, spec)


def test_a_word_cut_by_the_length_limit_keeps_all_its_pieces(tmp_path):
    # 5 body tokens fit (doc_maxlen=8 minus [CLS] [D] [SEP]); the word "xxxxx" straddles the cut
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused0]", "[unused1]",
             "a", "x", "##x", "xx", "##xx", "##xxx"]
    model = _toy_model(tmp_path, vocab)
    spec = colbert_spec(doc_maxlen=8, query_maxlen=6)
    text = "a a a xxxxxx"
    assert model.tokenizer.tokenize(text) == ["a", "a", "a", "xx", "##xxx", "##x"]
    res = VocabTrim(single_chars=False).apply(model, [text], spec)
    assert res.model.tokenizer.tokenize(text) == ["a", "a", "a", "xx", "##xxx", "##x"]
    assert res.report.details["calibration_texts_changed"] == 0
