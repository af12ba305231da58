"""Training the top layers on cached lower-layer hidden states (long CRISP runs on a CPU).

Backpropagating through all six MiniLM layers is what limits :func:`~retrieval_prune.train.loop.train`
to about a hundred steps on this project's machines. With the embeddings and the lower
``n_frozen`` layers frozen, their output for a training text never changes: it is computed
once (:class:`LayerCache`, in eval mode: no dropout) and every step runs only the top layers
and the projection, forward and backward, over the cached states of its batch. The loss is
the recipe's own (:func:`~retrieval_prune.train.loop.maxsim_logits` over in-batch and hard
negatives, CRISP's per-sequence k-means in the loop when set); batches, learning rates,
warm-up and decay are the recipe's too (:class:`~retrieval_prune.train.loop.TrainConfig`).

With ``n_frozen=0`` the same loop backpropagates through the whole encoder (the reference
recipe), so both are measured by one code path with the same data, evaluation and seeds.

:func:`train_curve` also records a training curve: at chosen steps, the loss on held-out
training queries (never the test split) and their nDCG@10 by exact MaxSim over an evaluation
corpus (their judged documents and seeded distractors), with the run's own CRISP clustering
and -- for a run without CRISP -- with post-hoc clustering at the same budgets, which is the
comparison that says whether a clusterable encoder beats clustering a normal one.

The states equal the full forward's up to float summation order: padding keys are masked
out of attention, so a token's state at layer ``n_frozen`` depends only on its own text
(tested against :meth:`ColBERTModel.forward`).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from retrieval_prune.encode.model import ColBERTModel, Tokenized, collate
from retrieval_prune.train.crisp import CrispSpec, kmeans_pool, parse_crisp
from retrieval_prune.train.data import TrainPairs
from retrieval_prune.train.loop import (
    TrainConfig,
    _lr_factor,
    _param_groups,
    _Source,
    maxsim_logits,
)

__all__ = ["LayerCache", "lower_forward", "top_forward", "train_curve", "CurvePoint",
           "heldout_split", "EvalSet"]


# -- the two halves of the encoder ----------------------------------------------------------
def _layers(model: ColBERTModel):
    try:
        return model.backbone.encoder.layer
    except AttributeError as exc:
        raise NotImplementedError(
            "cached training needs a BERT-like backbone (backbone.encoder.layer); "
            f"{type(model.backbone).__name__} has another layout"
        ) from exc


def _attention_mask(model: ColBERTModel, mask: torch.Tensor, dtype: torch.dtype):
    """The additive mask the backbone's own forward would give its layers."""
    bb = model.backbone
    if (getattr(bb, "attn_implementation", None) == "sdpa"
            and getattr(bb, "position_embedding_type", "absolute") == "absolute"):
        from transformers.modeling_attn_mask_utils import _prepare_4d_attention_mask_for_sdpa

        return _prepare_4d_attention_mask_for_sdpa(mask, dtype, tgt_len=mask.shape[1])
    return bb.get_extended_attention_mask(mask, tuple(mask.shape))


