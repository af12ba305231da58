"""Helpers shared by the model plug-ins: copying a model, the Linear weights, kept budgets."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

__all__ = ["clone_model", "linear_weight_names", "exact_topk_mask", "dense_bytes"]


def clone_model(model: Any) -> Any:
    """A deep copy that shares nothing with ``model`` (the tokenizer object is reused: it is
    never modified by a model step)."""
    tok = getattr(model, "tokenizer", None)
    model.tokenizer = None
    try:
        out = copy.deepcopy(model)
    finally:
        model.tokenizer = tok
    out.tokenizer = tok
    out.eval()
    return out


def linear_weight_names(model: Any) -> list[str]:
    """State-dict names of the weight matrices of every ``nn.Linear`` the encoder uses: the
    transformer layers' attention and FFN matrices and the projection (not embeddings,
    LayerNorms, biases or the unused pooler)."""
    names = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".pooler." not in f".{mod_name}.":
            names.append(f"{mod_name}.weight")
    return names


def exact_topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of exactly ``k`` largest entries of ``scores`` (ties: lower flat index
    first), same shape."""
    flat = scores.detach().reshape(-1).double().numpy()
    k = int(max(0, min(k, flat.size)))
    mask = np.zeros(flat.size, dtype=bool)
    if k:
        order = np.argsort(-flat, kind="stable")
        mask[order[:k]] = True
    return torch.from_numpy(mask.reshape(tuple(scores.shape)))


def dense_bytes(model: Any) -> int:
    """Bytes of the model's weights stored densely (what a standalone checkpoint holds)."""
    return int(sum(t.numel() * t.element_size() for t in model.state_dict().values()))
