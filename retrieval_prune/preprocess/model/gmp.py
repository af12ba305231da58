"""``gmp``: global magnitude pruning with a minimum kept fraction per layer.

One threshold over the absolute values of every Linear weight of the encoder (attention,
FFN, projection) removes the smallest ``sparsity`` share of them; a layer never keeps fewer
than ``min_keep`` of its own weights (the "minimum threshold" of Gupta et al., *Is Complexity
Required for Neural Network Pruning? A Case Study on Global Magnitude Pruning*, 2022), which
stops the global threshold from emptying a layer. The budget is exact: ``round((1 -
sparsity) * N)`` weights stay over all ``N`` Linear weights (ties broken by position).

The result is unstructured sparsity: the checkpoint stores the pruned matrices as bitmask +
values (smaller on disk), but dense matrix multiplies run at the same speed — the results
table reports latency as measured, with no speed-up expected.

Examples
--------
>>> from retrieval_prune import registry
>>> registry.build("gmp:sparsity=0.5").spec
'gmp:sparsity=0.5,min_keep=0.02'
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import numpy as np
import torch

from retrieval_prune.encode.checkpoint import stored_bytes
from retrieval_prune.preprocess.base import ModelContext, ModelPreprocessor, ModelResult, StepReport
from retrieval_prune.preprocess.model._common import (
    clone_model,
    dense_bytes,
    exact_topk_mask,
    linear_weight_names,
)
from retrieval_prune.registry import Param, register

__all__ = ["GlobalMagnitude", "global_budget"]


def global_budget(sizes: np.ndarray, minima: np.ndarray, sorted_desc: list[np.ndarray],
                  total: int) -> np.ndarray:
    """Kept count per layer: a global threshold over all magnitudes, each layer at least its
    minimum, ``total`` in all (exact).

    ``sorted_desc[i]``: layer ``i``'s magnitudes in descending order. Layers whose minimum
    binds keep exactly their minimum; the rest share what is left by one global threshold,
    re-solved until no further minimum binds.
    """
    n = len(sizes)
    fixed = np.zeros(n, dtype=bool)
    while True:
        free = np.flatnonzero(~fixed)
        budget = total - int(minima[fixed].sum())
        if free.size == 0:
            return minima.copy()
        allv = np.concatenate([sorted_desc[i] for i in free])
        owner = np.concatenate([np.full(sizes[i], i) for i in free])
        order = np.argsort(-allv, kind="stable")[: max(budget, 0)]
        counts = np.bincount(owner[order], minlength=n)
        newly = (~fixed) & (counts < minima)
        if not newly.any():
            out = counts.copy()
            out[fixed] = minima[fixed]
            return out
        fixed |= newly


@register
class GlobalMagnitude(ModelPreprocessor):
    """Global magnitude pruning of the encoder's Linear weights (unstructured).

    Parameters
    ----------
    sparsity : float in [0, 0.99]
        Share of the Linear weights set to zero (exact count).
    min_keep : float in [0, 1]
        Each Linear weight matrix keeps at least this share of its entries (0 = off).
    """

    name: ClassVar[str] = "gmp"
    params: ClassVar[dict[str, Param]] = {
        "sparsity": Param(0.5, float, "share of Linear weights set to zero", low=0.0, high=0.99),
        "min_keep": Param(0.02, float, "minimum kept share per weight matrix (0 = off)",
                          low=0.0, high=1.0),
    }
    identity_params: ClassVar[dict[str, Any] | None] = {"sparsity": 0.0}

    def _apply(self, model: Any, context: ModelContext) -> ModelResult:
        t0 = time.perf_counter()
        out = clone_model(model)
        names = linear_weight_names(out)
        sd = out.state_dict()
        mags = [sd[n].detach().abs().reshape(-1).double().numpy() for n in names]
        sizes = np.array([m.size for m in mags], dtype=np.int64)
        total_n = int(sizes.sum())
        keep_total = int(round((1.0 - float(self.sparsity)) * total_n))
        minima = np.minimum(np.ceil(float(self.min_keep) * sizes).astype(np.int64), sizes)
        if keep_total < int(minima.sum()):
            raise ValueError(
                f"{self.spec}: keeping {keep_total} weights is below the per-layer minima "
                f"({int(minima.sum())}); lower min_keep or sparsity"
            )
        sorted_desc = [np.sort(m)[::-1] for m in mags]
        counts = global_budget(sizes, minima, sorted_desc, keep_total)
        if np.any((counts == 0) & (sizes > 0)):
            empty = [names[i] for i in np.flatnonzero(counts == 0)]
            raise ValueError(
                f"{self.spec} would empty {empty[:3]}; set min_keep > 0 or lower sparsity"
            )
        masks: dict[str, torch.Tensor] = {}
        layers: dict[str, float] = {}
        with torch.no_grad():
            for name, k in zip(names, counts, strict=True):
                w = sd[name]
                m = exact_topk_mask(w.abs(), int(k))
                w.mul_(m.to(w.dtype))
                if int(k) < w.numel():
                    masks[name] = m
                layers[name] = float(k) / w.numel()
        before = dense_bytes(model)
        after = stored_bytes(out.state_dict(), masks) if masks else before
        report = StepReport(
            step=self.spec,
            stage="model",
            kept_fraction=float(counts.sum()) / total_n,
            bytes_before=before,
            bytes_after=after,
            seconds=time.perf_counter() - t0,
            lossless=float(self.sparsity) == 0.0,
            details={
                "linear_weights": total_n,
                "kept": int(counts.sum()),
                "min_keep_binding": int(np.sum(counts == minima)) if self.min_keep else 0,
                "kept_per_matrix": layers,
            },
        )
        return ModelResult(out, masks, None, report)
