"""Text encoders: zero-shot MiniLM token vectors and ColBERT-style checkpoints.

- :class:`Encoder` (``Encoder.load(None | "untrained-colbert" | folder)``): batched no-grad
  encoding of queries and documents into :class:`~retrieval_prune.types.MultiVectors`,
  optionally with [CLS]-attention importance per token.
- :class:`ColBERTModel`: the differentiable module (backbone + 128-d projection).
- :func:`save_checkpoint` / :func:`load_checkpoint`: safetensors + JSON folders, no pickle.
- :class:`EmbeddingCache`: encoded corpora on disk, keyed by encoder settings and data.

Names load lazily, so importing this package does not import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports lazily
    from retrieval_prune.encode.cache import EmbeddingCache  # noqa: F401
    from retrieval_prune.encode.checkpoint import (  # noqa: F401
        Checkpoint,
        colbert_spec,
        load_checkpoint,
        save_checkpoint,
    )
    from retrieval_prune.encode.encoder import UNTRAINED_COLBERT, Encoder  # noqa: F401
    from retrieval_prune.encode.model import ColBERTModel, TokenizerSpec  # noqa: F401

_LAZY = {
    "Encoder": "encoder",
    "UNTRAINED_COLBERT": "encoder",
    "ColBERTModel": "model",
    "TokenizerSpec": "model",
    "save_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "colbert_spec": "checkpoint",
    "Checkpoint": "checkpoint",
    "EmbeddingCache": "cache",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"retrieval_prune.encode.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'retrieval_prune.encode' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
