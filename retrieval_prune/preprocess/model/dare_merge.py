"""``dare_merge``: several fine-tunes of one base merged by task arithmetic over DARE-dropped deltas.

DARE (Yu et al., *Language Models are Super Mario*, ICML 2024, section 4.3): each fine-tune's
delta ``d_i = W_i - W_base`` is dropped entry-wise with probability ``p`` (its own random
mask) and rescaled by ``1 / (1 - p)``; the merged weight is Task Arithmetic's
``W_base + weight * sum_i m_i * d_i / (1 - p)``. Dropping most of each delta leaves the
deltas nearly disjoint, so they interfere less than the plain sum (``p=0``).

The model the step is applied to is fine-tune 0; the others come in
:attr:`~retrieval_prune.preprocess.base.ModelContext.others` (``preprocess --merge-with``).
Tensors the base lacks (the ColBERT projection, initialised afresh by each fine-tune) have no
delta to add: they are averaged. The result is stored as a delta over the base (bitmask of
the union of the masks + values).

Examples
--------
>>> from retrieval_prune import registry
>>> registry.build("dare_merge:p=0.9,weight=0.5").spec
'dare_merge:p=0.9,weight=0.5,seed=0'
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import torch

from retrieval_prune.encode.checkpoint import stored_bytes
from retrieval_prune.preprocess.base import ModelContext, ModelPreprocessor, ModelResult, StepReport
from retrieval_prune.preprocess.model._common import clone_model, dense_bytes
from retrieval_prune.preprocess.model.dare import check_fine_tune_of, drop_mask
from retrieval_prune.registry import Param, register

__all__ = ["DareMerge"]

#: fine-tune ``j``'s mask of tensor ``i`` is ``drop_mask(..., index=_MASK_STRIDE * j + i)``:
#: fine-tune 0 draws exactly ``dare``'s masks under the same seed
_MASK_STRIDE = 7919


@register
class DareMerge(ModelPreprocessor):
    """Merge fine-tunes of one base: Task Arithmetic over DARE-dropped, rescaled deltas.

    Parameters
    ----------
    p : float in [0, 0.999]
        Drop rate of each fine-tune's delta entries (0: plain Task Arithmetic).
    weight : float in [0, 1]
        Task Arithmetic's scale of every (rescaled) delta; 1 adds them whole, 1/n averages.
    seed : int
        Seed of the random masks (one generator per fine-tune and tensor, by position).
    """

    name: ClassVar[str] = "dare_merge"
    params: ClassVar[dict[str, Param]] = {
        "p": Param(0.9, float, "drop rate of each fine-tune's delta", low=0.0, high=0.999),
        "weight": Param(1.0, float, "Task Arithmetic scale of each delta", low=0.0, high=1.0),
        "seed": Param(0, int, "seed of the random masks", low=0),
    }
    needs_base: ClassVar[bool] = True
    #: the further fine-tunes come in ``context.others`` (``preprocess --merge-with``)
    needs_others: ClassVar[bool] = True
    #: one fine-tune, nothing dropped, weight 1: the fine-tune itself, bit for bit
    identity_params: ClassVar[dict[str, Any] | None] = {"p": 0.0, "weight": 1.0}

    def _apply(self, model: Any, context: ModelContext) -> ModelResult:
        t0 = time.perf_counter()
        base = context.base
        sds = [{k: v.detach() for k, v in model.state_dict().items()}]
        for j, other in enumerate(context.others or []):
            other = {k: v.detach() for k, v in other.items()}
            if set(other) != set(sds[0]):
                diff = sorted(set(other) ^ set(sds[0]))[:3]
                raise ValueError(f"{self.spec}: fine-tune {j + 1} has other tensors than the "
                                 f"model ({diff}...); merge fine-tunes of one architecture")
            for k, v in other.items():
                if v.shape != sds[0][k].shape:
                    raise ValueError(f"{self.spec}: fine-tune {j + 1}'s {k} has shape "
                                     f"{tuple(v.shape)}, the model's {tuple(sds[0][k].shape)}")
                if v.is_floating_point() and not bool(v.isfinite().all()):
                    raise ValueError(f"{self.spec}: fine-tune {j + 1}'s {k} contains NaN or Inf")
            sds.append(other)
        p, lam = float(self.p), float(self.weight)
        scale = lam / (1.0 - p)
        check_fine_tune_of(self.spec, sds[0], base)
        out = clone_model(model)
        osd = out.state_dict()
        masks: dict[str, torch.Tensor] = {}
        averaged: list[str] = []
        n_delta = n_kept = 0
        with torch.no_grad():
            for i, (name, w0) in enumerate(sds[0].items()):
                b = base.get(name)
                if b is None or b.shape != w0.shape or not w0.is_floating_point():
                    if w0.is_floating_point() and len(sds) > 1:  # new tensor: the mean
                        osd[name].copy_(torch.stack([sd[name] for sd in sds]).mean(0))
                        averaged.append(name)
                    continue
                total = torch.zeros_like(b)
                union = torch.zeros(b.shape, dtype=torch.bool)
                moved = []  # (fine-tune, its mask) of the fine-tunes that changed the tensor
                for j, sd in enumerate(sds):
                    d = sd[name] - b
                    if not bool(d.any()):
                        continue  # this fine-tune froze the tensor
                    m = drop_mask(b.shape, p, int(self.seed), _MASK_STRIDE * j + i)
                    total += torch.where(m, d, torch.zeros_like(d))
                    union |= m
                    n_delta += d.numel()
                    n_kept += int(m.sum())
                    moved.append((j, m))
                if not moved:
                    continue  # frozen in every fine-tune: stored as nothing
                if len(moved) == 1 and scale == 1.0:  # one delta, no rescale: its weights
                    j, m = moved[0]
                    merged = torch.where(m, sds[j][name], b)
                else:
                    merged = torch.where(union, b + total * scale, b)
                osd[name].copy_(merged)
                masks[name] = union
        if not masks:
            raise ValueError(f"{self.spec}: no fine-tune differs from the base (nothing to "
                             "merge); is --checkpoint the base itself?")
        ident = context.base_identity or {}
        report = StepReport(
            step=self.spec,
            stage="model",
            kept_fraction=n_kept / max(n_delta, 1),
            bytes_before=dense_bytes(model),
            bytes_after=stored_bytes(out.state_dict(), masks, (base, ident)),
            seconds=time.perf_counter() - t0,
            lossless=len(sds) == 1 and p == 0.0 and lam == 1.0,
            details={
                "fine_tunes": len(sds),
                "delta_params": n_delta,
                "kept": n_kept,
                "rescale": scale,
                "averaged": averaged,
                "stored_entries": int(sum(int(m.sum()) for m in masks.values())),
                "base": ident,
            },
        )
        return ModelResult(out, masks, dict(ident), report)
