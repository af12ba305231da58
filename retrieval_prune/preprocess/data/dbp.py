"""Density-based pruning (DBP) of training pairs (Abbas et al. 2024)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from retrieval_prune.preprocess.base import DataPreprocessor, PairSet
from retrieval_prune.preprocess.data._cluster import (
    auto_clusters,
    cosine_to_centroids,
    kmeans,
    unit_rows,
)
from retrieval_prune.registry import Param, register

__all__ = ["DensityBasedPruning", "water_fill", "INTER_NEIGHBOURS"]

#: centroids averaged in d_inter (the paper's choice; fewer when there are fewer clusters)
INTER_NEIGHBOURS = 20


def water_fill(total: int, sizes: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Integer budgets ``N_j <= sizes_j`` summing to exactly ``total``, proportional to
    ``softmax(logits)`` wherever no cap binds.

    Clusters whose proportional share reaches their size are filled completely and the rest
    of the budget is shared again among the others, until no share exceeds a size (exact
    water-filling; the softmax is re-normalised over the open clusters in the log domain,
    so it never underflows to an all-zero share). The real-valued shares are then rounded
    by largest remainder (ties: lower cluster index first), which keeps every cluster at or
    below its size.

    Parameters
    ----------
    total : int, 0 <= total <= sizes.sum()
    sizes : int (K,) cluster sizes
    logits : float (K,) ``C_j / tau``
    """
    sizes = np.asarray(sizes, np.int64)
    logits = np.asarray(logits, np.float64)
    if not 0 <= total <= int(sizes.sum()):
        raise ValueError(f"budget {total} is outside [0, {int(sizes.sum())}]")
    out = np.zeros(sizes.size, np.int64)
    open_ = sizes > 0
    left = int(total)
    while True:
        idx = np.flatnonzero(open_)
        if left == 0 or idx.size == 0:
            return out
        z = logits[idx] - logits[idx].max()
        p = np.exp(z)
        share = left * p / p.sum()
        full = share >= sizes[idx]
        if full.any():
            f = idx[full]
            out[f] = sizes[f]
            left -= int(sizes[f].sum())
            open_[f] = False
            continue
        base = np.floor(share).astype(np.int64)
        rest = left - int(base.sum())
        frac = share - base
        order = np.lexsort((idx, -frac))  # largest remainder, then lower index
        base[order[:rest]] += 1
        out[idx] = base
        if int(out.sum()) != total or np.any(out > sizes):  # pragma: no cover - invariant
            raise RuntimeError(f"water_fill: budgets {out.tolist()} miss {total} or a size")
        return out


@register
class DensityBasedPruning(DataPreprocessor):
    """Keep ``round(keep * n)`` training queries, more of them from complex clusters.

    Abbas, Rusak, Tirumala, Brendel, Chaudhuri, Morcos, "Effective pruning of web-scale
    datasets based on complexity of concept clusters", ICLR 2024 (arXiv:2401.04578). Per
    collection:

    1. k-means of the pair embeddings (``clusters``, 0 = auto ``round(sqrt(n / 2))``);
    2. cluster complexity ``C_j = d_intra_j * d_inter_j``: ``d_intra`` = mean cosine
       distance of the members to their centroid, ``d_inter`` = mean cosine distance of the
       centroid to its ``min(20, K - 1)`` nearest other centroids (a lone cluster: ``C = 1``);
    3. budgets ``N_j`` proportional to ``softmax(C_j / tau)``, by exact water-filling
       (:func:`water_fill`: no cluster gets more than its size, the leftover is shared among
       the others, the total is exactly ``round(keep * n)``);
    4. inside a cluster, keep the ``N_j`` **hardest** members = farthest (cosine) from their
       centroid, the SSP-style prototypicality the paper uses within clusters (Sorscher et
       al. 2022: at the large-data regime, keep the least prototypical examples); ties by
       position.

    The paper runs SemDeDup before DBP; chain ``semdedup | dbp`` for that. ``keep=1`` is the
    identity (no clustering is run).

    Parameters
    ----------
    keep : float in (0, 1], default 0.3
    clusters : int >= 0, default 0
    tau : float > 0, default 0.1
        Softmax temperature over complexities (smaller: budgets follow complexity harder).
    seed : int >= 0, default 0

    Examples
    --------
    >>> import numpy as np
    >>> from retrieval_prune import registry
    >>> from retrieval_prune.preprocess.base import PairSet
    >>> x = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)  # synthetic
    >>> x /= np.linalg.norm(x, axis=1, keepdims=True)
    >>> sel = registry.build("dbp:keep=0.3").select([PairSet("toy", [str(i) for i in range(50)], x)])
    >>> len(sel.kept["toy"])
    15
    """

    name = "dbp"
    params: ClassVar[dict[str, Param]] = {
        "keep": Param(0.3, float, "fraction of training queries kept, in (0, 1]", low=0.0, high=1.0),
        "clusters": Param(0, int, "k-means clusters (0: round(sqrt(n / 2)))", low=0),
        "tau": Param(0.1, float, "softmax temperature over cluster complexities", low=1e-6),
        "seed": Param(0, int, "k-means seed", low=0),
    }
    needs_embeddings: ClassVar[bool] = True
    identity_params: ClassVar[dict[str, Any]] = {"keep": 1.0}

    def _select(
        self, ps: PairSet, rng: np.random.Generator
    ) -> tuple[np.ndarray, dict[int, int], dict[str, Any]]:
        n = len(ps)
        budget = self.budget(n)
        if budget == n:
            return np.arange(n, dtype=np.int64), {}, {"clusters": 0}
        x = np.asarray(ps.embeddings)
        labels, cent = kmeans(x, auto_clusters(n, self.clusters), rng)
        k = cent.shape[0]
        dist = cosine_to_centroids(x, labels, cent)
        sizes = np.bincount(labels, minlength=k).astype(np.int64)
        d_intra = np.bincount(labels, weights=dist, minlength=k) / sizes
        if k > 1:
            cu = unit_rows(cent)
            cd = 1.0 - cu @ cu.T
            np.fill_diagonal(cd, np.inf)
            m = min(INTER_NEIGHBOURS, k - 1)
            d_inter = np.sort(cd, axis=1)[:, :m].mean(axis=1)
            complexity = d_intra * d_inter
        else:
            d_inter = np.zeros(1)
            complexity = np.ones(1)
        quota = water_fill(budget, sizes, complexity / float(self.tau))
        kept = []
        for c in range(k):
            if quota[c] == 0:
                continue
            members = np.flatnonzero(labels == c)
            order = np.lexsort((members, -dist[members]))  # farthest first, then position
            kept.append(members[order[: quota[c]]])
        pos = np.sort(np.concatenate(kept)).astype(np.int64)
        info = {
            "clusters": int(k),
            "budget": int(budget),
            "full_clusters": int((quota == sizes).sum()),
            "empty_clusters": int((quota == 0).sum()),
            "complexity_min": float(complexity.min()),
            "complexity_max": float(complexity.max()),
        }
        return pos, {}, info
