"""VocabTrim: keep only the vocabulary pieces a collection uses, and their embedding rows.

A BERT-like encoder spends ``vocab_size x hidden`` floats on its word-embedding table
(30522 x 384 float32 = 44.7 MiB for MiniLM), most of whose rows a given collection never
looks up. VocabTrim rebuilds the model over the pieces that calibration texts (the corpus
and the training queries) use, plus the pieces every text may need.

Why the vectors of the calibration texts do not change: BERT's WordPiece is a greedy
longest-match per pre-tokenized word. If every piece the old vocabulary chose for a word is
kept, then at every step the old longest match is still in the new vocabulary, and nothing
longer is (the new vocabulary is a subset of the old one), so the new tokenizer picks the same
pieces; with the same pieces, the gathered embedding rows hold the same numbers and the rest
of the network is untouched. Two corner cases are handled so that this holds for *every*
calibration text, and :meth:`VocabTrim.apply` checks it on all of them (``keep=0``):

- a word the old vocabulary could not finish (a character no piece covers) becomes one
  ``[UNK]``; a smaller vocabulary could find another path through it, so the pieces of the
  old greedy walk up to the failure are kept too, and the new walk fails at the same place;
- truncation: a text keeps only its first ``maxlen`` pieces, but a word cut by the limit
  must still tokenize the same, so every piece of a word that starts inside the budget of
  either path (documents: ``doc_maxlen``, queries: ``query_maxlen``) counts as used.
"""

from __future__ import annotations

import json
import string
import tempfile
import time
from collections.abc import Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from retrieval_prune.preprocess.base import StepReport, TablePreprocessor, TableResult
from retrieval_prune.registry import Param, register

__all__ = ["VocabTrim", "query_token_change_share"]

#: ``BertTokenizerFast`` init settings that name files or a source, not behaviour
_NOT_COPIED = {
    "name_or_path",
    "vocab_file",
    "tokenizer_file",
    "tokenizer_object",
    "added_tokens_decoder",
    "special_tokens_map_file",
    "tokenizer_class",
    "auto_map",
    "do_lower_case",
    "strip_accents",
    "tokenize_chinese_chars",
}


def _check_texts(name: str, texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"{name}: texts must be a list of strings, not one string")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{name}: no calibration texts; give the corpus and training queries")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{name}: texts[{i}] is {type(t).__name__}, expected str")
    return texts


def _backend_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise NotImplementedError(
            f"vocabtrim needs a fast (Rust) tokenizer; got {type(tokenizer).__name__}"
        )
    return json.loads(backend.to_str())


def _remap_post_processor(pp: Any, id_map: np.ndarray) -> Any:
    """The post-processor JSON with its special-token ids mapped through ``id_map``."""
    if pp is None:
        return None
    pp = deepcopy(pp)
    kind = pp.get("type")
    if kind == "TemplateProcessing":
        for tok in pp.get("special_tokens", {}).values():
            tok["ids"] = [int(id_map[i]) for i in tok["ids"]]
    elif kind in ("BertProcessing", "RobertaProcessing"):
        for key in ("sep", "cls"):
            pp[key] = [pp[key][0], int(id_map[pp[key][1]])]
    elif kind == "Sequence":
        pp["processors"] = [_remap_post_processor(p, id_map) for p in pp["processors"]]
    return pp


