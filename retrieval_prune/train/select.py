"""Training-pair selection: the inputs data-stage plug-ins read, running them, and saved
selections that ``train`` restricts its pairs to.

- :func:`pair_sets`: one :class:`~retrieval_prune.preprocess.base.PairSet` per collection,
  with pair embeddings (zero-shot encoder, through the embedding cache) and/or EL2N scores
  from a full-data checkpoint;
- :func:`select_pairs`: build a data step from its spec, run it, restrict the pairs;
- :func:`save_selection` / :func:`load_selection`: the selection as JSON;
- :func:`apply_selection`: what ``train`` does with ``TrainConfig.select`` (a saved
  selection file or a spec).

Pair embedding of a training query: ``normalize(zq + zd)`` with ``zq`` the normalised mean
of its zero-shot query vectors and ``zd`` the normalised mean, over its positives, of each
positive's normalised mean document vector (query and documents weigh the same).

EL2N (Paul et al. 2021) of a training query under a trained checkpoint: the query is scored
with MaxSim against a fixed candidate set of :data:`EL2N_CANDIDATES` documents (its first
positive; up to :data:`EL2N_HARD` of its hard negatives, a seeded sample; then a seeded
sample of other non-positive documents), logits = mean-over-query-vectors MaxSim /
the checkpoint's training temperature (as in training), and EL2N = ``||softmax(logits) -
onehot(positive)||_2`` (higher = harder). Scores are cached under
``$RETRIEVAL_PRUNE_CACHE/train`` keyed by the checkpoint's weights and the queries; the
cache entry keeps the seconds the scoring took, which the results report as "scoring
minutes".

Data steps select training *queries*: the documents of a collection are never removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zlib
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from retrieval_prune import registry
from retrieval_prune.atomic import atomic_write_json
from retrieval_prune.encode.cache import EmbeddingCache, cache_root, texts_digest
from retrieval_prune.preprocess.base import DataPreprocessor, PairSet, Selection, StepReport
from retrieval_prune.safejson import loads_bounded
from retrieval_prune.train.data import TrainPairs

__all__ = [
    "pair_sets",
    "pair_embeddings",
    "el2n_scores",
    "select_pairs",
    "restrict_pairs",
    "save_selection",
    "load_selection",
    "apply_selection",
    "build_data_step",
    "build_data_steps",
    "SELECTION_FORMAT",
    "EL2N_CANDIDATES",
    "EL2N_HARD",
    "INPUTS_KEY",
]

SELECTION_FORMAT = "retrieval-prune-selection"
_SELECTION_VERSION = 1
#: candidates per query for EL2N (the positive + 14 negatives)
EL2N_CANDIDATES = 15
#: at most this many of the candidates are the query's own hard negatives
EL2N_HARD = 7
_EL2N_VERSION = 1
#: key of ``Selection.report.details`` holding how the plug-in's inputs were made
INPUTS_KEY = "_inputs"
_MAX_SELECTION_BYTES = 512 * 1024 * 1024


def _ensure_plugins() -> None:
    import retrieval_prune.preprocess.data  # noqa: F401  (registers the data plug-ins)


def build_data_steps(spec: str) -> list[DataPreprocessor]:
    """The data-stage plug-ins of ``spec`` (one step, or several joined with ``|``, run in
    order); a clear error for a step of another stage."""
    _ensure_plugins()
    steps = registry.build_pipeline(spec)
    for step in steps:
        if not isinstance(step, DataPreprocessor):
            data = sorted(registry.available("data"))
            raise ValueError(
                f"{step.spec!r} is a {step.stage!r} step, not a data step; data steps: "
                f"{', '.join(data)}"
            )
    return steps


def build_data_step(spec: str) -> DataPreprocessor:
    """The data-stage plug-in of a one-step ``spec``; a clear error for other stages."""
    steps = build_data_steps(spec)
    if len(steps) != 1:
        raise ValueError(f"{spec!r} has {len(steps)} steps; build_data_step takes one")
    return steps[0]


# -- inputs ------------------------------------------------------------------------------
def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float64)
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.divide(v, norm, out=np.zeros_like(v), where=norm > 0)


def _mean_rows(emb: np.ndarray, offsets: np.ndarray, which: np.ndarray) -> np.ndarray:
    """Normalised mean vector of items ``which`` of a CSR set (zero for an empty item)."""
    out = np.zeros((len(which), emb.shape[1]), np.float64)
    for r, i in enumerate(which):
        s, e = int(offsets[i]), int(offsets[i + 1])
        if e > s:
            out[r] = np.asarray(emb[s:e], np.float64).mean(axis=0)
    return _unit(out)


def pair_embeddings(pairs: TrainPairs, *, progress: bool = True) -> np.ndarray:
    """float32 ``(n_queries, 384)`` unit pair embeddings from the zero-shot encoder
    (documents and queries through the embedding cache; see the module docstring)."""
    from retrieval_prune.encode import Encoder

    enc = Encoder.load(None)  # zero-shot, the settings `eval` uses without --checkpoint
    cache = EmbeddingCache(cache_root() / "embeddings")
    docs = cache.get_or_encode(
        enc, pairs.name, pairs.doc_ids, pairs.doc_texts, kind="docs", progress=progress
    )
    queries = cache.get_or_encode(
        enc, pairs.name, pairs.query_ids, pairs.query_texts, kind="queries", progress=progress
    )
    zq = _mean_rows(queries.embeddings, queries.offsets, np.arange(len(pairs)))
    needed = np.unique(np.concatenate([np.asarray(p, np.int64) for p in pairs.positives]))
    dmean = _mean_rows(docs.embeddings, docs.offsets, needed)
    row_of = {int(j): r for r, j in enumerate(needed)}
    zd = np.stack([_unit(dmean[[row_of[int(j)] for j in p]].mean(axis=0)) for p in pairs.positives])
    return _unit(zq + zd).astype(np.float32)


def near_duplicate_fraction(unit: np.ndarray, eps: float, block: int = 2048) -> float:
    """Share of the rows of ``unit`` (unit-norm, (n, d)) that have another row at cosine
    similarity > 1 - ``eps`` (SemDeDup's duplicate rule over the whole set, no clusters).
    Exact: all pairs, in blocks of ``block`` rows."""
    if not 0.0 <= float(eps) <= 1.0:
        raise ValueError(f"eps={eps!r} must be in [0, 1]")
    x = np.ascontiguousarray(unit, np.float32)
    n = len(x)
    if n < 2:
        return 0.0
    has = np.zeros(n, bool)
    for s in range(0, n, block):
        sim = x[s : s + block] @ x.T
        rows = np.arange(s, min(s + block, n))
        sim[rows - s, rows] = -np.inf  # not itself
        has[rows] = (sim > 1.0 - float(eps)).any(axis=1)
    return float(has.mean())


def corpus_near_duplicates(name: str, eps: Sequence[float] = (0.05, 0.10), *,
                           progress: bool = True) -> dict[str, Any]:
    """Near-duplicate share of a collection's corpus (a diagnostic, nothing is removed):
    zero-shot mean document vectors (through the embedding cache), exact all pairs."""
    from retrieval_prune.data.beir import load_beir, resolve_dataset
    from retrieval_prune.encode import Encoder
    from retrieval_prune.train.data import load_pairs

    try:  # a training collection: the documents pair_embeddings encodes (same cache entry)
        src = load_pairs(name, negatives="none", progress=False)
        key, ids, texts = src.name, src.doc_ids, src.doc_texts
    except ValueError:  # an evaluation-only collection: its test corpus
        corpus = load_beir(resolve_dataset(name), split="test", download=False)
        key, ids, texts = name, corpus.doc_ids, corpus.doc_texts
    enc = Encoder.load(None)
    cache = EmbeddingCache(cache_root() / "embeddings")
    docs = cache.get_or_encode(enc, key, ids, texts, kind="docs", progress=progress)
    unit = _mean_rows(docs.embeddings, docs.offsets, np.arange(len(ids)))
    return {"docs": len(ids),
            **{f"eps={e:g}": near_duplicate_fraction(unit, e) for e in eps}}


def _el2n_candidates(pairs: TrainPairs, n_cand: int, n_hard: int) -> np.ndarray:
    """int64 ``(n_queries, n_cand)``: column 0 the first positive, then hard negatives, then
    other non-positive documents (seeded by the collection name; -1 pads a tiny corpus)."""
    rng = np.random.default_rng([zlib.crc32(pairs.name.encode("utf-8")), _EL2N_VERSION])
    n_docs = len(pairs.doc_ids)
    out = np.full((len(pairs), n_cand), -1, np.int64)
    for i, (pos, neg) in enumerate(zip(pairs.positives, pairs.negatives, strict=True)):
        pset = set(np.asarray(pos).tolist())
        row = [int(pos[0])]
        hard = [int(j) for j in np.asarray(neg).tolist() if int(j) not in pset]
        if len(hard) > n_hard:
            hard = sorted(rng.choice(hard, size=n_hard, replace=False).tolist())
        row += hard
        taken = set(row)
        room = n_docs - len(pset | taken)
        want = min(n_cand - len(row), room)
        while want > 0:
            j = int(rng.integers(n_docs))
            if j not in pset and j not in taken:
                row.append(j)
                taken.add(j)
                want -= 1
        out[i, : len(row)] = row
    return out


def _checkpoint_identity(checkpoint: Path) -> tuple[str, float]:
    from retrieval_prune.encode.checkpoint import read_config

    cfg = read_config(checkpoint)
    train_cfg = ((cfg.get("metadata") or {}).get("training") or {}).get("config") or {}
    return str(cfg["weights_sha256"]), float(train_cfg.get("temperature", 0.05))


def el2n_scores(
    pairs: TrainPairs, checkpoint: str | os.PathLike, *, progress: bool = True
) -> tuple[np.ndarray, dict[str, Any]]:
    """EL2N per training query under ``checkpoint`` (the full-data run); cached.

    Returns
    -------
    scores : float64 (n_queries,), in [0, sqrt(2)]; higher = harder.
    info : ``{"checkpoint", "candidates", "temperature", "scoring_seconds", "cached"}``;
        ``scoring_seconds`` is the time the scoring took when it ran (encoding included),
        also on a cache hit.
    """
    from retrieval_prune.encode.checkpoint import resolve_checkpoint

    checkpoint = resolve_checkpoint(checkpoint)  # a folder, or a shipped name (ft128)
    sha, temperature = _checkpoint_identity(checkpoint)
    key = hashlib.sha256(
        json.dumps(
            {
                "v": _EL2N_VERSION,
                "scorer": "el2n-maxsim",
                "weights": sha,
                "dataset": pairs.name,
                "docs": texts_digest(pairs.doc_ids, pairs.doc_texts),
                "queries": texts_digest(pairs.query_ids, pairs.query_texts),
                "negatives": [np.asarray(n).tolist() for n in pairs.negatives],
                "candidates": EL2N_CANDIDATES,
                "hard": EL2N_HARD,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:24]
    path = cache_root() / "train" / f"el2n-{key}.json"
    base = {
        "checkpoint": checkpoint.resolve().name,
        "weights_sha256": sha,
        "candidates": EL2N_CANDIDATES,
        "temperature": temperature,
    }
    if path.is_file():
        try:
            hit = loads_bounded(path.read_bytes(), max_bytes=_MAX_SELECTION_BYTES)
            scores = np.asarray(hit["scores"], np.float64)
            if scores.shape == (len(pairs),) and np.isfinite(scores).all():
                return scores, {**base, "scoring_seconds": float(hit["seconds"]), "cached": True}
        except (ValueError, KeyError, TypeError, OSError):
            pass  # a damaged entry is a miss
    from tqdm.auto import tqdm

    from retrieval_prune.encode import Encoder
    from retrieval_prune.kernels.ops import maxsim_scores

    t0 = time.perf_counter()
    enc = Encoder.load(checkpoint)
    cache = EmbeddingCache(cache_root() / "embeddings")
    docs = cache.get_or_encode(
        enc, pairs.name, pairs.doc_ids, pairs.doc_texts, kind="docs", progress=progress
    )
    queries = enc.encode_queries(pairs.query_texts, progress=progress)
    cand = _el2n_candidates(pairs, EL2N_CANDIDATES, EL2N_HARD)
    d_emb, d_off = docs.embeddings, docs.offsets
    scores = np.empty(len(pairs), np.float64)
    for i in tqdm(range(len(pairs)), desc=f"el2n {pairs.name}", disable=not progress):
        q = queries.embeddings[queries.offsets[i] : queries.offsets[i + 1]]
        # the candidates' vectors gathered into a small CSR (MaxSim checks its whole input)
        ids = cand[i][cand[i] >= 0]
        lens = d_off[ids + 1] - d_off[ids]
        sub_off = np.zeros(ids.size + 1, np.int64)
        np.cumsum(lens, out=sub_off[1:])
        rows = np.concatenate([np.arange(d_off[j], d_off[j + 1]) for j in ids])
        s = np.full(cand.shape[1], -np.inf)
        s[: ids.size] = maxsim_scores(q, np.ascontiguousarray(d_emb[rows]), sub_off)
        s = np.where(np.isfinite(s), s / max(q.shape[0], 1) / temperature, -np.inf)
        if not np.isfinite(s.max()):  # no candidate has a vector: as hard as it gets
            scores[i] = float(np.sqrt(2.0))
            continue
        p = np.exp(s - s.max())
        p /= p.sum()
        p[0] -= 1.0
        scores[i] = float(np.sqrt((p * p).sum()))
    seconds = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {**base, "seconds": seconds, "scores": scores.tolist()})
    return scores, {**base, "scoring_seconds": seconds, "cached": False}


def pair_sets(
    pairs: Sequence[TrainPairs],
    need_embeddings: bool,
    scores_from: str | os.PathLike | None,
    *,
    progress: bool = True,
    timings: dict[str, Any] | None = None,
) -> list[PairSet]:
    """One :class:`PairSet` per collection: query ids, plus pair embeddings when
    ``need_embeddings`` and EL2N scores when ``scores_from`` (a checkpoint folder) is given.

    ``timings``, when given, is filled with ``embedding_seconds``, ``scoring_seconds`` (the
    EL2N scoring time, also when the scores came from the cache: the time they took) and
    per-collection details.
    """
    out = []
    t_emb = t_score = 0.0
    details: dict[str, Any] = {}
    for p in pairs:
        if not isinstance(p, TrainPairs):
            raise TypeError(f"pair_sets takes TrainPairs, got {type(p).__name__}")
        emb = scores = None
        if need_embeddings:
            t0 = time.perf_counter()
            emb = pair_embeddings(p, progress=progress)
            t_emb += time.perf_counter() - t0
        if scores_from is not None:
            scores, info = el2n_scores(p, scores_from, progress=progress)
            t_score += info["scoring_seconds"]
            details[p.name] = info
        out.append(PairSet(p.name, list(p.query_ids), emb, scores))
    if timings is not None:
        timings.update(
            {"embedding_seconds": t_emb, "scoring_seconds": t_score, "scores": details}
        )
    return out


# -- selection ---------------------------------------------------------------------------
def restrict_pairs(pairs: TrainPairs, kept: Sequence[str], spec: str) -> TrainPairs:
    """``pairs`` with only the queries in ``kept`` (input order kept), same documents; the
    selection is recorded in ``info`` (and so in a checkpoint's training data summary)."""
    keep = set(kept)
    known = set(pairs.query_ids)
    missing = keep - known
    if missing:
        raise ValueError(
            f"the selection for {pairs.name!r} names {len(missing)} queries that are not among "
            f"its {len(pairs)} training queries (e.g. {sorted(missing)[:3]}); it was made on "
            "other training data"
        )
    idx = [i for i, q in enumerate(pairs.query_ids) if q in keep]
    return replace(
        pairs,
        query_ids=[pairs.query_ids[i] for i in idx],
        query_texts=[pairs.query_texts[i] for i in idx],
        positives=[pairs.positives[i] for i in idx],
        negatives=[pairs.negatives[i] for i in idx],
        info={**pairs.info, "selection": spec, "queries_before_selection": len(pairs)},
    )


def _subset(ps: PairSet, kept: list[str]) -> PairSet:
    keep = set(kept)
    idx = np.asarray([i for i, q in enumerate(ps.query_ids) if q in keep], np.int64)
    return PairSet(
        ps.name,
        [ps.query_ids[i] for i in idx],
        None if ps.embeddings is None else ps.embeddings[idx],
        None if ps.scores is None else ps.scores[idx],
    )


def _chain(steps: list[DataPreprocessor], sets: list[PairSet]) -> Selection:
    """Run ``steps`` in order, each on what the previous kept. One step: its own Selection.
    Several: the final kept ids, the aliases whose target is still kept (a near-duplicate
    whose representative a later step pruned has no alias left), a report over the chain
    with every step's report under ``details["_steps"]``."""
    if len(steps) == 1:
        return steps[0].select(sets)
    reports = []
    aliases: dict[str, dict[str, str]] = {ps.name: {} for ps in sets}
    current = sets
    for step in steps:
        sel = step.select(current)
        reports.append(sel.report)
        for name, a in sel.aliases.items():
            aliases[name].update(a)
        current = [_subset(ps, sel.kept[ps.name]) for ps in current]
    kept = {ps.name: list(ps.query_ids) for ps in current}
    for name, a in aliases.items():
        final = set(kept[name])
        aliases[name] = {r: t for r, t in sorted(a.items()) if t in final}
    n_in = sum(len(ps) for ps in sets)
    n_out = sum(len(v) for v in kept.values())
    details: dict[str, Any] = {
        ps.name: {"queries": len(ps), "kept": len(kept[ps.name])} for ps in sets
    }
    details["_steps"] = [r.to_dict() for r in reports]
    report = StepReport(
        step=" | ".join(st.spec for st in steps),
        stage="data",
        kept_fraction=n_out / n_in,
        bytes_before=n_in,
        bytes_after=n_out,
        seconds=sum(r.seconds for r in reports),
        lossless=False,
        details=details,
    )
    return Selection(kept, aliases, report)


def select_pairs(
    spec: str,
    pairs: Sequence[TrainPairs],
    scores_from: str | os.PathLike | None = None,
    *,
    progress: bool = True,
) -> tuple[list[TrainPairs], Selection]:
    """Run the data step(s) ``spec`` on ``pairs``; the pairs restricted to the kept queries
    (documents unchanged) and the :class:`Selection`.

    ``spec`` : one data step, or several joined with ``|`` (``semdedup:eps=0.05 |
    dbp:keep=0.3``, the DBP paper's order), each run on what the previous kept (so a later
    step's ``keep`` is a fraction of what reaches it).
    ``scores_from`` : the full-data checkpoint whose EL2N scores a step with ``needs_scores``
    (``ccs``, ``top_importance``) reads. The report's ``details[INPUTS_KEY]`` records how
    the inputs were made (embedding and scoring seconds, the scoring checkpoint).
    """
    steps = build_data_steps(spec)
    full = " | ".join(st.spec for st in steps)
    pairs = list(pairs)
    if not pairs:
        raise ValueError(f"{full}: no training collections given")
    need_scores = any(st.needs_scores for st in steps)
    if need_scores and scores_from is None:
        raise ValueError(
            f"{full} needs per-query EL2N scores from a full-data run: give scores_from="
            "CHECKPOINT (the checkpoint trained on all pairs)"
        )
    timings: dict[str, Any] = {}
    sets = pair_sets(
        pairs,
        any(st.needs_embeddings for st in steps),
        scores_from if need_scores else None,
        progress=progress,
        timings=timings,
    )
    sel = _chain(steps, sets)
    sel.report.details[INPUTS_KEY] = timings
    out = [restrict_pairs(p, sel.kept[p.name], full) for p in pairs]
    return out, sel


def save_selection(sel: Selection, path: str | os.PathLike) -> Path:
    """Write ``sel`` as JSON (atomically): spec, counts per collection, kept ids, aliases,
    the step report."""
    counts = {
        name: {
            "queries": int(sel.report.details.get(name, {}).get("queries", len(ids))),
            "kept": len(ids),
        }
        for name, ids in sel.kept.items()
    }
    doc = {
        "format": SELECTION_FORMAT,
        "version": _SELECTION_VERSION,
        "spec": sel.report.step,
        "counts": counts,
        **sel.to_dict(),
    }
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(path, doc, indent=1)


def load_selection(path: str | os.PathLike) -> Selection:
    """Read a selection written by :func:`save_selection` (checked, never executed)."""
    path = Path(path).expanduser()
    doc = loads_bounded(path.read_bytes(), max_bytes=_MAX_SELECTION_BYTES)
    if not isinstance(doc, dict) or doc.get("format") != SELECTION_FORMAT:
        raise ValueError(f"{path} is not a selection file (format {SELECTION_FORMAT!r})")
    if doc.get("version") != _SELECTION_VERSION:
        raise ValueError(f"{path}: selection version {doc.get('version')!r} is not readable")
    kept, aliases, rep = doc.get("kept"), doc.get("aliases", {}), doc.get("report")
    ok = (
        isinstance(kept, dict)
        and all(isinstance(v, list) and all(isinstance(q, str) for q in v) for v in kept.values())
        and isinstance(aliases, dict)
        and all(isinstance(v, dict) for v in aliases.values())
        and isinstance(rep, dict)
    )
    if not ok:
        raise ValueError(f"{path}: kept / aliases / report are malformed")
    try:
        report = StepReport(**rep)
    except TypeError as exc:
        raise ValueError(f"{path}: the report is malformed ({exc})") from None
    return Selection(kept, aliases, report)


def apply_selection(
    select: str, pairs: Sequence[TrainPairs], *, progress: bool = True
) -> tuple[list[TrainPairs], dict[str, Any]]:
    """What ``train`` does with ``TrainConfig.select``: a saved selection file (``*.json``)
    or a data-step spec (steps without ``needs_scores``; a score-based selection is made
    first with ``preprocess`` and saved). Returns the restricted pairs and the record for
    the checkpoint's metadata (spec, source, counts per collection)."""
    pairs = list(pairs)
    text = str(select).strip()
    if text.endswith(".json") or Path(text).expanduser().is_file():
        sel = load_selection(text)
        source = str(Path(text).expanduser().resolve())
        absent = [p.name for p in pairs if p.name not in sel.kept]
        if absent:
            raise ValueError(
                f"the selection {text} has no entry for {absent} (it covers "
                f"{sorted(sel.kept)}); make it on the same --data"
            )
        out = [restrict_pairs(p, sel.kept[p.name], sel.report.step) for p in pairs]
    else:
        steps = build_data_steps(text)
        for step in steps:
            if step.needs_scores:
                raise ValueError(
                    f"{step.spec} needs EL2N scores from a full-data run; make the selection "
                    "first (retrieval-prune preprocess ... --out FILE.json) and train on the file"
                )
        out, sel = select_pairs(text, pairs, progress=progress)
        source = "spec"
    counts = {
        p.name: {"queries": len(before), "kept": len(p)}
        for p, before in zip(out, pairs, strict=True)
    }
    return out, {"spec": sel.report.step, "source": source, "counts": counts}


def check_select(select: Any) -> None:
    """Fail early on a ``TrainConfig.select`` that is neither a selection file nor a data
    step spec (the work is done later, by :func:`apply_selection`)."""
    if select is None:
        return
    if not isinstance(select, (str, os.PathLike)) or not str(select).strip():
        raise ValueError(f"select={select!r} must be a selection file (.json) or a data-step spec")
    text = str(select).strip()
    if text.endswith(".json") or Path(text).expanduser().is_file():
        if not Path(text).expanduser().is_file():
            raise FileNotFoundError(f"select={text!r}: no such selection file")
        return
    build_data_steps(text)