def lower_forward(model: ColBERTModel, n_frozen: int, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden states after the embeddings and layers ``0 .. n_frozen-1``, (batch, seq, hidden)."""
    h = model.backbone.embeddings(input_ids=input_ids)
    ext = _attention_mask(model, attention_mask, h.dtype)
    for layer in _layers(model)[:n_frozen]:
        h = layer(h, attention_mask=ext)[0]
    return h


def top_forward(model: ColBERTModel, n_frozen: int, hidden: torch.Tensor,
                attention_mask: torch.Tensor, vector_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Layers ``n_frozen ..`` and the projection over ``hidden``: ``(vectors, mask)`` as
    :meth:`ColBERTModel.forward` returns them (L2-normalised, zero outside ``vector_mask``)."""
    h = hidden
    ext = _attention_mask(model, attention_mask, h.dtype)
    for layer in _layers(model)[n_frozen:]:
        h = layer(h, attention_mask=ext)[0]
    if model.projection is not None:
        h = model.projection(h)
    mask = vector_mask.bool()
    return F.normalize(h, p=2, dim=-1) * mask.unsqueeze(-1).to(h.dtype), mask


# -- the cache --------------------------------------------------------------------------------
def _lower_sha(model: ColBERTModel, n_frozen: int) -> str:
    """sha256 of the weights the cached states depend on (embeddings + frozen layers)."""
    h = hashlib.sha256()
    mods = [model.backbone.embeddings, *_layers(model)[:n_frozen]]
    for m in mods:
        for name, t in sorted(m.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _ids_sha(tok: Tokenized) -> str:
    h = hashlib.sha256()
    for ids, att in zip(tok.ids, tok.attend, strict=True):
        h.update(np.asarray(ids, np.int32).tobytes())
        h.update(np.asarray(att, np.uint8).tobytes())
        h.update(b"|")
    return h.hexdigest()


class LayerCache:
    """States after layer ``n_frozen`` of every text of ``tok``: one float32 array of all
    tokens (text ``i`` is rows ``off[i]:off[i+1]``), kept in memory and optionally on disk
    (``folder``: ``.npy`` files named by the frozen weights' and the token ids' sha256, so a
    changed model or text never reads stale states; loaded without pickle). ``lower_sha``:
    :func:`_lower_sha` of ``model`` already computed (several caches of one model)."""

    def __init__(self, model: ColBERTModel, n_frozen: int, tok: Tokenized, *,
                 folder: str | Path | None = None, batch: int = 32, progress: bool = True,
                 desc: str = "cache", lower_sha: str | None = None) -> None:
        n_layers = len(_layers(model))
        if isinstance(n_frozen, bool) or not isinstance(n_frozen, int) or not 0 < n_frozen < n_layers:
            raise ValueError(f"n_frozen={n_frozen!r} must be an int in 1..{n_layers - 1} "
                             f"(0 is the full recipe, which needs no cache)")
        self.tok = tok
        self.n_frozen = n_frozen
        lens = np.array([len(x) for x in tok.ids], np.int64)
        self.off = np.zeros(len(lens) + 1, np.int64)
        np.cumsum(lens, out=self.off[1:])
        self.key = hashlib.sha256(
            f"{lower_sha or _lower_sha(model, n_frozen)}:{n_frozen}:{_ids_sha(tok)}".encode()
        ).hexdigest()[:24]
        path = Path(folder) / f"{self.key}.npy" if folder is not None else None
        if path is not None and path.is_file():
            states = np.load(path, mmap_mode=None, allow_pickle=False)
            if states.shape != (int(self.off[-1]), model.hidden_size):
                raise ValueError(f"{path} holds {states.shape}, expected "
                                 f"({int(self.off[-1])}, {model.hidden_size}); delete it")
            self.states = torch.from_numpy(states)
            self.seconds = 0.0
            return
        t0 = time.monotonic()
        states = np.empty((int(self.off[-1]), model.hidden_size), np.float32)
        order = np.argsort(-lens, kind="stable")  # similar lengths together: little padding
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                for s in tqdm(range(0, len(order), batch), desc=desc, disable=not progress,
                              unit="batch"):
                    idx = order[s : s + batch].tolist()
                    b = collate(tok, idx, 0)
                    h = lower_forward(model, n_frozen, b.input_ids, b.attention_mask)
                    for r, i in enumerate(idx):
                        states[self.off[i] : self.off[i + 1]] = h[r, : lens[i]].numpy()
        finally:
            model.train(was)
        self.seconds = time.monotonic() - t0
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, states, allow_pickle=False)
            tmp.replace(path)
        self.states = torch.from_numpy(states)

    def batch(self, index: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(hidden (n, seq, H), attention_mask, vector_mask)`` of texts ``index``, right
        padded as :func:`~retrieval_prune.encode.model.collate` pads them."""
        b = collate(self.tok, index, 0)
        n, seq = b.input_ids.shape
        h = torch.zeros((n, seq, self.states.shape[1]), dtype=torch.float32)
        for r, i in enumerate(index):
            a, e = int(self.off[i]), int(self.off[i + 1])
            h[r, : e - a] = self.states[a:e]
        return h, b.attention_mask, b.vector_mask


# -- held-out queries and the evaluation set --------------------------------------------------
def heldout_split(pairs: TrainPairs, n: int, seed: int = 0) -> tuple[TrainPairs, TrainPairs]:
    """``(train, heldout)``: ``n`` training queries (seeded) held out of training."""
    from retrieval_prune.train.select import restrict_pairs

    if not 0 < n < len(pairs):
        raise ValueError(f"heldout n={n} must be in 1..{len(pairs) - 1} for {pairs.name} "
                         f"({len(pairs)} training queries)")
    pick = np.random.default_rng(seed).permutation(len(pairs))
    held = sorted(pick[:n].tolist())
    hset = set(held)
    train_ids = [q for i, q in enumerate(pairs.query_ids) if i not in hset]
    held_ids = [pairs.query_ids[i] for i in held]
    return (restrict_pairs(pairs, train_ids, f"all but {n} held-out queries (seed {seed})"),
            restrict_pairs(pairs, held_ids, f"{n} held-out queries (seed {seed})"))


@dataclass
class EvalSet:
    """Held-out queries, their judged documents plus ``distractors`` seeded others, and the
    held-out batches the loss is measured on (fixed, drawn once)."""

    pairs: TrainPairs
    doc_index: np.ndarray  # positions into pairs.doc_texts
    qrels: dict[str, dict[str, int]]
    loss_batches: list[tuple] = field(default_factory=list)

    @classmethod
    def make(cls, held: TrainPairs, tok_source: _Source, *, distractors: int = 1000,
             seed: int = 0, loss_batches: int = 8, batch_size: int = 16,
             negatives: int = 1) -> EvalSet:
        rng = np.random.default_rng(seed)
        judged = sorted({int(d) for p in held.positives for d in p})
        others = np.setdiff1d(np.arange(len(held.doc_ids)), judged)
        extra = rng.choice(others, size=min(distractors, others.size), replace=False)
        docs = np.unique(np.concatenate([np.asarray(judged, np.int64), extra]))
        qrels = {held.query_ids[i]: {held.doc_ids[int(d)]: 1 for d in held.positives[i]}
                 for i in range(len(held))}
        batches = [tok_source.pick(batch_size, negatives) for _ in range(loss_batches)]
        return cls(held, docs, qrels, batches)


def _pool(v: torch.Tensor, m: torch.Tensor, crisp: CrispSpec | None, kind: str):
    return (v, m) if crisp is None else kmeans_pool(v, m, crisp, kind)


def _ndcg(qv, qm, dv, dm, es: EvalSet, metric: Callable[[dict, dict], float],
          chunk: int = 128) -> float:
    scores = []
    for a in range(0, dv.shape[0], chunk):
        scores.append(maxsim_logits(qv, qm, dv[a : a + chunk], dm[a : a + chunk], 1.0))
    s = torch.cat(scores, dim=1)
    top = torch.topk(s, k=min(100, s.shape[1]), dim=1)
    run = {}
    for r, q in enumerate(es.pairs.query_ids):
        run[q] = {es.pairs.doc_ids[int(es.doc_index[int(j)])]: float(v)
                  for v, j in zip(top.values[r], top.indices[r], strict=True)}
    return float(metric(es.qrels, run))


# -- the curve --------------------------------------------------------------------------------
@dataclass
class CurvePoint:
    step: int
    seconds: float  # training seconds so far (no evaluation)
    train_loss: float  # mean of the last ``window`` steps
    heldout_loss: float
    ndcg: dict[str, float]  # "own" (the run's clustering) and post-hoc budgets by label
    vectors_per_doc: dict[str, float]


def train_curve(
    config: TrainConfig,
    pairs: Sequence[TrainPairs],
    held: TrainPairs,
    *,
    n_frozen: int,
    eval_steps: Sequence[int],
    metric: Callable[[dict, dict], float] | None = None,
    posthoc: Sequence[str] = (),
    cache_folder: str | Path | None = None,
    distractors: int = 1000,
    model: ColBERTModel | None = None,
    progress: bool = True,
    log=print,
) -> tuple[ColBERTModel, list[CurvePoint], dict[str, Any]]:
    """Train ``config``'s recipe with layers ``< n_frozen`` frozen and cached (0: none, the
    full recipe) for ``config.max_steps`` steps; evaluate at ``eval_steps``.

    ``held``: held-out training queries of one collection (:func:`heldout_split`) -- their
    loss and nDCG@10 over an :class:`EvalSet` of that collection, scored by ``metric(qrels,
    run)`` (``{qid: {doc: grade}}``, ``{qid: {doc: score}}``; the caller's ranking metric, e.g.
    nDCG@10 of :func:`retrieval_prune.evaluation.metrics.evaluate`: training sits below
    evaluation and does not import it; needed when ``eval_steps`` is not empty). ``posthoc``: CRISP specs
    (``"25%"``, ``"8x32"``) to also evaluate by clustering this run's vectors after the fact
    (meaningful for a run without CRISP). Returns ``(model, points, info)``; ``info`` holds
    the seconds per step (median and mean) and the cache's build seconds.
    """
    if metric is None and len(eval_steps):
        raise ValueError("train_curve: eval_steps need metric=... (e.g. nDCG@10 of "
                         "retrieval_prune.evaluation.metrics.evaluate)")
    crisp = config.crisp_spec
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    threads = config.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    if model is None:
        model = ColBERTModel.from_backbone(dim=config.dim, seed=config.seed)
    from retrieval_prune.encode.checkpoint import colbert_spec
    from retrieval_prune.encode.model import TextTokenizer

    tok = TextTokenizer(model.tokenizer, colbert_spec(doc_maxlen=config.doc_maxlen,
                                                      query_maxlen=config.query_maxlen))
    sources = [_Source(p, tok, np.random.default_rng(rng.integers(2**63))) for p in pairs]
    held_src = _Source(held, tok, np.random.default_rng(config.seed + 1))
    es = EvalSet.make(held, held_src, distractors=distractors, seed=config.seed,
                      batch_size=config.batch_size, negatives=config.negatives)
    # caches: every source's queries and documents, the held-out queries (same corpus as
    # the held-out collection's source, whose document cache serves the evaluation)
    info: dict[str, Any] = {"n_frozen": n_frozen, "cache_seconds": 0.0}
    caches: dict[int, tuple[LayerCache, LayerCache]] = {}
    held_q = None
    if n_frozen:
        sha = _lower_sha(model, n_frozen)  # the frozen weights, hashed once for every cache
        for j, s in enumerate(sources):
            caches[j] = (LayerCache(model, n_frozen, s.q_tok, folder=cache_folder, lower_sha=sha,
                                    progress=progress, desc=f"cache {s.pairs.name} queries"),
                         LayerCache(model, n_frozen, s.d_tok, folder=cache_folder, lower_sha=sha,
                                    progress=progress, desc=f"cache {s.pairs.name} docs"))
            info["cache_seconds"] += caches[j][0].seconds + caches[j][1].seconds
        held_q = LayerCache(model, n_frozen, held_src.q_tok, folder=cache_folder, lower_sha=sha,
                            progress=progress, desc="cache held-out queries")
        info["cache_seconds"] += held_q.seconds
    held_docs = next((caches[j][1] for j, s in enumerate(sources)
                      if s.pairs.name == held.name), None) if n_frozen else None
    if n_frozen:
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in _layers(model)[n_frozen:]:
            for p in layer.parameters():
                p.requires_grad_(True)
        if model.projection is not None:
            model.projection.weight.requires_grad_(True)
    groups = [g for g in ({**g, "params": [p for p in g["params"] if p.requires_grad]}
                          for g in _param_groups(model, config)) if g["params"]]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
    trainable = [p for g in groups for p in g["params"]]
    info["trainable_parameters"] = int(sum(p.numel() for p in trainable))

    def encode(kind_cache, tok_, index):
        if n_frozen:
            h, am, vm = kind_cache.batch(index)
            return top_forward(model, n_frozen, h, am, vm)
        b = collate(tok_, index, tok.pad_id)
        out = model(b.input_ids, b.attention_mask, b.vector_mask)
        return out.vectors, out.mask

    def step_loss(j: int, pick) -> torch.Tensor:
        qs, docs, labels, exclude = pick
        src = sources[j] if j >= 0 else held_src
        qc = (caches[j][0] if j >= 0 else held_q) if n_frozen else None
        dc = (caches[j][1] if j >= 0 else held_docs) if n_frozen else None
        qv, qm = _pool(*encode(qc, src.q_tok, qs), crisp, "queries")
        dv, dm = _pool(*encode(dc, src.d_tok, docs), crisp, "documents")
        logits = maxsim_logits(qv, qm, dv, dm, config.temperature).masked_fill(exclude, float("-inf"))
        return F.cross_entropy(logits, labels)

    held_j = next(j for j, s in enumerate(sources) if s.pairs.name == held.name)

    def evaluate_now() -> tuple[float, dict[str, float], dict[str, float]]:
        model.eval()
        with torch.no_grad():
            hl = float(np.mean([float(step_loss(-1, b)) for b in es.loss_batches]))
            qv, qm = encode(held_q, held_src.q_tok, list(range(len(held))))
            dvs, dms = [], []
            d_index = es.doc_index.tolist()
            for a in range(0, len(d_index), 64):
                v, m = encode(held_docs, sources[held_j].d_tok, d_index[a : a + 64])
                dvs.append(v)
                dms.append(m)
            width = max(v.shape[1] for v in dvs)
            dv = torch.cat([F.pad(v, (0, 0, 0, width - v.shape[1])) for v in dvs])
            dm = torch.cat([F.pad(m, (0, width - m.shape[1])) for m in dms])
            nd, vpd = {}, {}
            specs = [("own", crisp)] + [(parse_crisp(p).label + " post-hoc", parse_crisp(p))
                                        for p in posthoc]
            for label, spec in specs:
                pq, pqm = _pool(qv, qm, spec, "queries")
                pd, pdm = _pool(dv, dm, spec, "documents")
                nd[label] = _ndcg(pq, pqm, pd, pdm, es, metric)
                vpd[label] = float(pdm.sum()) / pdm.shape[0]
        model.train()
        return hl, nd, vpd

    points: list[CurvePoint] = []
    losses: list[float] = []
    step_s: list[float] = []
    train_s = 0.0
    want = sorted({int(s) for s in eval_steps if 0 <= int(s) <= config.max_steps})
    model.train()
    if n_frozen:  # the frozen part is not run at all; the cached states are eval-mode states
        model.backbone.embeddings.eval()
    bar = tqdm(total=config.max_steps, desc=f"train {crisp.label if crisp else 'no-CRISP'} "
               f"(frozen {n_frozen})", disable=not progress, unit="step", dynamic_ncols=True)
    step = 0
    try:
        while True:
            if want and step == want[0]:
                want.pop(0)
                hl, nd, vpd = evaluate_now()
                tl = float(np.mean(losses[-20:])) if losses else float("nan")
                points.append(CurvePoint(step, round(train_s, 1), tl, hl, nd, vpd))
                log(f"step {step}: train loss {tl:.3f}, held-out loss {hl:.3f}, "
                    + ", ".join(f"nDCG@10 {k} {v:.4f}" for k, v in nd.items()))
            if step >= config.max_steps:
                break
            t0 = time.monotonic()
            j = step % len(sources)
            factor = _lr_factor(step / config.max_steps, config.warmup)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * factor
            loss = step_loss(j, sources[j].pick(config.batch_size, config.negatives))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {float(loss)} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
            step_s.append(time.monotonic() - t0)
            train_s += step_s[-1]
            bar.set_postfix_str(f"loss={losses[-1]:.3f}", refresh=False)
            bar.update(1)
    finally:
        bar.close()
    model.eval()
    # the median: a step the machine stalled (another job, a paused process) does not move it
    info.update(steps=step, train_seconds=round(train_s, 1),
                seconds_per_step=round(float(np.median(step_s)) if step_s else 0.0, 3),
                mean_seconds_per_step=round(train_s / max(step, 1), 3),
                loss_per20=[float(np.mean(losses[i : i + 20])) for i in range(0, len(losses), 20)])
    return model, points, info
