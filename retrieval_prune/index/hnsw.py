"""HNSW index: staged search whose candidate generator is an hnswlib graph.

HPC-ColPali proposes HNSW over the centroid-reconstructed token vectors. Every token of a
K-means cell reconstructs to the same vector, so a graph over all tokens would hold only
K distinct points, each repeated (and HNSW degrades on exact duplicates); we index the
K distinct reconstructed vectors -- the centroids -- once, with inner-product distance,
and map a found centroid to its documents through the inverted file. A query token's
``nprobe`` graph neighbours replace the exact top-``nprobe`` of the score table, which
matters when K is large; approximate scoring and rerank are
:class:`~retrieval_prune.index.staged.StagedIndex`'s.

The graph is not stored: loading rebuilds it from the stored centroids (seeded,
single-threaded, so it is the graph the index was built with). hnswlib checks nothing in
the files it loads and crashes on a crafted header even when checksums were recomputed, so
no index file ever reaches it; `scripts/reliability.py` measures what the rebuild costs.

Examples
--------
>>> import numpy as np
>>> from retrieval_prune import MultiVectors
>>> rng = np.random.default_rng(0)
>>> docs = MultiVectors.from_list([rng.standard_normal((6, 16)).astype(np.float32) for _ in range(40)])
>>> index = HNSWIndex.from_codecs("residual:k=16,nbits=2", nprobe=2)
>>> index.add(docs, [f"d{i}" for i in range(40)])
>>> index.search(docs[3:4], k=1).external(0)[0][0]
'd3'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from retrieval_prune.index.base import register_index_type
from retrieval_prune.index.staged import STAGE_PARAMS, StagedIndex
from retrieval_prune.registry import Param, register

__all__ = ["HNSWIndex"]

#: file name of the graph inside a generation
GRAPH_FILE = "centroids.hnsw"


def _hnswlib():
    try:
        import hnswlib
    except ImportError:  # pragma: no cover - a declared dependency
        raise ImportError(
            "the hnsw index needs hnswlib: pip install 'hnswlib>=0.8,<0.9'"
        ) from None
    return hnswlib


@register_index_type
@register
class HNSWIndex(StagedIndex):
    """Staged search with an HNSW graph over the centroids as candidate generator.

    Parameters
    ----------
    nprobe, t_cs, n_candidates, n_rerank
        As for :class:`~retrieval_prune.index.ivf.IVFIndex`.
    m : int
        Graph degree (hnswlib ``M``).
    ef_construction : int
        Build-time beam width.
    ef : int
        Search-time beam width (at least ``nprobe`` is used).
    """

    name = "hnsw"
    index_type = "hnsw"
    params: ClassVar[dict[str, Param]] = {
        **STAGE_PARAMS,
        "m": Param(16, int, "graph degree (hnswlib M)", low=2, high=256),
        "ef_construction": Param(200, int, "build beam width", low=1),
        "ef": Param(64, int, "search beam width (>= nprobe is used)", low=1),
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._graph = None

    def _after_fit(self) -> None:
        hnswlib = _hnswlib()
        cent = np.ascontiguousarray(self.storage_codec.centroids_, dtype=np.float32)
        g = hnswlib.Index(space="ip", dim=cent.shape[1])
        g.init_index(
            max_elements=cent.shape[0], ef_construction=self.ef_construction, M=self.m,
            random_seed=self.seed,
        )  # fmt: skip
        g.set_num_threads(1)  # deterministic graph
        g.add_items(cent, np.arange(cent.shape[0]))
        self._graph = g

    def _load_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        super()._load_state(arrays, meta)
        # The graph is rebuilt from the stored (validated) centroids instead of handing
        # hnswlib a file it would trust blindly: a crafted header crashes hnswlib in native
        # code, checksums or not. The build is seeded and single-threaded, so the graph is
        # the one the index was built with; indexes that still carry GRAPH_FILE ignore it.
        self._after_fit()

    def _native_files(self, folder: Path) -> dict[str, Path]:
        if self._graph is None:
            raise ValueError("nothing to save: the hnsw graph is not built; add documents first")
        return {}  # rebuilt from the centroids on load (see _load_state)

    def _probe(self, cache: dict[str, Any], table: np.ndarray, q: np.ndarray) -> np.ndarray:
        n = min(self.nprobe, table.shape[0])
        g = self._graph
        g.set_ef(max(self.ef, n))
        labels, _ = g.knn_query(q, k=n, num_threads=1)
        return np.asarray(labels, np.int64).reshape(-1)