class _Usage:
    """Which old ids the calibration texts use, and how often (see the module docstring)."""

    def __init__(self, tokenizer: Any, spec: Any) -> None:
        from tokenizers import Tokenizer

        from retrieval_prune.encode.model import TextTokenizer

        self.tt = TextTokenizer(tokenizer, spec)
        bj = _backend_json(tokenizer)
        model = bj["model"]
        if model.get("type") != "WordPiece":
            raise NotImplementedError(
                f"vocabtrim trims WordPiece (BERT) vocabularies; this tokenizer's model is "
                f"{model.get('type')!r}"
            )
        self.vocab: dict[str, int] = dict(model["vocab"])
        self.prefix: str = model.get("continuing_subword_prefix", "##")
        self.max_chars = int(model.get("max_input_chars_per_word", 100))
        self.fast = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self.fast.no_truncation()
        self.fast.no_padding()
        self.unk_id = int(tokenizer.unk_token_id)
        n_doc_head = 1 + (self.tt.d_marker_id is not None)
        n_query_head = 1 + (self.tt.q_marker_id is not None)
        # the body of both paths is the same tokenizer call with a different cut: their union
        # is the longer prefix (suffix with left truncation)
        self.budget = max(spec.doc_maxlen - n_doc_head - 1, spec.query_maxlen - n_query_head - 1)
        self.left = self.tt._truncate_left

    def _window(self, word_ids: list[int | None], n: int) -> tuple[int, int]:
        b = self.budget
        if n <= b:
            return 0, n
        if self.left:
            s = n - b
            w = word_ids[s]
            while w is not None and s > 0 and word_ids[s - 1] == w:
                s -= 1
            return s, n
        e = b
        w = word_ids[e - 1]
        while w is not None and e < n and word_ids[e] == w:
            e += 1
        return 0, e

    def _failed_walk(self, word: str) -> list[int]:
        """The pieces old WordPiece matched in ``word`` before it gave up (-> [UNK])."""
        if len(word) > self.max_chars:
            return []
        out, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else self.prefix + word[start:end]
                if piece in self.vocab:
                    out.append(self.vocab[piece])
                    break
                end -= 1
            else:
                return out
            start = end
        return out  # the word tokenized after all (cannot happen for an [UNK] word)

    def counts(self, texts: list[str], n_rows: int, chunk: int = 1024) -> tuple[np.ndarray, int]:
        """Occurrences per old id (int64 ``(n_rows,)``) and the number of [UNK] words walked."""
        counts = np.zeros(n_rows, np.int64)
        n_unk = 0
        norm, pre = self.fast.normalizer, self.fast.pre_tokenizer
        for s in range(0, len(texts), chunk):
            part = texts[s : s + chunk]
            encs = self.fast.encode_batch(part, add_special_tokens=False)
            ids_all = []
            for text, enc in zip(part, encs, strict=True):
                ids = enc.ids
                if not ids:
                    continue
                wids = enc.word_ids
                a, b = self._window(wids, len(ids))
                ids = ids[a:b]
                ids_all.append(np.asarray(ids, np.int64))
                if self.unk_id in ids:
                    normed = norm.normalize_str(text) if norm is not None else text
                    words = [w for w, _ in pre.pre_tokenize_str(normed)] if pre else [normed]
                    seen = set()
                    for j in range(a, b):
                        if enc.ids[j] == self.unk_id and wids[j] is not None and wids[j] not in seen:
                            seen.add(wids[j])
                            if wids[j] >= len(words):
                                raise RuntimeError(
                                    f"vocabtrim: word {wids[j]} of a text is not among its "
                                    f"{len(words)} pre-tokenized words"
                                )
                            n_unk += 1
                            ids_all.append(np.asarray(self._failed_walk(words[wids[j]]), np.int64))
            if ids_all:
                flat = np.concatenate(ids_all)
                if flat.size and (flat.min() < 0 or flat.max() >= n_rows):
                    raise ValueError(
                        f"vocabtrim: the tokenizer produced id {int(flat.max())} but the "
                        f"embedding table has {n_rows} rows"
                    )
                counts += np.bincount(flat, minlength=n_rows)
        return counts, n_unk

    def _cut(self, ids: list[int]) -> list[int]:
        """What either path's body holds of a text: its first (last) ``budget`` ids."""
        return ids[-self.budget :] if self.left else ids[: self.budget]

    def changed(self, new_tok: Any, texts: list[str], id_map: np.ndarray, chunk: int = 1024) -> int:
        """Texts whose document or query ids differ under ``new_tok`` (old ids through id_map).

        Both paths cut the same body ids to a budget (a prefix, or a suffix with left
        truncation), so comparing the longer cut covers both; the ids they add around it
        ([CLS], markers, [SEP], [MASK]) and the punctuation skiplist are compared once.
        """
        from tokenizers import Tokenizer

        from retrieval_prune.encode.model import TextTokenizer

        a, b = self.tt, TextTokenizer(new_tok, self.tt.spec)
        for attr in ("cls_id", "sep_id", "pad_id", "mask_id", "q_marker_id", "d_marker_id"):
            old, new = getattr(a, attr), getattr(b, attr)
            if (old is None) != (new is None) or (old is not None and id_map[old] != new):
                raise RuntimeError(f"vocabtrim: {attr} {old} became {new} in the trimmed tokenizer")
        if {int(id_map[i]) for i in a.punct_ids} != set(b.punct_ids):
            raise RuntimeError("vocabtrim: the punctuation skiplist changed")
        fast = Tokenizer.from_str(new_tok.backend_tokenizer.to_str())
        fast.no_truncation()
        fast.no_padding()
        n = 0
        for s in range(0, len(texts), chunk):
            part = texts[s : s + chunk]
            olds = self.fast.encode_batch(part, add_special_tokens=False)
            news = fast.encode_batch(part, add_special_tokens=False)
            for eo, en in zip(olds, news, strict=True):
                io, inew = self._cut(eo.ids), self._cut(en.ids)
                if len(io) != len(inew) or not np.array_equal(
                    id_map[np.asarray(io, np.int64)], np.asarray(inew, np.int64)
                ):
                    n += 1
        return n


