"""Contrastive MaxSim fine-tuning of the ColBERT-style encoder, optionally with CRISP.

One step: ``batch_size`` training queries, each with one positive and ``negatives`` hard
negatives (see :mod:`retrieval_prune.train.data`); every query is scored against every
document of the batch (its own hard negatives plus everyone else's positives and negatives:
in-batch negatives), and the loss is the cross-entropy of its positive. A document judged
relevant to a query is never used as that query's negative (masked), which matters on SQuAD
where several questions share a paragraph.

Score = MaxSim averaged over the query's vectors, divided by ``temperature``
(score / n_q / 0.05, so the logits have the same range for 32 query tokens and for 8 CRISP
centroids; ranking is unchanged since n_q is per query). With ``crisp`` set, both sides are
replaced by their per-sequence k-means centroids (:func:`~retrieval_prune.train.crisp.kmeans_pool`)
before scoring.

Batches come from one collection at a time, round-robin over the collections (so in-batch
negatives are in-domain and each collection gets the same number of steps).

The run stops at ``max_steps`` or when the wall-clock budget ``minutes`` (everything
included: loading, mining, saving) is spent, whichever comes first, and always saves. The
learning rate follows linear warm-up and linear decay over ``progress = max(step /
max_steps, elapsed / budget)``, so it reaches zero at the end of either. A run that ends on
its step count is deterministic under ``seed`` (up to float summation order across thread
counts); one that ends on the budget depends on the machine's speed (the config records
which).

Examples
--------
>>> cfg = TrainConfig(data=("scifact", "squad"), crisp="8x32", minutes=45, seed=0)  # doctest: +SKIP
>>> result = train(cfg, "checkpoints/crisp-8x32")                                   # doctest: +SKIP
>>> result.steps, result.path                                                        # doctest: +SKIP
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from retrieval_prune.encode.checkpoint import colbert_spec, save_checkpoint
from retrieval_prune.encode.model import ColBERTModel, TextTokenizer, Tokenized, collate
from retrieval_prune.train.crisp import CrispSpec, kmeans_pool, parse_crisp
from retrieval_prune.train.data import TrainPairs, load_pairs

__all__ = ["TrainConfig", "TrainResult", "train", "maxsim_logits", "batch_loss"]

_PRECISIONS = ("auto", "float32", "bfloat16")


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX). Without it, bf16
    autocast is emulated and far slower than float32 (measured on an AVX2-only EPYC: about
    110 s per step of the default recipe in bf16 against 5 s in float32)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
#: seconds kept back from the budget for the final save
_SAVE_RESERVE_S = 45.0


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in the checkpoint's config).

    Parameters
    ----------
    data : collection names (``"scifact"`` uses ``qrels/train.tsv``; ``"squad"`` its
        question -> paragraph pairs).
    crisp : ``None``, ``"QxD"`` (e.g. ``"8x32"``) or ``"P%"`` (e.g. ``"25%"``).
    minutes : wall-clock budget for the whole run (loading, mining, training, saving).
    max_steps : optimizer steps of the default recipe.
    seed : data order, negative sampling, projection init, dropout.
    batch_size : queries per step.
    negatives : hard negatives per query (plus all in-batch documents).
    lr, projection_lr : AdamW learning rates of the backbone and of the (fresh) projection.
    warmup : fraction of the run spent warming up.
    weight_decay : AdamW weight decay (not on biases and LayerNorm).
    temperature : logits = mean-over-query-vectors MaxSim / temperature.
    doc_maxlen, query_maxlen : training tokenization (documents truncated for speed).
    index_doc_maxlen : document length the saved checkpoint encodes with at index time.
    negative_depth : MaxSim mining depth.
    precision : ``"auto"`` (bfloat16 where the CPU has native bf16, else float32; the
        config records the choice), ``"bfloat16"`` (autocast; about 1.5x faster on
        AVX512-BF16 CPUs, many times slower without) or ``"float32"``. Weights and optimizer
        state stay float32 either way.
    threads : torch threads (None: torch's setting capped at the usable CPUs).
    freeze_embeddings : keep the word-embedding table fixed (saves a dense 30522x384
        gradient and AdamW update per step; positions and LayerNorm still train).
    save_every_minutes : also save mid-run (atomically, same folder); 0 = only at the end.
    init : start from this checkpoint (folder or shipped name) instead of the MiniLM base and a
        fresh projection. Tensors it stores masked sparse (``gmp``) stay masked: their pruned
        entries are zeroed after every optimizer step and the result is saved sparse again
        (a masked recovery run).
    dim : projection size.
    select : train on a selection of the training queries: a selection file written by
        :func:`~retrieval_prune.train.select.save_selection` (``*.json``) or a data-step spec
        that needs no scores (``semdedup:eps=0.05``, ``random_pairs:keep=0.3``). The spec,
        the source and the counts go into the checkpoint's metadata (``training.selection``).
    """

    data: tuple[str, ...] = ("scifact", "squad")
    crisp: str | None = None
    minutes: float = 45.0
    max_steps: int = 600
    seed: int = 0
    batch_size: int = 16
    negatives: int = 1
    lr: float = 3e-5
    projection_lr: float = 1e-3
    warmup: float = 0.1
    weight_decay: float = 0.01
    temperature: float = 0.05
    doc_maxlen: int = 180
    query_maxlen: int = 32
    index_doc_maxlen: int = 256
    negative_depth: int = 30
    precision: str = "auto"
    threads: int | None = None
    freeze_embeddings: bool = True
    save_every_minutes: float = 15.0
    dim: int = 128
    select: str | None = None
    init: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = (self.data,)
        self.data = tuple(self.data)
        for name in (
            "max_steps",
            "batch_size",
            "doc_maxlen",
            "query_maxlen",
            "index_doc_maxlen",
            "negative_depth",
            "dim",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be an int >= 1")
        if (
            isinstance(self.negatives, bool)
            or not isinstance(self.negatives, int)
            or self.negatives < 0
        ):
            raise ValueError(f"negatives={self.negatives!r} must be an int >= 0")
        if not (isinstance(self.minutes, (int, float)) and self.minutes > 0):
            raise ValueError(f"minutes={self.minutes!r} must be > 0")
        for name in ("lr", "projection_lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be > 0")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup={self.warmup!r} must be in [0, 1)")
        if self.precision not in _PRECISIONS:
            raise ValueError(f"precision={self.precision!r} must be one of {_PRECISIONS}")
        if self.precision == "auto":
            self.precision = "bfloat16" if native_bf16() else "float32"
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads={self.threads!r} must be an int >= 1 or None")
        if self.crisp is not None:
            parse_crisp(self.crisp)  # fail early with the parser's message
        if self.select is not None:  # -- select: a selection file or a data-step spec
            from retrieval_prune.train.select import check_select

            check_select(self.select)
            self.select = str(self.select)

    @property
    def crisp_spec(self) -> CrispSpec | None:
        return None if self.crisp is None else parse_crisp(self.crisp)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["data"] = list(self.data)
        return d


@dataclass
class TrainResult:
    """What a run did: the checkpoint folder, steps, seconds, per-step losses, why it stopped."""

    path: Path
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    stopped_by: str = "max_steps"


# -- scoring -------------------------------------------------------------------------------
def maxsim_logits(
    q: torch.Tensor,
    q_mask: torch.Tensor,
    d: torch.Tensor,
    d_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """All-pairs MaxSim, averaged over each query's vectors, divided by ``temperature``.

    Parameters
    ----------
    q : float (n_q, Lq, dim); q_mask : bool (n_q, Lq)
    d : float (n_d, Ld, dim); d_mask : bool (n_d, Ld)

    Returns
    -------
    float32 (n_q, n_d): ``sum_i max_j <q_i, d_j> / n_vectors(q) / temperature``; a document
    with no vector scores 0.
    """
    with torch.autocast(q.device.type, enabled=False):  # scores in float32 even under bf16
        sim = torch.einsum("qad,nbd->qnab", q.float(), d.float())  # (n_q, n_d, Lq, Ld)
    sim = sim.masked_fill(~d_mask[None, :, None, :], -1e4)
    best = sim.max(dim=-1).values  # (n_q, n_d, Lq)
    best = torch.where(d_mask.any(dim=1)[None, :, None], best, torch.zeros_like(best))
    qm = q_mask.to(best.dtype)
    score = (best * qm[:, None, :]).sum(-1) / qm.sum(-1).clamp_min(1.0)[:, None]
    return score / temperature


def _encode_side(model: ColBERTModel, batch, crisp: CrispSpec | None, kind: str):
    out = model(batch.input_ids, batch.attention_mask, batch.vector_mask)
    if crisp is None:
        return out.vectors, out.mask
    return kmeans_pool(out.vectors, out.mask, crisp, kind)


def batch_loss(
    model: ColBERTModel,
    q_batch,
    d_batch,
    labels: torch.Tensor,
    exclude: torch.Tensor | None = None,
    *,
    crisp: CrispSpec | None = None,
    temperature: float = 0.05,
) -> torch.Tensor:
    """Cross-entropy of each query's positive among all documents of the batch.

    ``labels`` (int64 (n_q,)) is the positive's column; ``exclude`` (bool (n_q, n_d)) masks
    other documents that are relevant to the query (never negatives).
    """
    logits = batch_logits(model, q_batch, d_batch, exclude, crisp=crisp,
                          temperature=temperature)
    return F.cross_entropy(logits, labels)


def batch_logits(
    model: ColBERTModel,
    q_batch,
    d_batch,
    exclude: torch.Tensor | None = None,
    *,
    crisp: CrispSpec | None = None,
    temperature: float = 0.05,
) -> torch.Tensor:
    """float32 (n_q, n_d) MaxSim logits of every query against every document of the batch;
    ``exclude``d entries are -inf."""
    qv, qm = _encode_side(model, q_batch, crisp, "queries")
    dv, dm = _encode_side(model, d_batch, crisp, "documents")
    logits = maxsim_logits(qv, qm, dv, dm, temperature)
    if exclude is not None:
        logits = logits.masked_fill(exclude, float("-inf"))
    return logits


def distill_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over queries of KL(softmax(teacher) || softmax(student)) over each row's documents;
    entries that are -inf in the teacher (excluded) add nothing."""
    pt = torch.softmax(teacher, dim=-1)
    terms = pt * (torch.log_softmax(teacher, dim=-1) - torch.log_softmax(student, dim=-1))
    terms = torch.where(pt > 0, terms, torch.zeros_like(terms))
    return terms.sum(-1).mean()


# -- batches -------------------------------------------------------------------------------
class _Source:
    """Tokenized queries and documents of one collection, and its batch sampler."""

    def __init__(self, pairs: TrainPairs, tok: TextTokenizer, rng: np.random.Generator):
        self.pairs = pairs
        self.rng = rng
        self.q_tok: Tokenized = tok.queries(pairs.query_texts)
        self.d_tok: Tokenized = tok.documents(pairs.doc_texts)
        self.pos_sets = [set(p.tolist()) for p in pairs.positives]
        self._order = np.zeros(0, np.int64)
        self._cursor = 0
        self.epochs = 0

    def next_queries(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            if self._cursor >= len(self._order):
                self._order = self.rng.permutation(len(self.pairs))
                self._cursor = 0
                self.epochs += 1
            take = min(n - len(out), len(self._order) - self._cursor)
            out.extend(self._order[self._cursor : self._cursor + take].tolist())
            self._cursor += take
        return out

    def batch(self, n_queries: int, n_neg: int, pad_id: int):
        """The next batch, collated: ``(query Batch, document Batch, labels, exclude)``."""
        qs, docs, labels, exclude = self.pick(n_queries, n_neg)
        return collate(self.q_tok, qs, pad_id), collate(self.d_tok, docs, pad_id), labels, exclude

    def pick(self, n_queries: int, n_neg: int):
        """The next batch as text positions: ``(queries, documents, labels, exclude)``
        (documents: each query's positive, then its ``n_neg`` hard negatives)."""
        qs = self.next_queries(min(n_queries, len(self.pairs)))
        pos_docs = [int(self.rng.choice(self.pairs.positives[i])) for i in qs]
        neg_docs: list[int] = []
        n_docs = len(self.pairs.doc_ids)
        for i in qs:
            hard = self.pairs.negatives[i]
            if len(hard) >= n_neg:
                pick = self.rng.choice(hard, size=n_neg, replace=False).tolist()
            else:
                pick = hard.tolist()
                while len(pick) < n_neg:  # top up with random non-positive documents
                    j = int(self.rng.integers(n_docs))
                    if j not in self.pos_sets[i] or len(self.pos_sets[i]) >= n_docs:
                        pick.append(j)
            neg_docs.extend(int(j) for j in pick)
        docs = pos_docs + neg_docs
        labels = torch.arange(len(qs), dtype=torch.long)
        exclude = torch.zeros((len(qs), len(docs)), dtype=torch.bool)
        for r, i in enumerate(qs):
            for c, j in enumerate(docs):
                if c != r and j in self.pos_sets[i]:
                    exclude[r, c] = True
        return qs, docs, labels, exclude


# -- the loop ------------------------------------------------------------------------------
def _param_groups(model: ColBERTModel, cfg: TrainConfig) -> list[dict[str, Any]]:
    decay, no_decay, proj = [], [], []
    for name, p in model.named_parameters():
        if cfg.freeze_embeddings and name.endswith("embeddings.word_embeddings.weight"):
            p.requires_grad_(False)
            continue
        if name.startswith("projection."):
            proj.append(p)
        elif p.ndim < 2 or "LayerNorm" in name or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
        {"params": no_decay, "lr": cfg.lr, "weight_decay": 0.0, "base_lr": cfg.lr},
    ]
    if proj:
        groups.append(
            {
                "params": proj,
                "lr": cfg.projection_lr,
                "weight_decay": 0.0,
                "base_lr": cfg.projection_lr,
            }
        )
    return [g for g in groups if g["params"]]


def _lr_factor(progress: float, warmup: float) -> float:
    progress = min(max(progress, 0.0), 1.0)
    if warmup > 0 and progress < warmup:
        return max(progress / warmup, 1e-3)
    return max((1.0 - progress) / max(1.0 - warmup, 1e-9), 0.0)


def _available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def train(
    config: TrainConfig,
    out: str | os.PathLike,
    *,
    pairs: Sequence[TrainPairs] | None = None,
    model: ColBERTModel | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> TrainResult:
    """Fine-tune and save a checkpoint at ``out`` (safetensors + config with this run's
    settings, data, steps, seconds and losses).

    Parameters
    ----------
    config : TrainConfig
    out : checkpoint folder to write.
    pairs : pre-loaded :class:`TrainPairs` (default: ``load_pairs`` of ``config.data``).
    model : start from this model (default: MiniLM + a fresh ``config.dim`` projection).
    progress : show a tqdm bar.
    overwrite : replace an existing folder at ``out``.
    """
    t_start = time.monotonic()
    budget_s = float(config.minutes) * 60.0
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    crisp = config.crisp_spec
    threads = config.threads or min(torch.get_num_threads(), _available_cpus())
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed)
        rng = np.random.default_rng(config.seed)
        if pairs is None:
            if not config.data:
                raise ValueError("no training data: give at least one collection (--data NAME)")
            pairs = [
                load_pairs(name, negatives="auto", depth=config.negative_depth, progress=progress)
                for name in config.data
            ]
        pairs = list(pairs)
        if not pairs:
            raise ValueError("no training data: pairs is empty")
        selection = None
        if config.select is not None:  # -- select: restrict to the selected queries
            from retrieval_prune.train.select import apply_selection

            pairs, selection = apply_selection(config.select, pairs, progress=progress)
        masks: dict[str, torch.Tensor] = {}
        if model is None and config.init is not None:
            from retrieval_prune.encode.checkpoint import (
                load_checkpoint,
                resolve_checkpoint,
                stored_masks,
            )

            folder = resolve_checkpoint(config.init)
            model = load_checkpoint(folder).model
            if model.dim != config.dim:
                raise ValueError(f"init={config.init!r} has dim {model.dim}, config dim={config.dim}")
            masks = stored_masks(folder)
        if model is None:
            model = ColBERTModel.from_backbone(dim=config.dim, seed=config.seed)
        params = dict(model.named_parameters())
        masked = [(params[n], m) for n, m in masks.items() if n in params]
        train_spec = colbert_spec(doc_maxlen=config.doc_maxlen, query_maxlen=config.query_maxlen)
        index_spec = colbert_spec(
            doc_maxlen=config.index_doc_maxlen, query_maxlen=config.query_maxlen
        )
        tok = TextTokenizer(model.tokenizer, train_spec)
        sources = [_Source(p, tok, np.random.default_rng(rng.integers(2**63))) for p in pairs]
        groups = _param_groups(model, config)
        opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
        trainable = [p for g in groups for p in g["params"]]
        model.train()
        autocast = torch.autocast(
            "cpu", dtype=torch.bfloat16, enabled=config.precision == "bfloat16"
        )
        losses: list[float] = []
        setup_s = time.monotonic() - t_start
        train_budget = budget_s - setup_s - _SAVE_RESERVE_S
        if train_budget <= 0:
            raise ValueError(
                f"minutes={config.minutes} leaves no time to train: loading and mining took "
                f"{setup_s:.0f} s; give more minutes"
            )
        last_save = time.monotonic()
        stopped_by = "max_steps"
        bar = tqdm(
            total=config.max_steps,
            desc="train" + (f" {crisp.label}" if crisp else ""),
            unit="step",
            disable=not progress,
            dynamic_ncols=True,
        )
        t_train = time.monotonic()
        ema = None
        step = 0

        def metadata(finished: bool) -> dict[str, Any]:
            return _metadata(
                config,
                crisp,
                pairs,
                step,
                losses,
                time.monotonic() - t_start,
                setup_s,
                stopped_by,
                finished,
                threads,
                selection,
            )

        try:
            while step < config.max_steps:
                elapsed = time.monotonic() - t_train
                if elapsed >= train_budget:
                    stopped_by = "minutes"
                    break
                src = sources[step % len(sources)]
                progress_frac = max(step / config.max_steps, elapsed / train_budget)
                factor = _lr_factor(progress_frac, config.warmup)
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * factor
                q_batch, d_batch, labels, exclude = src.batch(
                    config.batch_size, config.negatives, tok.pad_id
                )
                with autocast:
                    loss = batch_loss(
                        model,
                        q_batch,
                        d_batch,
                        labels,
                        exclude,
                        crisp=crisp,
                        temperature=config.temperature,
                    )
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"loss became {float(loss)} at step {step}; lower lr={config.lr} or "
                        "use precision='float32'"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                opt.step()
                if masked:
                    with torch.no_grad():
                        for p_, m_ in masked:
                            p_.mul_(m_)
                step += 1
                lv = float(loss.detach())
                losses.append(lv)
                ema = lv if ema is None else 0.95 * ema + 0.05 * lv
                left = max(train_budget - (time.monotonic() - t_train), 0.0)
                bar.set_postfix_str(
                    f"{src.pairs.name[:8]} loss={lv:.3f} ema={ema:.3f} lr={factor:.2f} "
                    f"budget_left={left / 60:.1f}m",
                    refresh=False,
                )
                bar.update(1)
                if (
                    config.save_every_minutes > 0
                    and time.monotonic() - last_save >= config.save_every_minutes * 60
                    and step < config.max_steps
                ):
                    save_checkpoint(model, out, metadata(False), spec=index_spec, overwrite=True,
                                    masks=masks)
                    last_save = time.monotonic()
        finally:
            bar.close()
        model.eval()
        path = save_checkpoint(
            model, out, metadata(True), spec=index_spec, overwrite=overwrite or out.exists(),
            masks=masks,
        )
        return TrainResult(path, step, time.monotonic() - t_start, losses, stopped_by)
    finally:
        torch.set_num_threads(old_threads)


def _window_means(losses: list[float], n: int = 20) -> list[float]:
    return [float(np.mean(losses[i : i + n])) for i in range(0, len(losses), n)]


def _metadata(
    config: TrainConfig,
    crisp: CrispSpec | None,
    pairs: Sequence[TrainPairs],
    step: int,
    losses: list[float],
    seconds: float,
    setup_s: float,
    stopped_by: str,
    finished: bool,
    threads: int,
    selection: dict[str, Any] | None = None,
) -> dict[str, Any]:
    import transformers

    head = losses[: min(20, len(losses))]
    tail = losses[-min(20, len(losses)) :] if losses else []
    return {
        "training": {
            "config": config.to_dict(),
            "crisp": None
            if crisp is None
            else {
                **crisp.to_dict(),
                "init": "evenly spaced kept tokens",
                "distance": "squared euclidean",
                "empty_clusters": "masked",
            },
            "data": [p.describe() for p in pairs],
            "selection": selection,  # -- select: spec, source, counts (None: all pairs)
            "steps": step,
            "seconds": round(seconds, 1),
            "setup_seconds": round(setup_s, 1),
            "stopped_by": stopped_by,
            "finished": finished,
            "threads": threads,
            "loss_first20": float(np.mean(head)) if head else None,
            "loss_last20": float(np.mean(tail)) if tail else None,
            "loss_per20": _window_means(losses),
            "objective": "cross-entropy over in-batch + hard negatives; logits = "
            "mean-over-query-vectors MaxSim / temperature",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        # how to index/search with this checkpoint so queries and documents match training
        "index_pipeline": "exact" if crisp is None else crisp.plugin_spec,
    }
