"""``loraprune``: structured pruning of attention heads and FFN channels guided by LoRA
gradients, with LoRA recovery (Zhang et al., *LoRAPrune: Structured Pruning Meets Low-Rank
Parameter-Efficient Fine-Tuning*, Findings of ACL 2024).

The encoder is frozen and LoRA adapters (``A``: r x in, seeded Kaiming-uniform as
``nn.Linear``; ``B``: out x r, zero; scale ``alpha / r``) are added to every transformer
layer's attention query/key/value/output and FFN intermediate/output matrices. For ``T``
optimizer steps of the training recipe (``context.loss_fn`` on ``context.batches(step)``,
AdamW on the LoRA parameters only, gradient norm clipped at 1, learning rate warmed up over
the first 10% of the steps then decayed linearly):

1. **Criterion** (the paper's Eq. 7-8 as its code computes it): the gradient of the merged
   weight ``W + s·BA`` is estimated from the LoRA gradients alone, ``G ≈ G_B·A + B·G_A −
   G_B·G_A`` (no full-weight gradient is ever formed), and each weight's importance is
   ``|(W + s·BA) ⊙ G|``. A head sums it over its rows of query, key and value and its
   columns of the attention output; an FFN channel over its row of the intermediate and its
   column of the output matrix. Each matrix's group scores are divided by their L2 norm
   before the matrices of a group are added (as the paper's code does), and the result is
   smoothed over steps: ``Ī ← beta·Ī + (1 − beta)·I``.
2. **Schedule**: after step ``s`` (1-based) of the first ``T_p = ceil(2T/3)`` steps, a share
   ``ratio·(1 − (1 − s/T_p)^3)`` of each layer's heads and of its FFN channels is masked
   (cubic; masks only grow): the unmasked structures with the lowest ``Ī`` join the mask.
   Masking zeroes the structure's outputs (query/key/value rows of a head, the intermediate
   pre-activation of a channel: GELU(0) = 0), which is exactly what removing it does. The
   remaining ``T − T_p`` steps recover with LoRA under the final mask.
3. **Export**: LoRA is merged (``W + s·BA``) and the masked heads (``transformers``'
   ``prune_heads``, recorded in ``config.pruned_heads``) and FFN channels (rows of the
   intermediate, columns of the output; the checkpoint records the widths per layer) are
   removed, so the saved model is smaller and faster, not just sparse.

Widths: every pruned layer loses ``floor(ratio·n + 1/2)`` of its ``n`` heads and of its
``n`` FFN channels (round half up); the last layer is never pruned with ``keep_last``
(the paper's code also keeps it). A layer that would lose every head or channel is an error.

Controls, same widths and the same number of steps: ``mode=random`` picks the removed
heads/channels uniformly at random (seeded; masked on the same cubic schedule) and recovers
with the same LoRA steps; ``mode=scratch`` builds the pruned shapes, re-initialises every
weight the way BERT does (normal, std ``initializer_range``; LayerNorm 1/0; biases 0) and
trains all weights for the same steps (Liu et al., *Rethinking the Value of Network Pruning*).

The step runs in float32, dropout on (the recipe's train mode), under its own seeded torch
generator state (the caller's global RNG is left as it was), so the same spec and context
give the same model bit for bit.

Examples
--------
>>> from retrieval_prune import registry
>>> registry.build("loraprune:ratio=0.3").spec
'loraprune:ratio=0.3,rank=8,alpha=16.0,steps=0,lr=0.0003,beta=0.9,keep_last=true,mode=lora,seed=0,distill=0.0'
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retrieval_prune.preprocess.base import ModelContext, ModelPreprocessor, ModelResult, StepReport
from retrieval_prune.preprocess.model._common import clone_model, dense_bytes
from retrieval_prune.registry import Param, register

__all__ = [
    "LoRAPrune",
    "removed_count",
    "cubic_share",
    "prune_structures",
    "bert_layers",
]

_MODES = ("lora", "random", "scratch")
#: share of the steps over which the cubic schedule reaches ``ratio`` (T_p / T)
_PRUNE_SHARE = 2.0 / 3.0
#: learning-rate warm-up share of the steps
_WARMUP = 0.1
_CLIP = 1.0
#: AdamW weight decay of ``mode=scratch`` (matrices only, as the training recipe)
_WEIGHT_DECAY = 0.01
_CRITERION = (
    "|(W + s*B@A) * (G_B@A + B@G_A - G_B@G_A)| summed per head (q,k,v rows, attention-output "
    "columns) and per FFN channel (intermediate row, output column), each matrix's group "
    "scores L2-normalised, moving average beta"
)


def removed_count(ratio: float, n: int) -> int:
    """Structures removed out of ``n`` at ``ratio``: ``floor(ratio·n + 1/2)`` (round half up,
    robust to float noise: ``0.3·5 = 1.5 -> 2``, ``0.25·2 = 0.5 -> 1``)."""
    return int(math.floor(round(float(ratio) * int(n), 9) + 0.5))


def cubic_share(ratio: float, step: int, prune_steps: int) -> float:
    """Pruned share after ``step`` (1-based) optimizer steps of a cubic schedule reaching
    ``ratio`` at ``prune_steps``: ``ratio·(1 − (1 − min(step/prune_steps, 1))^3)``."""
    if prune_steps <= 0:
        return float(ratio)
    x = min(max(step / prune_steps, 0.0), 1.0)
    return float(ratio) * (1.0 - (1.0 - x) ** 3)


def bert_layers(model: Any) -> Any:
    """The transformer layers of a BERT-like backbone (``backbone.encoder.layer``)."""
    bb = getattr(model, "backbone", model)
    try:
        layers = bb.encoder.layer
        for lay in layers:
            a = lay.attention
            _ = (a.self.query, a.self.key, a.self.value, a.output.dense,
                 lay.intermediate.dense, lay.output.dense, a.self.attention_head_size)
    except AttributeError as exc:
        raise NotImplementedError(
            "loraprune needs a BERT-like backbone (encoder.layer[i].attention.self.query/key/"
            f"value, attention.output.dense, intermediate.dense, output.dense); "
            f"{type(bb).__name__} has another layout"
        ) from exc
    return layers


def prune_structures(
    model: Any, heads: dict[int, list[int]], channels: dict[int, list[int]]
) -> None:
    """Remove heads and FFN channels from ``model`` in place.

    heads : layer -> positions (0 .. current heads − 1) of the heads to remove; mapped to the
        original head numbering that ``transformers``' ``prune_heads`` and
        ``config.pruned_heads`` use (a backbone pruned before keeps its earlier record).
    channels : layer -> positions of the FFN channels to remove (rows of the intermediate
        matrix and bias, columns of the output matrix; the output bias stays).
    """
    bb = getattr(model, "backbone", model)
    layers = bert_layers(bb)
    n_orig = int(bb.config.num_attention_heads)
    to_prune: dict[int, list[int]] = {}
    for i, pos in heads.items():
        if not len(pos):
            continue
        att = layers[i].attention
        alive = [h for h in range(n_orig) if h not in att.pruned_heads]
        if len(alive) != att.self.num_attention_heads:
            raise RuntimeError(f"layer {i}: head bookkeeping of transformers is inconsistent")
        if len(set(pos)) >= len(alive):
            raise ValueError(f"pruning would empty layer {i} (all {len(alive)} heads)")
        to_prune[int(i)] = sorted(alive[int(p)] for p in pos)
    if to_prune:
        bb.prune_heads(to_prune)
    for i, pos in channels.items():
        if not len(pos):
            continue
        lay = layers[i]
        inter, out = lay.intermediate.dense, lay.output.dense
        n = int(inter.out_features)
        drop = np.zeros(n, dtype=bool)
        drop[np.asarray(sorted(set(int(p) for p in pos)), dtype=np.int64)] = True
        if drop.all():
            raise ValueError(f"pruning would empty layer {i} (all {n} FFN channels)")
        keep = torch.from_numpy(np.flatnonzero(~drop))
        w_in = inter.weight.detach()
        new_in = nn.utils.skip_init(nn.Linear, inter.in_features, keep.numel(),
                                    bias=inter.bias is not None, dtype=w_in.dtype,
                                    device=w_in.device)
        new_out = nn.utils.skip_init(nn.Linear, keep.numel(), out.out_features,
                                     bias=out.bias is not None, dtype=w_in.dtype,
                                     device=w_in.device)
        with torch.no_grad():
            new_in.weight.copy_(w_in[keep])
            if inter.bias is not None:
                new_in.bias.copy_(inter.bias.detach()[keep])
            new_out.weight.copy_(out.weight.detach()[:, keep])
            if out.bias is not None:
                new_out.bias.copy_(out.bias.detach())
        new_in.weight.requires_grad_(inter.weight.requires_grad)
        new_out.weight.requires_grad_(out.weight.requires_grad)
        lay.intermediate.dense = new_in
        lay.output.dense = new_out


# -- LoRA ---------------------------------------------------------------------------------
class _LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus ``s·B·A``; an optional 0/1 mask on the output features."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float, gen: torch.Generator):
        super().__init__()
        self.base = base
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype))
        with torch.no_grad():  # nn.Linear's own default init, seeded
            nn.init.kaiming_uniform_(self.lora_A, a=5**0.5, generator=gen)
        self.scaling = float(scaling)
        self.out_mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling
        if self.out_mask is not None:
            y = y * self.out_mask
        return y

    def merge(self) -> nn.Linear:
        """The base Linear with ``s·B·A`` added (left untouched while ``B`` is zero)."""
        with torch.no_grad():
            if bool(self.lora_B.any()):
                self.base.weight.add_((self.lora_B @ self.lora_A) * self.scaling)
        return self.base

    def importance(self) -> torch.Tensor:
        """``|(W + s·BA) ⊙ (G_B·A + B·G_A − G_B·G_A)|`` from the LoRA gradients."""
        a, b = self.lora_A.detach(), self.lora_B.detach()
        ga = self.lora_A.grad
        gb = self.lora_B.grad
        ga = torch.zeros_like(a) if ga is None else ga.detach()
        gb = torch.zeros_like(b) if gb is None else gb.detach()
        g = gb @ a + b @ ga - gb @ ga
        return (g * (self.base.weight.detach() + (b @ a) * self.scaling)).abs()


#: (submodule path inside a layer, kind): ``rows`` = the structure's output rows
_ATTN = (("attention.self.query", "rows"), ("attention.self.key", "rows"),
         ("attention.self.value", "rows"), ("attention.output.dense", "cols"))
_FFN = (("intermediate.dense", "rows"), ("output.dense", "cols"))


def _get(mod: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


def _set(mod: nn.Module, path: str, new: nn.Module) -> None:
    *parent, last = path.split(".")
    for part in parent:
        mod = getattr(mod, part)
    setattr(mod, last, new)


@dataclass
class _LayerPlan:
    index: int
    heads: int
    head_dim: int
    ffn: int
    prune: bool
    n_heads_removed: int
    n_ffn_removed: int
    head_removed: np.ndarray  # bool (heads,)
    ffn_removed: np.ndarray  # bool (ffn,)
    head_imp: torch.Tensor  # float64 (heads,) moving average
    ffn_imp: torch.Tensor  # float64 (ffn,)
    head_order: np.ndarray | None = None  # random mode: removal order
    ffn_order: np.ndarray | None = None


def _norm(s: torch.Tensor) -> torch.Tensor:
    s = s.double()
    return s / (torch.linalg.norm(s) + 1e-8)


def _lr_factor(step: int, total: int) -> float:
    """Linear warm-up over the first 10% of the steps, then linear decay (> 0 at the end)."""
    w = max(1, math.ceil(_WARMUP * total))
    if step < w:
        return (step + 1) / w
    return (total - step) / max(total - w, 1)


@register
class LoRAPrune(ModelPreprocessor):
    """Structured pruning of heads and FFN channels, LoRA-gradient criterion, LoRA recovery.

    Parameters
    ----------
    ratio : float in [0, 0.9]
        Share of the attention heads and of the FFN channels removed in every pruned layer
        (``floor(ratio·n + 1/2)`` of ``n``).
    rank, alpha : LoRA rank ``r`` and scale numerator (scale ``alpha / r``).
    steps : int >= 0
        Optimizer steps; 0 = ``context.steps``.
    lr : float >= 0
        AdamW learning rate (LoRA parameters; every weight with ``mode=scratch``).
    beta : float in [0, 0.999]
        Moving-average factor of the importance (the paper's code: 0.9).
    keep_last : bool
        Never prune the last transformer layer.
    mode : {"lora", "random", "scratch"}
        The method; random heads/channels with the same recovery; the same shapes
        re-initialised and trained from scratch.
    seed : int
        LoRA initialisation, dropout, random choices, scratch initialisation.
    distill : float in [0, 1]
        Weight of distillation from the input model during the recovery: the loss is
        ``(1 - distill) * recipe loss + distill * KL(teacher || student)`` over each query's
        in-batch MaxSim scores, the teacher being the unpruned input (frozen, eval mode). 0 is
        the paper's recipe (needs a context ``loss_fn`` that takes ``teacher=``/``distill=``
        keywords, as :func:`retrieval_prune.train.recipe.training_context`'s does).
    """

    name: ClassVar[str] = "loraprune"
    params: ClassVar[dict[str, Param]] = {
        "ratio": Param(0.3, float, "share of heads and FFN channels removed per layer",
                       low=0.0, high=0.9),
        "rank": Param(8, int, "LoRA rank r", low=1),
        "alpha": Param(16.0, float, "LoRA alpha (scale alpha/r)", low=0.0),
        "steps": Param(0, int, "optimizer steps (0 = the context's)", low=0),
        "lr": Param(3e-4, float, "AdamW learning rate", low=0.0),
        "beta": Param(0.9, float, "moving-average factor of the importance", low=0.0,
                      high=0.999),
        "keep_last": Param(True, bool, "never prune the last transformer layer"),
        "mode": Param("lora", str, "lora | random | scratch", choices=_MODES),
        "seed": Param(0, int, "seed of LoRA init, dropout, random choices", low=0),
        "distill": Param(0.0, float, "weight of KL distillation from the input model",
                         low=0.0, high=1.0),
    }
    needs_training: ClassVar[bool] = True
    #: lr=0 leaves B at zero, so nothing merges and nothing is pruned, whatever the steps
    identity_params: ClassVar[dict[str, Any] | None] = {"ratio": 0.0, "lr": 0.0}

    # -- planning ---------------------------------------------------------------------------
    def _plan(self, model: Any) -> list[_LayerPlan]:
        layers = bert_layers(model)
        ratio = float(self.ratio)
        plans = []
        for i, lay in enumerate(layers):
            sa = lay.attention.self
            nh, hd = int(sa.num_attention_heads), int(sa.attention_head_size)
            nf = int(lay.intermediate.dense.out_features)
            prune = ratio > 0 and not (self.keep_last and i == len(layers) - 1)
            rh = removed_count(ratio, nh) if prune else 0
            rf = removed_count(ratio, nf) if prune else 0
            if rh >= nh or rf >= nf:
                what = f"{rh} of {nh} heads" if rh >= nh else f"{rf} of {nf} FFN channels"
                raise ValueError(
                    f"{self.spec}: pruning would empty layer {i} (removing {what}); "
                    "lower ratio"
                )
            plans.append(_LayerPlan(
                i, nh, hd, nf, prune, rh, rf, np.zeros(nh, bool), np.zeros(nf, bool),
                torch.zeros(nh, dtype=torch.float64), torch.zeros(nf, dtype=torch.float64),
            ))
        return plans

    def _random_orders(self, plans: list[_LayerPlan]) -> None:
        for p in plans:
            p.head_order = np.random.default_rng([int(self.seed), p.index, 0]).permutation(p.heads)
            p.ffn_order = np.random.default_rng([int(self.seed), p.index, 1]).permutation(p.ffn)

    # -- the step ---------------------------------------------------------------------------
    def _apply(self, model: Any, context: ModelContext) -> ModelResult:
        t0 = time.perf_counter()
        if float(self.alpha) <= 0:
            raise ValueError(f"{self.spec}: alpha must be > 0")
        total = int(self.steps) if int(self.steps) > 0 else int(context.steps or 0)
        if total < 0:
            raise ValueError(f"{self.spec}: context.steps={context.steps!r} must be >= 0")
        plans = self._plan(model)
        n_removed = sum(p.n_heads_removed + p.n_ffn_removed for p in plans)
        if self.mode == "lora" and n_removed and total == 0:
            raise ValueError(
                f"{self.spec}: the LoRA-gradient criterion needs at least one training step "
                "(steps=N or a context with steps > 0)"
            )
        out = clone_model(model)
        flags = {n: p.requires_grad for n, p in out.named_parameters()}
        params_before = sum(p.numel() for p in model.parameters())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.seed))
            if self.mode == "scratch":
                info = self._scratch(out, plans, total, context, model)
            else:
                info = self._lora(out, plans, total, context, model)
        for n, p in out.named_parameters():
            p.requires_grad_(flags.get(n, True))
        out.eval()
        params_after = sum(p.numel() for p in out.parameters())
        layers_after = bert_layers(out)
        details = {
            "mode": self.mode,
            "steps": total,
            "prune_steps": info.pop("prune_steps"),
            "heads_before": [p.heads for p in plans],
            "heads_per_layer": [int(la.attention.self.num_attention_heads)
                                for la in layers_after],
            "ffn_before": [p.ffn for p in plans],
            "ffn_per_layer": [int(la.intermediate.dense.out_features) for la in layers_after],
            "pruned_layers": [p.index for p in plans if p.prune],
            "removed_heads": {str(p.index): np.flatnonzero(p.head_removed).tolist()
                              for p in plans if p.head_removed.any()},
            "removed_ffn": {str(p.index): np.flatnonzero(p.ffn_removed).tolist()
                            for p in plans if p.ffn_removed.any()},
            "params_before": int(params_before),
            "params_after": int(params_after),
            "criterion": _CRITERION if self.mode == "lora" else self.mode,
            **info,
        }
        report = StepReport(
            step=self.spec,
            stage="model",
            kept_fraction=params_after / params_before,
            bytes_before=dense_bytes(model),
            bytes_after=dense_bytes(out),
            seconds=time.perf_counter() - t0,
            lossless=False,
            details=details,
        )
        return ModelResult(out, {}, None, report)

    def _lora(self, out: Any, plans: list[_LayerPlan], total: int,
              context: ModelContext, teacher: Any) -> dict[str, Any]:
        """LoRA training with the cubic mask schedule (``lora``/``random``); merge; prune."""
        layers = bert_layers(out)
        if self.mode == "random":
            self._random_orders(plans)
        prune_steps = max(1, math.ceil(_PRUNE_SHARE * total)) if total else 0
        schedule: list[list[float]] = []
        losses: list[float] = []
        stopped: int | None = None  # the step the time budget ran out at
        if total:
            for p in out.parameters():
                p.requires_grad_(False)
            gen = torch.Generator().manual_seed(int(self.seed))
            scaling = float(self.alpha) / int(self.rank)
            wrapped: list[dict[str, _LoRALinear]] = []
            for lay in layers:
                w = {}
                for path, _ in _ATTN + _FFN:
                    w[path] = _LoRALinear(_get(lay, path), int(self.rank), scaling, gen)
                    _set(lay, path, w[path])
                wrapped.append(w)
            lora_params = [t for w in wrapped for m in w.values()
                           for t in (m.lora_A, m.lora_B)]
            opt = torch.optim.AdamW(lora_params, lr=float(self.lr), betas=(0.9, 0.999),
                                    eps=1e-8, weight_decay=0.0)
            beta = float(self.beta)
            bar = _bar(total, context.progress, "loraprune")
            try:
                for t in range(total):
                    for g in opt.param_groups:
                        g["lr"] = float(self.lr) * _lr_factor(t, total)
                    loss = self._step_loss(out, context, t, teacher)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(lora_params, _CLIP)
                    if self.mode == "lora":
                        self._update_importance(plans, wrapped, beta)
                    opt.step()
                    s = t + 1
                    if s <= prune_steps:
                        share = cubic_share(float(self.ratio), s, prune_steps)
                        changed = self._grow_masks(plans, share, final=s == prune_steps)
                        if changed:
                            self._set_masks(plans, wrapped)
                        schedule.append([s, round(share, 6),
                                         int(sum(p.head_removed.sum() for p in plans)),
                                         int(sum(p.ffn_removed.sum() for p in plans))])
                    losses.append(float(loss.detach()))
                    bar.set_postfix_str(f"loss={losses[-1]:.3f}", refresh=False)
                    bar.update(1)
                    if s < total and _out_of_time(context):
                        stopped = s
                        break
            finally:
                bar.close()
            if stopped is not None and stopped < prune_steps:  # the final widths at once
                self._grow_masks(plans, float(self.ratio), final=True)
                self._set_masks(plans, wrapped)
                schedule.append([stopped, float(self.ratio),
                                 int(sum(p.head_removed.sum() for p in plans)),
                                 int(sum(p.ffn_removed.sum() for p in plans))])
            for lay, w in zip(layers, wrapped, strict=True):
                for path, m in w.items():
                    _set(lay, path, m.merge())
        elif self.mode == "random":  # no steps: the random choice at the final widths
            self._grow_masks(plans, float(self.ratio), final=True)
        self._export(out, plans)
        return {
            "prune_steps": prune_steps,
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "losses": losses,
            "schedule": schedule,
            "steps_taken": len(losses),
            "stopped_by_budget": stopped is not None,
            "rank": int(self.rank),
            "scaling": float(self.alpha) / int(self.rank),
        }

    def _scratch(self, out: Any, plans: list[_LayerPlan], total: int,
                 context: ModelContext, teacher: Any) -> dict[str, Any]:
        """Same widths (random choice), every weight re-initialised, all trained."""
        self._random_orders(plans)
        self._grow_masks(plans, float(self.ratio), final=True)
        self._export(out, plans)
        _reinit(out, int(self.seed))
        losses: list[float] = []
        if total:
            decay, no_decay = [], []
            for name, p in out.named_parameters():
                p.requires_grad_(True)
                if p.ndim < 2 or "LayerNorm" in name or name.endswith(".bias"):
                    no_decay.append(p)
                else:
                    decay.append(p)
            groups = [{"params": decay, "weight_decay": _WEIGHT_DECAY},
                      {"params": no_decay, "weight_decay": 0.0}]
            params = decay + no_decay
            opt = torch.optim.AdamW(groups, lr=float(self.lr), betas=(0.9, 0.999), eps=1e-8)
            bar = _bar(total, context.progress, "loraprune scratch")
            try:
                for t in range(total):
                    for g in opt.param_groups:
                        g["lr"] = float(self.lr) * _lr_factor(t, total)
                    loss = self._step_loss(out, context, t, teacher)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, _CLIP)
                    opt.step()
                    losses.append(float(loss.detach()))
                    bar.set_postfix_str(f"loss={losses[-1]:.3f}", refresh=False)
                    bar.update(1)
                    if t + 1 < total and _out_of_time(context):
                        break
            finally:
                bar.close()
        return {
            "prune_steps": 0,
            "steps_taken": len(losses),
            "stopped_by_budget": len(losses) < total,
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "losses": losses,
            "schedule": [],
            "init": "normal(0, initializer_range) Linear/Embedding, LayerNorm 1/0, biases 0",
        }

    # -- helpers ----------------------------------------------------------------------------
    def _step_loss(self, model: Any, context: ModelContext, step: int,
                   teacher: Any) -> torch.Tensor:
        """The context's loss of one batch; ``teacher``: the unpruned input (distill > 0)."""
        model.train()
        if float(self.distill) > 0:
            loss = context.loss_fn(model, context.batches(step), teacher=teacher,
                                   distill=float(self.distill))
        else:
            loss = context.loss_fn(model, context.batches(step))
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"{self.spec}: loss_fn must return a scalar tensor")
        if not bool(torch.isfinite(loss)):
            raise FloatingPointError(
                f"{self.spec}: loss became {float(loss)} at step {step}; lower lr={self.lr}"
            )
        return loss

    @staticmethod
    def _update_importance(plans: list[_LayerPlan], wrapped: list[dict[str, _LoRALinear]],
                           beta: float) -> None:
        new = []
        for p in plans:
            if not p.prune:
                new.append(None)
                continue
            w = wrapped[p.index]
            head = torch.zeros(p.heads, dtype=torch.float64)
            for path, kind in _ATTN:
                s = w[path].importance()
                s = s.sum(1) if kind == "rows" else s.sum(0)  # per head-dim feature
                head += _norm(s.reshape(p.heads, p.head_dim).sum(1))
            ffn = torch.zeros(p.ffn, dtype=torch.float64)
            for path, kind in _FFN:
                s = w[path].importance()
                ffn += _norm(s.sum(1) if kind == "rows" else s.sum(0))
            if not (bool(torch.isfinite(head).all()) and bool(torch.isfinite(ffn).all())):
                return  # as the paper's code: a step with NaN scores leaves the average
            new.append((head, ffn))
        for p, hf in zip(plans, new, strict=True):
            if hf is not None:
                p.head_imp.mul_(beta).add_(hf[0], alpha=1.0 - beta)
                p.ffn_imp.mul_(beta).add_(hf[1], alpha=1.0 - beta)

    def _grow_masks(self, plans: list[_LayerPlan], share: float, final: bool) -> bool:
        """Mask more structures up to ``share`` (exactly the final counts when ``final``);
        masks never shrink. Returns whether any mask changed."""
        changed = False
        for p in plans:
            if not p.prune:
                continue
            for removed, n_final, imp, order in (
                (p.head_removed, p.n_heads_removed, p.head_imp, p.head_order),
                (p.ffn_removed, p.n_ffn_removed, p.ffn_imp, p.ffn_order),
            ):
                want = n_final if final else min(removed_count(share, removed.size), n_final)
                need = want - int(removed.sum())
                if need <= 0:
                    continue
                if order is not None:  # random: the next ones of a seeded permutation
                    cand = [j for j in order if not removed[j]]
                else:  # lowest moving-average importance first, ties by position
                    score = imp.numpy().copy()
                    score[removed] = np.inf
                    cand = np.argsort(score, kind="stable").tolist()
                removed[np.asarray(cand[:need], dtype=np.int64)] = True
                changed = True
        return changed

    @staticmethod
    def _set_masks(plans: list[_LayerPlan], wrapped: list[dict[str, _LoRALinear]]) -> None:
        for p in plans:
            w = wrapped[p.index]
            if p.head_removed.any():
                keep = torch.from_numpy(~p.head_removed).to(w["attention.self.query"]
                                                            .base.weight.dtype)
                rows = keep.repeat_interleave(p.head_dim)
                for path in ("attention.self.query", "attention.self.key",
                             "attention.self.value"):
                    w[path].out_mask = rows
            if p.ffn_removed.any():
                w["intermediate.dense"].out_mask = torch.from_numpy(~p.ffn_removed).to(
                    w["intermediate.dense"].base.weight.dtype)

    @staticmethod
    def _export(out: Any, plans: list[_LayerPlan]) -> None:
        heads = {p.index: np.flatnonzero(p.head_removed).tolist() for p in plans
                 if p.head_removed.any()}
        channels = {p.index: np.flatnonzero(p.ffn_removed).tolist() for p in plans
                    if p.ffn_removed.any()}
        prune_structures(out, heads, channels)


def _out_of_time(context: ModelContext) -> bool:
    return context.deadline is not None and time.monotonic() >= context.deadline


def _bar(total: int, progress: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not progress, dynamic_ncols=True)


def _reinit(model: Any, seed: int) -> None:
    """BERT's initialisation, seeded: normal(0, initializer_range) for Linear and Embedding
    weights (padding row zero), biases zero, LayerNorm weight one / bias zero."""
    bb = getattr(model, "backbone", model)
    std = float(getattr(bb.config, "initializer_range", 0.02))
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + 7)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * std)
                if mod.bias is not None:
                    mod.bias.zero_()
            elif isinstance(mod, nn.Embedding):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * std)
                if mod.padding_idx is not None:
                    mod.weight[mod.padding_idx].zero_()
            elif isinstance(mod, nn.LayerNorm):
                if mod.weight is not None:
                    mod.weight.fill_(1.0)
                if mod.bias is not None:
                    mod.bias.zero_()