def _new_tokenizer(old: Any, kept_tokens: list[str], id_map: np.ndarray) -> Any:
    """A ``BertTokenizerFast`` over ``kept_tokens`` (new id = position) with ``old``'s
    settings; raises NotImplementedError when any setting other than the vocabulary differs."""
    from transformers import BertTokenizerFast

    old_json = _backend_json(old)
    normalizer = old_json.get("normalizer") or {}
    if normalizer.get("type") != "BertNormalizer":
        raise NotImplementedError(
            f"vocabtrim rebuilds BERT tokenizers; this one's normalizer is {normalizer.get('type')!r}"
        )
    kwargs = {k: v for k, v in old.init_kwargs.items() if k not in _NOT_COPIED}
    with tempfile.TemporaryDirectory(prefix="vocabtrim-") as tmp:
        vocab_file = Path(tmp) / "vocab.txt"
        vocab_file.write_text("".join(t + "\n" for t in kept_tokens), encoding="utf-8")
        new = BertTokenizerFast(
            vocab_file=str(vocab_file),
            do_lower_case=bool(normalizer.get("lowercase", True)),
            strip_accents=normalizer.get("strip_accents"),
            tokenize_chinese_chars=bool(normalizer.get("handle_chinese_chars", True)),
            **kwargs,
        )
    # everything but the vocabulary must be what it was
    new_json = _backend_json(new)
    want_vocab = {t: i for i, t in enumerate(kept_tokens)}
    if new_json["model"].get("vocab") != want_vocab:
        raise NotImplementedError("vocabtrim: the rebuilt tokenizer does not hold the kept vocabulary")
    diffs = []
    for key in ("normalizer", "pre_tokenizer", "decoder"):
        if new_json.get(key) != old_json.get(key):
            diffs.append(key)
    strip = lambda m: {k: v for k, v in m.items() if k != "vocab"}  # noqa: E731
    if strip(new_json["model"]) != strip(old_json["model"]):
        diffs.append("model settings")
    if new_json.get("post_processor") != _remap_post_processor(old_json.get("post_processor"), id_map):
        diffs.append("post_processor")
    old_added = [{**t, "id": int(id_map[t["id"]])} for t in old_json.get("added_tokens", [])]
    if new_json.get("added_tokens", []) != old_added:
        diffs.append("added_tokens")
    if diffs:
        raise NotImplementedError(
            f"vocabtrim: the rebuilt BERT tokenizer differs from the original in {diffs}; "
            "only standard BERT WordPiece tokenizers are supported"
        )
    return new


