"""Ranking metrics through ir-measures (trec_eval semantics), averaged over every judged query.

trec_eval skips queries that are missing from a run, which flatters a system that
returns nothing for hard queries; here a judged query with no results scores 0.
Negative grades (Cranfield's -1) count as not relevant.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import ir_measures

__all__ = ["evaluate", "DEFAULT_MEASURES"]

DEFAULT_MEASURES = ("nDCG@10", "R@100", "RR@10")
#: report keys for the measures' text forms
KEYS = {"nDCG@10": "ndcg@10", "R@100": "recall@100", "RR@10": "mrr@10"}


def evaluate(
    qrels: Mapping[str, Mapping[str, int]],
    run: Mapping[str, Mapping[str, float]],
    measures: Sequence[str] = DEFAULT_MEASURES,
) -> dict[str, float]:
    """Mean of each measure over the queries that have at least one relevant document.

    Parameters
    ----------
    qrels : {query_id: {doc_id: grade}}
    run : {query_id: {doc_id: score}}
    measures : ir-measures text forms, e.g. ``"nDCG@10"``.

    Returns ``{key: value}`` with keys from :data:`KEYS` (or the measure text).

    Examples
    --------
    >>> evaluate({"q": {"a": 1}}, {"q": {"a": 2.0, "b": 1.0}})["ndcg@10"]
    1.0
    """
    parsed = [ir_measures.parse_measure(m) for m in measures]
    clean_qrels = {
        q: {d: max(int(g), 0) for d, g in rel.items()}
        for q, rel in qrels.items()
        if any(int(g) > 0 for g in rel.values())
    }
    if not clean_qrels:
        raise ValueError("qrels hold no relevant judgement; nothing to evaluate")
    run = {q: {d: float(s) for d, s in docs.items()} for q, docs in run.items() if q in clean_qrels}
    sums = {str(m): 0.0 for m in parsed}
    for metric in ir_measures.iter_calc(parsed, clean_qrels, run):
        sums[str(metric.measure)] += float(metric.value)
    n = len(clean_qrels)
    return {KEYS.get(str(m), str(m)): sums[str(m)] / n for m in parsed}
