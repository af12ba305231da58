"""Training pairs: (query, positive document, hard negatives) from BEIR-layout collections.

Training never reads a split we evaluate on. :func:`load_pairs` takes a collection's
``qrels/train.tsv``; the only collection allowed to train on the qrels of a split called
``test`` is SQuAD v1.1 dev (``squad-v1.1-dev-retrieval``: question -> the paragraph that
answers it), which this project never evaluates on (see :data:`TRAIN_ONLY_COLLECTIONS`).
An explicit ``split=`` other than ``"train"`` needs ``allow_eval_split=True`` (unit tests on
tiny sets do this; the CLI never does).

Hard negatives, no BM25 needed:

* ``"maxsim"``: the zero-shot MiniLM encoder's exact MaxSim top-``depth`` over the corpus for
  every training query, positives excluded; computed once, cached under
  ``$RETRIEVAL_PRUNE_CACHE/train`` (the corpus embeddings come from the shared embedding
  cache, so an earlier zero-shot eval makes this cheap);
* ``"same-title"``: other documents with the same title (SQuAD: other paragraphs of the same
  Wikipedia article), the natural hard negatives of a paragraph collection.

``"auto"`` picks ``same-title`` when most documents share their title with another document
and ``maxsim`` otherwise.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval_prune.atomic import atomic_write_json
from retrieval_prune.encode.cache import cache_root
from retrieval_prune.types import Corpus

__all__ = [
    "TRAIN_ONLY_COLLECTIONS",
    "DATA_ALIASES",
    "TrainPairs",
    "load_pairs",
    "mine_maxsim_negatives",
    "same_title_negatives",
]

#: Collections whose only qrels file is named ``test`` but which we never evaluate on, so
#: their pairs may be trained on (SQuAD v1.1 dev questions -> paragraphs).
TRAIN_ONLY_COLLECTIONS = frozenset({"squad-v1.1-dev-retrieval"})
#: Short names accepted by ``--data``.
DATA_ALIASES = {"squad": "squad-v1.1-dev-retrieval"}
_NEGATIVE_MODES = ("auto", "maxsim", "same-title", "none")


@dataclass
class TrainPairs:
    """Queries with their positives and hard negatives, over one collection's corpus.

    Attributes
    ----------
    name : collection name.
    split : the qrels split the pairs come from.
    doc_texts : list of str, the corpus (document ``i`` has id ``doc_ids[i]``).
    doc_ids : list of str
    query_ids, query_texts : lists of str, one per training query.
    positives : list of int arrays, document positions judged relevant (grade > 0).
    negatives : list of int arrays, hard-negative document positions (may be empty).
    negatives_source : how the negatives were made.
    """

    name: str
    split: str
    doc_ids: list[str]
    doc_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    positives: list[np.ndarray]
    negatives: list[np.ndarray]
    negatives_source: str = "none"
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.query_ids)

    @property
    def n_pairs(self) -> int:
        return int(sum(len(p) for p in self.positives))

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for the checkpoint config."""
        return {
            "name": self.name,
            "split": self.split,
            "queries": len(self),
            "pairs": self.n_pairs,
            "documents": len(self.doc_ids),
            "negatives": self.negatives_source,
            "negatives_per_query": float(np.mean([len(n) for n in self.negatives]))
            if len(self)
            else 0.0,
            **self.info,
        }


def _resolve_split(name: str, folder: Path, split: str | None, allow_eval_split: bool) -> str:
    have = sorted(p.stem for p in (folder / "qrels").glob("*.tsv"))
    if split is None:
        if "train" in have:
            return "train"
        if folder.name in TRAIN_ONLY_COLLECTIONS and "test" in have:
            return "test"
        raise ValueError(
            f"dataset {name!r} has no qrels/train.tsv (splits: {have}); training on a split we "
            "evaluate on would leak into the results. Train on a collection with a train split "
            f"(e.g. scifact) or on {sorted(TRAIN_ONLY_COLLECTIONS)}"
        )
    if split != "train" and not allow_eval_split and folder.name not in TRAIN_ONLY_COLLECTIONS:
        raise ValueError(
            f"split={split!r} of {name!r} is an evaluation split; training on it would leak into "
            "the results (pass allow_eval_split=True only for tests on toy data)"
        )
    if split not in have:
        raise FileNotFoundError(f"{folder}/qrels/{split}.tsv is missing; splits available: {have}")
    return split


