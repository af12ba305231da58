"""``dare``: drop-and-rescale of a fine-tune's change over its base (DARE, and DAREx-q).

DARE (Yu et al., *Language Models are Super Mario*, ICML 2024): the delta ``d = W_ft - W_base``
of every fine-tuned tensor is dropped entry-wise with probability ``p`` and the survivors are
rescaled by ``1 / (1 - p)``, which keeps the expected output; the merged weight is ``W_base +
m * d / (1 - p)``. DAREx-q (Deng et al., *DARE the Extreme*, ICLR 2025) replaces ``1 - p`` by a
``q`` chosen to minimise the change of the last layer's output on one calibration batch (at
large ``p`` the ``1/(1-p)`` rescale overshoots). ``mode=magnitude`` keeps the largest
``1 - p`` share of each tensor's delta entries with no rescale (the usual baseline).

Tensors the base lacks (the ColBERT projection) stay dense; tensors the fine-tune left
unchanged (the frozen word embeddings) have a zero delta and are stored as nothing. The
result is saved as a **delta checkpoint** naming the base by sha256 (bitmask + values of each
kept delta); ``p=0`` rebuilds the fine-tuned checkpoint bit for bit.

Examples
--------
>>> from retrieval_prune import registry
>>> registry.build("dare:p=0.9").spec
'dare:p=0.9,mode=dare,seed=0'
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import numpy as np
import torch

from retrieval_prune.encode.checkpoint import stored_bytes
from retrieval_prune.preprocess.base import ModelContext, ModelPreprocessor, ModelResult, StepReport
from retrieval_prune.preprocess.model._common import clone_model, dense_bytes, exact_topk_mask
from retrieval_prune.registry import Param, register

__all__ = ["Dare", "check_fine_tune_of", "drop_mask"]

_MODES = ("dare", "darex-q", "magnitude")
#: DAREx-q's search grid for q: geometric from (1 - p) / 2 up to 1 (no rescale)
_Q_POINTS = 21


@register
class Dare(ModelPreprocessor):
    """Drop ``p`` of each fine-tuned tensor's delta over the base; rescale the rest.

    Parameters
    ----------
    p : float in [0, 0.999]
        Drop rate of the delta entries.
    mode : {"dare", "darex-q", "magnitude"}
        ``dare``: random mask, rescale ``1/(1-p)``; ``darex-q``: random mask, rescale ``1/q``
        with ``q`` minimising the last layer's change on the calibration batches;
        ``magnitude``: keep the largest ``1-p`` of each tensor's delta, no rescale.
    seed : int
        Seed of the random masks (one generator per tensor, by position).
    """

    name: ClassVar[str] = "dare"
    params: ClassVar[dict[str, Param]] = {
        "p": Param(0.9, float, "drop rate of the delta entries", low=0.0, high=0.999),
        "mode": Param("dare", str, "dare | darex-q | magnitude", choices=_MODES),
        "seed": Param(0, int, "seed of the random masks", low=0),
    }
    needs_base: ClassVar[bool] = True
    identity_params: ClassVar[dict[str, Any] | None] = {"p": 0.0}

    def _apply(self, model: Any, context: ModelContext) -> ModelResult:
        t0 = time.perf_counter()
        if self.mode == "darex-q" and not context.calibration:
            raise ValueError(f"{self.spec} needs a calibration batch (training pairs: --data NAME)")
        base = context.base
        ft = {k: v.detach() for k, v in model.state_dict().items()}
        p = float(self.p)
        masks: dict[str, torch.Tensor] = {}
        deltas: dict[str, torch.Tensor] = {}
        n_delta = n_kept = 0
        check_fine_tune_of(self.spec, ft, base)
        for i, (name, w) in enumerate(ft.items()):
            b = base.get(name)
            if b is None or b.shape != w.shape or not w.is_floating_point():
                continue  # new tensor: stays dense
            d = w - b
            if not bool(d.any()):
                continue  # frozen: stored as nothing
            if self.mode == "magnitude" and p > 0.0:
                m = exact_topk_mask(d.abs(), int(round((1.0 - p) * d.numel())))
            else:
                m = drop_mask(w.shape, p, int(self.seed), i)
            masks[name] = m
            deltas[name] = d
            n_delta += d.numel()
            n_kept += int(m.sum())
        if not masks:
            raise ValueError(
                f"{self.spec}: the model does not differ from the base (nothing to drop); "
                "is --checkpoint the base itself?"
            )
        q = 1.0 - p
        q_curve: list[tuple[float, float]] = []
        if self.mode == "darex-q" and p > 0:
            q, q_curve = self._search_q(model, base, ft, masks, deltas, context.calibration, p)
        scale = 1.0 if self.mode == "magnitude" else 1.0 / q
        out = clone_model(model)
        _write_merged(out, ft, base, masks, deltas, scale)
        ident = context.base_identity or {}
        before = dense_bytes(model)
        after = stored_bytes(out.state_dict(), masks, (base, ident))
        report = StepReport(
            step=self.spec,
            stage="model",
            kept_fraction=n_kept / max(n_delta, 1),
            bytes_before=before,
            bytes_after=after,
            seconds=time.perf_counter() - t0,
            lossless=p == 0.0,
            details={
                "delta_params": n_delta,
                "kept": n_kept,
                "rescale": scale,
                "q": q,
                "q_curve": [[float(a), float(b)] for a, b in q_curve],
                "base": ident,
            },
        )
        return ModelResult(out, masks, dict(ident), report)

    def _search_q(self, model, base, ft, masks, deltas, calibration, p):
        """q on a geometric grid from ``(1 - p) / 2`` to 1 (and ``1 - p``) minimising the mean squared change of
        the last hidden states (before projection and normalisation) on the calibration
        batches, against the fine-tuned model."""
        ref = _last_hidden(model, calibration)
        probe = clone_model(model)
        # both sides of DARE's own q = 1 - p: a smaller rescale (q up to 1) and a larger one
        # (q down to (1 - p) / 2), plus 1 - p itself
        grid = np.unique(np.concatenate([np.geomspace(0.5 * (1.0 - p), 1.0, _Q_POINTS),
                                         [1.0 - p]]))
        curve = []
        for q in grid:
            _write_merged(probe, ft, base, masks, deltas, 1.0 / float(q))
            got = _last_hidden(probe, calibration)
            err = float(np.mean([((a - b) ** 2).sum().item() / max(int(mk.sum()), 1)
                                 for (a, mk), (b, _) in zip(got, ref, strict=True)]))
            curve.append((float(q), err))
        best = min(curve, key=lambda t: (t[1], -t[0]))
        return best[0], curve


def drop_mask(shape: Any, p: float, seed: int, index: int) -> torch.Tensor:
    """DARE's keep-mask of one tensor: each entry kept with probability ``1 - p`` (all of them
    at ``p == 0``), from one generator per ``(seed, index)``."""
    if p == 0.0:
        return torch.ones(shape, dtype=torch.bool)
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))
    return torch.rand(shape, generator=gen, dtype=torch.float64) >= p


def check_fine_tune_of(spec: str, state: dict[str, torch.Tensor],
                       base: dict[str, torch.Tensor]) -> None:
    """Refuse a model none of whose tensors has a base tensor's name and shape."""
    if not any(n in base and base[n].shape == w.shape for n, w in state.items()):
        raise ValueError(
            f"{spec}: no tensor of the model has the base's name and shape; it is not "
            "a fine-tune of this base (pass the right one: --base FOLDER)"
        )


def _write_merged(model, ft, base, masks, deltas, scale: float) -> None:
    """Set ``model``'s weights to ``base + mask * delta * scale`` (exactly the fine-tuned
    weight where ``scale == 1`` and the mask keeps the entry)."""
    sd = model.state_dict()
    with torch.no_grad():
        for name, m in masks.items():
            b = base[name]
            if scale == 1.0:
                merged = torch.where(m, ft[name], b)
            else:
                merged = torch.where(m, b + deltas[name] * scale, b)
            sd[name].copy_(merged)


def _last_hidden(model, batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    with torch.inference_mode():
        for bt in batches:
            h = model.backbone(
                input_ids=bt.input_ids, attention_mask=bt.attention_mask, return_dict=True
            ).last_hidden_state
            mk = bt.attention_mask.bool()
            out.append((h[mk].float(), mk))
    return out
