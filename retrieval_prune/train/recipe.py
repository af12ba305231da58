"""The project's training recipe as the two callables a model step needs.

A model-stage plug-in that trains (``loraprune``) lives in :mod:`retrieval_prune.preprocess`,
which may not import :mod:`retrieval_prune.train`; it receives the recipe through a
:class:`~retrieval_prune.preprocess.base.ModelContext` instead::

    loss_fn, batches = training_context(model, ["scifact"], steps=300, seed=0)
    ctx = ModelContext(loss_fn=loss_fn, batches=batches, steps=300)
    result = registry.build("loraprune:ratio=0.3").apply(model, ctx)

The recipe is :func:`~retrieval_prune.train.loop.train`'s, reused, not copied: contrastive
MaxSim (:func:`~retrieval_prune.train.loop.batch_loss`: cross-entropy of each query's positive
among every document of the batch, in-batch plus ``negatives`` hard negatives, relevant
documents never used as negatives, temperature 0.05), batches from the loop's sampler
(``_Source``, private, imported as is), one collection at a time, round-robin, seeded the way
the loop seeds it: ``batches(0), batches(1), ...`` are the batches ``train`` would draw under
the same seed. Float32 (no autocast): the model step decides its own precision.

``batches(step)`` is a function of ``step`` alone: asking for an earlier step again (a second
``apply`` with the same context) replays the sampler from the start, so two runs over one
context see the same batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from retrieval_prune.encode.checkpoint import colbert_spec
from retrieval_prune.encode.model import ColBERTModel, TextTokenizer, TokenizerSpec
from retrieval_prune.train.data import TrainPairs, load_pairs
from retrieval_prune.train.loop import (
    TrainConfig,
    _Source,
    batch_logits,
    batch_loss,
    distill_kl,
)

__all__ = ["training_context"]


def training_context(
    model: ColBERTModel,
    data: Sequence[str],
    *,
    steps: int,
    seed: int = 0,
    batch_size: int = 16,
    negatives: int = 1,
    progress: bool = True,
    pairs: Sequence[TrainPairs] | None = None,
    spec: TokenizerSpec | None = None,
) -> tuple[Callable[[Any, Any], torch.Tensor], Callable[[int], Any]]:
    """``(loss_fn, batches)`` of the training recipe over ``data``'s training pairs.

    Parameters
    ----------
    model : ColBERTModel
        Supplies the tokenizer (the model a step trains may be a copy of it).
    data : collection names (``"scifact"``, ``"squad"``); their train splits, hard negatives
        as the training command mines them (``negatives="auto"``). Ignored when ``pairs``
        is given.
    steps : int >= 0
        Optimizer steps the context is meant for (``ModelContext.steps``); ``batches`` serves
        any step, this only checks the value.
    seed : data order and negative sampling, as :class:`~retrieval_prune.train.loop.TrainConfig`.
    batch_size : training queries per batch (capped by a collection's size).
    negatives : hard negatives per query (topped up with random non-positive documents).
    progress : progress bars while loading/mining pairs.
    pairs : pre-loaded :class:`~retrieval_prune.train.data.TrainPairs` (tests: adi via
        ``load_pairs(..., split="test", allow_eval_split=True)``).
    spec : how the texts are tokenized; default: the recipe's ColBERT tokenization
        (``colbert_spec(doc_maxlen=180, query_maxlen=32)``). A given spec keeps its markers
        and query length; its documents are cut to the recipe's 180 tokens when longer.

    Returns
    -------
    loss_fn : ``loss_fn(model, batch) -> scalar tensor`` (with gradient; the caller sets
        train/eval mode).
    batches : ``batches(step) -> batch``, a tuple ``(query Batch, document Batch, labels,
        exclude)``, deterministic in ``(seed, step)``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps={steps!r} must be an int >= 0")
    if isinstance(data, str):
        data = [data]
    data = list(data)
    # TrainConfig checks batch_size/negatives/seed and holds the recipe's defaults
    cfg = TrainConfig(
        data=tuple(data) if data else ("-",),
        max_steps=max(steps, 1),
        seed=int(seed),
        batch_size=batch_size,
        negatives=negatives,
    )
    if pairs is None:
        if not data:
            raise ValueError("no training data: give at least one collection (--data NAME)")
        pairs = [
            load_pairs(name, negatives="auto", depth=cfg.negative_depth, progress=progress)
            for name in data
        ]
    pairs = list(pairs)
    if not pairs:
        raise ValueError("no training data: pairs is empty")
    for p in pairs:
        if not isinstance(p, TrainPairs):
            raise TypeError(f"pairs holds a {type(p).__name__}, expected TrainPairs")
    if model.tokenizer is None:
        raise ValueError("model.tokenizer is None; the recipe tokenizes with the model's tokenizer")
    if spec is None:
        spec = colbert_spec(doc_maxlen=cfg.doc_maxlen, query_maxlen=cfg.query_maxlen)
    elif spec.doc_maxlen > cfg.doc_maxlen:
        spec = replace(spec, doc_maxlen=cfg.doc_maxlen)
    tok = TextTokenizer(model.tokenizer, spec)
    temperature = cfg.temperature

    def make_sources() -> list[_Source]:
        rng = np.random.default_rng(cfg.seed)  # as train(): one child seed per collection
        return [_Source(p, tok, np.random.default_rng(rng.integers(2**63))) for p in pairs]

    state: dict[str, Any] = {"sources": make_sources(), "next": 0}

    def draw() -> Any:
        sources = state["sources"]
        src = sources[state["next"] % len(sources)]
        state["next"] += 1
        return src.batch(cfg.batch_size, cfg.negatives, tok.pad_id)

    def batches(step: int) -> Any:
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step={step!r} must be an int >= 0")
        step = int(step)
        if step < state["next"]:  # replay from the start: same seed, same batches
            state["sources"] = make_sources()
            state["next"] = 0
        while state["next"] < step:
            draw()
        return draw()

    def loss_fn(model: Any, batch: Any, *, teacher: Any = None,
                distill: float = 0.0) -> torch.Tensor:
        q_batch, d_batch, labels, exclude = batch
        if not distill:
            return batch_loss(model, q_batch, d_batch, labels, exclude,
                              temperature=temperature)
        if teacher is None:
            raise ValueError(f"distill={distill} needs a teacher model")
        logits = batch_logits(model, q_batch, d_batch, exclude, temperature=temperature)
        was = teacher.training
        teacher.eval()
        with torch.no_grad():
            target = batch_logits(teacher, q_batch, d_batch, exclude, temperature=temperature)
        teacher.train(was)
        ce = F.cross_entropy(logits, labels)
        return (1.0 - distill) * ce + distill * distill_kl(logits, target)

    return loss_fn, batches
