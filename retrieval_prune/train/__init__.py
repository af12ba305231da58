"""Contrastive MaxSim fine-tuning of the ColBERT-style encoder, with CRISP in the loop.

- :func:`train` / :class:`TrainConfig` (``retrieval-prune train``): in-batch plus hard
  negatives, MiniLM backbone + 128-d projection, a wall-clock budget, safetensors checkpoints
  that carry their training config.
- :func:`kmeans_pool` / :func:`parse_crisp`: per-sequence k-means in torch (assignments
  without gradient, centroids as masked means with gradient).
- :func:`load_pairs`: (query, positives, hard negatives) from a collection's train split.

Names load lazily, so importing this package does not import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from retrieval_prune.train.crisp import CrispSpec, kmeans_pool, parse_crisp  # noqa: F401
    from retrieval_prune.train.data import TrainPairs, load_pairs  # noqa: F401
    from retrieval_prune.train.loop import TrainConfig, TrainResult, train  # noqa: F401

_LAZY = {
    "CrispSpec": "crisp",
    "kmeans_pool": "crisp",
    "parse_crisp": "crisp",
    "TrainPairs": "data",
    "load_pairs": "data",
    "TrainConfig": "loop",
    "TrainResult": "loop",
    "train": "loop",
    "pair_sets": "select",
    "select_pairs": "select",
    "save_selection": "select",
    "load_selection": "select",
    "training_context": "recipe",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"retrieval_prune.train.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'retrieval_prune.train' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