def load_pairs(
    name: str,
    *,
    split: str | None = None,
    negatives: str = "auto",
    depth: int = 30,
    allow_eval_split: bool = False,
    max_queries: int | None = None,
    progress: bool = True,
) -> TrainPairs:
    """Training pairs of one collection (by name under ``../shared/data`` or a folder).

    Parameters
    ----------
    name : str
        Collection name or folder (``"scifact"``, ``"squad"``, ...).
    split : str, optional
        Default: ``train`` (or ``test`` for :data:`TRAIN_ONLY_COLLECTIONS`).
    negatives : ``"auto"``, ``"maxsim"``, ``"same-title"`` or ``"none"``
    depth : int
        MaxSim mining depth (top-``depth`` minus the positives).
    allow_eval_split : bool
        Permit an explicit evaluation split (tests on toy data only).
    max_queries : int, optional
        Keep the first N queries (quick runs, tests).
    """
    from retrieval_prune.data import load_beir
    from retrieval_prune.data.beir import resolve_dataset

    if negatives not in _NEGATIVE_MODES:
        raise ValueError(f"negatives={negatives!r} must be one of {_NEGATIVE_MODES}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth={depth!r} must be an int >= 1")
    name = DATA_ALIASES.get(name, name)
    folder = resolve_dataset(name, download=False)
    split = _resolve_split(name, folder, split, allow_eval_split)
    corpus = load_beir(folder, split=split, download=False)
    pos_of = {d: i for i, d in enumerate(corpus.doc_ids)}
    qids, qtexts, positives = [], [], []
    for qid, rel in corpus.qrels.items():
        pos = sorted(pos_of[d] for d, g in rel.items() if g > 0 and d in pos_of)
        text = corpus.queries.get(qid, "")
        if not pos or not text.strip():
            continue
        qids.append(qid)
        qtexts.append(text)
        positives.append(np.asarray(pos, np.int64))
    if max_queries is not None:
        qids, qtexts, positives = qids[:max_queries], qtexts[:max_queries], positives[:max_queries]
    if not qids:
        raise ValueError(f"{name!r} split {split!r} has no query with a relevant document")
    pairs = TrainPairs(
        name=corpus.name,
        split=split,
        doc_ids=corpus.doc_ids,
        doc_texts=corpus.doc_texts,
        query_ids=qids,
        query_texts=qtexts,
        positives=positives,
        negatives=[np.zeros(0, np.int64) for _ in qids],
    )
    if negatives == "auto":
        negatives = "same-title" if _mostly_shared_titles(corpus) else "maxsim"
    if negatives == "same-title":
        pairs.negatives = same_title_negatives(corpus, positives)
        pairs.negatives_source = "same-title"
    elif negatives == "maxsim":
        pairs.negatives = mine_maxsim_negatives(
            corpus, qids, qtexts, positives, depth=depth, progress=progress
        )
        pairs.negatives_source = f"zero-shot-maxsim-top{depth}"
    return pairs


def _mostly_shared_titles(corpus: Corpus) -> bool:
    titles = [str((m or {}).get("title", "")) for m in (corpus.metadata or [])]
    if not titles or not any(titles):
        return False
    counts: dict[str, int] = defaultdict(int)
    for t in titles:
        counts[t] += 1
    shared = sum(1 for t in titles if t and counts[t] > 1)
    return shared > 0.5 * len(titles)


def same_title_negatives(corpus: Corpus, positives: list[np.ndarray]) -> list[np.ndarray]:
    """Per query, the documents that share a positive's title, positives excluded."""
    titles = [str((m or {}).get("title", "")) for m in (corpus.metadata or [])]
    by_title: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(titles):
        if t:
            by_title[t].append(i)
    out = []
    for pos in positives:
        ps = set(pos.tolist())
        cand = sorted({j for p in pos for j in by_title.get(titles[p], []) if j not in ps})
        out.append(np.asarray(cand, np.int64))
    return out


def mine_maxsim_negatives(
    corpus: Corpus,
    qids: list[str],
    qtexts: list[str],
    positives: list[np.ndarray],
    *,
    depth: int = 30,
    progress: bool = True,
) -> list[np.ndarray]:
    """Zero-shot MiniLM exact-MaxSim top-``depth`` per query, positives removed; cached."""
    from retrieval_prune.encode.cache import EmbeddingCache, texts_digest

    key = hashlib.sha256(
        json.dumps(
            {
                "v": 1,
                "miner": "zero-shot-maxsim",
                "dataset": corpus.name,
                "docs": texts_digest(corpus.doc_ids, corpus.doc_texts),
                "queries": texts_digest(qids, qtexts),
                "depth": depth,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:24]
    path = cache_root() / "train" / f"negatives-{key}.json"
    if path.is_file():
        ranked = json.loads(path.read_text(encoding="utf-8"))
    else:
        from retrieval_prune.encode import Encoder
        from retrieval_prune.kernels.ops import maxsim_search

        enc = Encoder.load(None)  # zero-shot: same settings as `eval` without --checkpoint
        cache = EmbeddingCache(cache_root() / "embeddings")
        docs = cache.get_or_encode(enc, corpus.name, corpus.doc_ids, corpus.doc_texts, kind="docs")
        queries = enc.encode_queries(qtexts, progress=progress)
        k = min(depth + max(len(p) for p in positives), len(corpus.doc_ids))
        _, ids = maxsim_search(
            queries.embeddings, queries.offsets, docs.embeddings, docs.offsets, k
        )
        ranked = ids.tolist()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, ranked)
    out = []
    for row, pos in zip(ranked, positives, strict=True):
        ps = set(pos.tolist())
        out.append(np.asarray([j for j in row if j >= 0 and j not in ps][:depth], np.int64))
    return out