@register
class VocabTrim(TablePreprocessor):
    """Trim the input vocabulary to the pieces the calibration texts use (VocabTrim).

    Kept pieces, in their old relative order (so ``[PAD]`` keeps id 0 when it had it):

    - **mandatory**: every special and added token (``[PAD] [UNK] [CLS] [SEP] [MASK]``), the
      spec's marker tokens (``[unused0]`` / ``[unused1]`` in ColBERT mode), the single
      punctuation pieces of the document skiplist, and with ``single_chars`` every
      single-character piece with and without the ``##`` prefix, so that unseen words still
      tokenize into characters rather than ``[UNK]``;
    - **used**: every piece of the calibration texts as :class:`TextTokenizer` tokenizes
      them as documents and as queries (both cuts; a word cut by the limit counts whole;
      the partial walk of an ``[UNK]`` word counts, see the module docstring).

    With ``keep=0`` the new model's vectors of every calibration text equal the old ones
    bit for bit (checked at the end of :meth:`apply`; unseen text may tokenize differently,
    see :func:`query_token_change_share`). The new model has a new ``BertTokenizerFast`` over
    the kept vocabulary with the old normalisation settings, a gathered word-embedding table,
    and ``config.vocab_size`` / ``pad_token_id`` updated; the input model is not changed.

    Parameters
    ----------
    keep : int >= 0, default 0
        0: keep every used piece. K > 0: the table holds exactly ``min(K, mandatory + used)``
        rows: the mandatory pieces, then the most frequent other used pieces (occurrences in
        the calibration texts, ties to the lower old id). K below the mandatory count is an
        error.
    single_chars : bool, default True
        Keep every single-character piece (``c`` and ``##c``) as mandatory.

    ``identity_params`` is None: no setting keeps the whole table (the ``[unused*]`` rows and
    every piece the texts do not use always go), so no parameter value is an exact identity.

    Examples
    --------
    >>> from retrieval_prune import registry                                       # doctest: +SKIP
    >>> step = registry.build("vocabtrim:keep=8000")                               # doctest: +SKIP
    >>> res = step.apply(encoder.model, corpus_texts + train_queries, encoder.spec)  # doctest: +SKIP
    >>> res.report.details["rows_after"]                                            # doctest: +SKIP
    8000
    """

    name = "vocabtrim"
    params: ClassVar[dict[str, Param]] = {
        "keep": Param(0, int, "0: every used piece; K: at most K rows (most frequent)", low=0),
        "single_chars": Param(True, bool, "keep every single-character piece (and ##c)"),
    }
    identity_params: ClassVar[dict[str, Any] | None] = None

    # -- pieces -------------------------------------------------------------------------
    def mandatory_ids(self, tokenizer: Any, spec: Any) -> np.ndarray:
        """Sorted old ids kept whatever the texts (see the class docstring)."""
        from retrieval_prune.encode.model import TextTokenizer

        tt = TextTokenizer(tokenizer, spec)
        vocab = tokenizer.get_vocab()
        ids = set(int(i) for i in tokenizer.all_special_ids)
        ids.update(int(i) for i in getattr(tokenizer, "added_tokens_decoder", {}))
        ids.update(i for i in (tt.q_marker_id, tt.d_marker_id) if i is not None)
        # the document skiplist is the ids of the lone punctuation characters: they must
        # tokenize as before (not as [UNK], which would join the skiplist)
        for c in string.punctuation:
            ids.update(tokenizer.encode(c, add_special_tokens=False))
        if self.single_chars:
            prefix = _backend_json(tokenizer)["model"].get("continuing_subword_prefix", "##")
            for tok, i in vocab.items():
                if len(tok) == 1 or (tok.startswith(prefix) and len(tok) == len(prefix) + 1):
                    ids.add(int(i))
        return np.array(sorted(ids), np.int64)

    def _apply(self, model: Any, texts: list[str], spec: Any) -> TableResult:
        import torch
        from torch import nn

        from retrieval_prune.encode.model import ColBERTModel, TokenizerSpec

        t0 = time.perf_counter()
        if not isinstance(model, ColBERTModel):
            raise TypeError(f"{self.name}: model is {type(model).__name__}, expected ColBERTModel")
        if model.tokenizer is None:
            raise ValueError(f"{self.name}: model.tokenizer is None; the table step needs it")
        if not isinstance(spec, TokenizerSpec):
            raise TypeError(f"{self.name}: spec is {type(spec).__name__}, expected TokenizerSpec")
        texts = _check_texts(self.name, texts)
        old_tok = model.tokenizer
        backbone = model.backbone
        emb = backbone.get_input_embeddings()
        if not isinstance(emb, nn.Embedding):
            raise NotImplementedError(
                f"{self.name}: the backbone's input embeddings are {type(emb).__name__}, "
                "not an nn.Embedding"
            )
        if backbone.get_output_embeddings() is not None:
            raise NotImplementedError(
                f"{self.name}: the backbone has an output (LM head) embedding; trim a bare encoder"
            )
        n_rows, hidden = emb.weight.shape
        vocab = old_tok.get_vocab()
        if max(vocab.values()) >= n_rows:
            raise ValueError(
                f"{self.name}: the tokenizer has id {max(vocab.values())} but the embedding "
                f"table only {n_rows} rows"
            )

        # what to keep
        mandatory = self.mandatory_ids(old_tok, spec)
        usage = _Usage(old_tok, spec)
        counts, n_unk_words = usage.counts(texts, n_rows)
        used = np.flatnonzero(counts)
        is_mand = np.zeros(n_rows, bool)
        is_mand[mandatory] = True
        extra = used[~is_mand[used]]
        n_all = int(mandatory.size + extra.size)
        if self.keep:
            if self.keep < mandatory.size:
                raise ValueError(
                    f"{self.spec}: keep={self.keep} is below the {mandatory.size} mandatory "
                    f"pieces (special and marker tokens, punctuation"
                    f"{', single characters' if self.single_chars else ''}); use keep >= "
                    f"{mandatory.size}{' or single_chars=false' if self.single_chars else ''}"
                )
            room = self.keep - int(mandatory.size)
            if room < extra.size:
                order = np.lexsort((extra, -counts[extra]))  # count desc, then lower id
                extra = np.sort(extra[order[:room]])
        kept = np.union1d(mandatory, extra).astype(np.int64)  # sorted: old relative order
        id_map = np.full(n_rows, -1, np.int64)
        id_map[kept] = np.arange(kept.size, dtype=np.int64)

        # the new tokenizer and model (the input is never mutated)
        by_id = {i: t for t, i in vocab.items()}
        missing = [int(i) for i in kept if int(i) not in by_id]
        if missing:
            raise ValueError(f"{self.name}: ids {missing[:5]} have no token in the tokenizer")
        new_tok = _new_tokenizer(old_tok, [by_id[int(i)] for i in kept], id_map)
        new = deepcopy(model, memo={id(old_tok): None})
        new.tokenizer = new_tok
        nb = new.backbone
        old_w = emb.weight
        pad = emb.padding_idx
        new_pad = None if pad is None else int(id_map[pad])
        if pad is not None and new_pad < 0:  # pad is special, hence mandatory
            raise RuntimeError(f"{self.name}: the padding row {pad} was removed")
        new_emb = nn.Embedding(
            int(kept.size), hidden, padding_idx=new_pad, dtype=old_w.dtype, device=old_w.device
        )
        with torch.no_grad():
            new_emb.weight.copy_(old_w.detach().index_select(0, torch.as_tensor(kept, device=old_w.device)))
        new_emb.weight.requires_grad_(old_w.requires_grad)
        new_emb.train(emb.training)
        nb.set_input_embeddings(new_emb)
        cfg = nb.config
        cfg.vocab_size = int(kept.size)
        remapped = {}
        for attr in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id",
                     "cls_token_id", "mask_token_id", "unk_token_id", "decoder_start_token_id"):
            v = getattr(cfg, attr, None)
            if isinstance(v, int) and 0 <= v < n_rows:
                nv = int(id_map[v])
                setattr(cfg, attr, nv if nv >= 0 else None)
                remapped[attr] = [v, nv if nv >= 0 else None]

        # the promise, checked on every calibration text: the same ids through id_map
        changed = usage.changed(new_tok, texts, id_map)
        if self.keep == 0 and changed:
            raise RuntimeError(
                f"{self.spec}: {changed} calibration texts tokenize differently after trimming; "
                "this is a bug in vocabtrim"
            )

        row_bytes = hidden * old_w.element_size()
        report = StepReport(
            step=self.spec,
            stage="table",
            kept_fraction=kept.size / n_rows,
            bytes_before=int(n_rows * row_bytes),
            bytes_after=int(kept.size * row_bytes),
            seconds=time.perf_counter() - t0,
            lossless=False,
            details={
                "rows_before": int(n_rows),
                "rows_after": int(kept.size),
                "mandatory": int(mandatory.size),
                "used": int(used.size),
                "used_kept": int(np.count_nonzero(id_map[used] >= 0)),
                "mandatory_or_used": n_all,
                "calibration_texts": len(texts),
                "calibration_tokens": int(counts.sum()),
                "calibration_texts_changed": int(changed),
                "unk_words": int(n_unk_words),
                "config_ids": remapped,
            },
        )
        return TableResult(new, id_map, report)


def query_token_change_share(old_model: Any, new_model: Any, spec: Any,
                             queries: Sequence[str]) -> float:
    """Share of ``queries`` whose query-path token sequence (as text pieces) changes under
    ``new_model``'s tokenizer: a report on held-out text (e.g. test queries), not tuning.

    Pieces are compared as strings (``convert_ids_to_tokens``), [MASK] augmentation and
    truncation included, so an id renumbering alone is no change.
    """
    from retrieval_prune.encode.model import TextTokenizer

    queries = _check_texts("query_token_change_share", queries)
    a = TextTokenizer(old_model.tokenizer, spec).queries(queries)
    b = TextTokenizer(new_model.tokenizer, spec).queries(queries)
    conv_a, conv_b = old_model.tokenizer.convert_ids_to_tokens, new_model.tokenizer.convert_ids_to_tokens
    changed = sum(conv_a(x) != conv_b(y) for x, y in zip(a.ids, b.ids, strict=True))
    return changed / len(queries)
