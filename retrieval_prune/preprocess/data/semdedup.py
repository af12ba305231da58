"""SemDeDup: semantic de-duplication of training pairs (Abbas et al. 2023)."""

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

__all__ = ["SemDeDup"]


@register
class SemDeDup(DataPreprocessor):
    """Remove semantic near-duplicate training queries, keeping one per duplicate group.

    Abbas, Tirumala, Simig, Ganguli, Morcos, "SemDeDup: Data-efficient learning at web-scale
    through semantic deduplication", arXiv:2303.09540 (2023). Per collection:

    1. k-means of the pair embeddings (unit vectors; ``clusters`` clusters, 0 = auto
       ``round(sqrt(n / 2))``), seeded by ``seed`` and the collection's index;
    2. inside each cluster, members are ordered by cosine distance to their centroid,
       **farthest first** (the paper's choice: the kept representative of a duplicate group
       is the one least similar to the centroid, i.e. the least prototypical); ties by
       position;
    3. a member is removed when its cosine similarity to any member earlier in that order
       exceeds ``1 - eps`` (the paper's ``max(triu(S)) > 1 - eps`` rule, so removal is not
       transitive-group based: a member similar only to an already removed one is removed
       too, as in the paper's code).

    Aliases map each removed query to a kept one: to the earlier member it is most similar
    to, followed through that member's alias when it was removed itself (so every alias
    points at a kept query of the same cluster).

    Duplicates split across two k-means clusters are not found (the paper's approximation;
    more clusters = faster, fewer = more thorough). ``eps=0`` removes nothing (the
    threshold ``cos > 1`` cannot hold in exact arithmetic; float noise on identical vectors
    is not allowed to decide), so it is the identity. Similarities are computed in float64.

    Parameters
    ----------
    eps : float in [0, 1], default 0.05
        Duplicate threshold: cosine similarity ``> 1 - eps``.
    clusters : int >= 0, default 0
        k-means clusters per collection (0: ``round(sqrt(n / 2))``; at most ``n``).
    seed : int >= 0, default 0

    Examples
    --------
    >>> import numpy as np
    >>> from retrieval_prune import registry
    >>> from retrieval_prune.preprocess.base import PairSet
    >>> x = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0]]   # synthetic: row 4 repeats row 0
    >>> step = registry.build("semdedup:eps=0.05,clusters=2")
    >>> sel = step.select([PairSet("toy", list("abcde"), embeddings=x)])
    >>> sel.kept["toy"], sel.aliases["toy"]
    (['a', 'b', 'c', 'd'], {'e': 'a'})
    """

    name = "semdedup"
    params: ClassVar[dict[str, Param]] = {
        "eps": Param(0.05, float, "duplicates: cosine similarity > 1 - eps", low=0.0, high=1.0),
        "clusters": Param(0, int, "k-means clusters (0: round(sqrt(n / 2)))", low=0),
        "seed": Param(0, int, "k-means seed", low=0),
    }
    needs_embeddings: ClassVar[bool] = True
    identity_params: ClassVar[dict[str, Any]] = {"eps": 0.0}

    def _select(
        self, ps: PairSet, rng: np.random.Generator
    ) -> tuple[np.ndarray, dict[int, int], dict[str, Any]]:
        n = len(ps)
        if self.eps == 0.0 or n == 1:
            return np.arange(n, dtype=np.int64), {}, {"clusters": 1 if n == 1 else 0, "removed": 0}
        x = np.asarray(ps.embeddings)
        labels, cent = kmeans(x, auto_clusters(n, self.clusters), rng)
        dist = cosine_to_centroids(x, labels, cent)
        xu = unit_rows(np.asarray(x, np.float64))
        threshold = 1.0 - float(self.eps)
        removed = np.zeros(n, bool)
        alias: dict[int, int] = {}
        for c in range(cent.shape[0]):
            members = np.flatnonzero(labels == c)
            if members.size < 2:
                continue
            # farthest from the centroid first; ties by position
            members = members[np.lexsort((members, -dist[members]))]
            sim = xu[members] @ xu[members].T
            upper = np.triu(sim, k=1)  # upper[i, j]: similarity of j to an earlier i
            upper[np.tril_indices(members.size)] = -np.inf
            best = upper.max(axis=0)
            who = upper.argmax(axis=0)
            for j in np.flatnonzero(best > threshold):  # increasing order: roots first
                target = int(members[who[j]])
                removed[members[j]] = True
                alias[int(members[j])] = alias.get(target, target)
        kept = np.flatnonzero(~removed).astype(np.int64)
        info = {
            "clusters": int(cent.shape[0]),
            "removed": int(removed.sum()),
            "threshold": threshold,
        }
        return kept, dict(sorted(alias.items())), info
