"""IVF index: PLAID-style staged search with an inverted file over the centroids.

Candidates are the documents of the ``nprobe`` best centroids of every query token,
found exactly from the score table (``probe=table``, PLAID) or by Hamming distance
between the sign bits of the query tokens and of the centroids (``probe=hamming``: a
binary prefilter that never touches the float table for probing). Approximate scoring,
pruning and rerank are :class:`~retrieval_prune.index.staged.StagedIndex`'s.

Examples
--------
>>> import numpy as np
>>> from retrieval_prune import MultiVectors
>>> rng = np.random.default_rng(0)
>>> docs = MultiVectors.from_list([rng.standard_normal((6, 16)).astype(np.float32) for _ in range(40)])
>>> index = IVFIndex.from_codecs("residual:k=16,nbits=2", nprobe=2)
>>> index.spec
'residual:k=16,k_scale=1.0,nbits=2,sample=262144,niter=4,normalize=false,candidates=8,centroid_bits=16 | ivf:nprobe=2,probe=table'
>>> index.add(docs, [f"d{i}" for i in range(40)])
>>> index.search(docs[3:4], k=1).external(0)[0][0]
'd3'
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from retrieval_prune.index.staged import STAGE_PARAMS, StagedIndex
from retrieval_prune.kernels import ivf as _ivf_k
from retrieval_prune.registry import Param, register

__all__ = ["IVFIndex", "sign_words"]


def sign_words(x: np.ndarray) -> np.ndarray:
    """Sign bits of every row as little-endian ``uint64`` words ``(n, ceil(dim / 64))``."""
    bits = np.packbits(np.asarray(x) > 0, axis=1, bitorder="little")
    nb = bits.shape[1]
    nw = -(-nb // 8)
    if nb != nw * 8:
        bits = np.concatenate([bits, np.zeros((bits.shape[0], nw * 8 - nb), np.uint8)], axis=1)
    return np.ascontiguousarray(bits).view("<u8").astype(np.uint64, copy=False).reshape(-1, nw)


@register
class IVFIndex(StagedIndex):
    """Staged search over centroid codes with an inverted file (PLAID-style).

    Parameters
    ----------
    nprobe : int
        Centroids probed per query token (candidate generation).
    t_cs : float, optional
        Centroid score threshold: centroids whose best similarity to the query is below
        it are pruned from the first approximate pass (PLAID); unset, no pruning.
    n_candidates : int, optional
        Documents kept after the approximate (centroid-interaction) scoring. Unset, it
        follows ``k`` as colbert-ai's PLAID ``ndocs``: 256 for k <= 10, 1,024 for k <= 100.
    n_rerank : int, optional
        Documents re-scored exactly from decompressed residuals (at least ``k``). Unset,
        a quarter of ``n_candidates`` (PLAID).
    probe : {"table", "hamming"}
        How probed centroids are found: exactly from the score table, or by Hamming
        distance between sign bits (binary prefilter).
    """

    name = "ivf"
    index_type = "ivf"
    params: ClassVar[dict[str, Param]] = {
        **STAGE_PARAMS,
        "probe": Param("table", str, "how probed centroids are found", choices=("table", "hamming")),
    }

    def _prepare_probe(self, cache: dict[str, Any]) -> None:
        if self.probe == "hamming":
            cache["centroid_words"] = sign_words(cache["centroids"])

    def _probe(self, cache: dict[str, Any], table: np.ndarray, q: np.ndarray, rng: np.ndarray | None = None) -> np.ndarray:
        n = min(self.nprobe, table.shape[0])
        out = np.empty((q.shape[0], n), np.int64)
        if self.probe == "hamming":
            words = cache.get("centroid_words")
            if words is None:
                words = cache["centroid_words"] = sign_words(cache["centroids"])
            _ivf_k.hamming_probe_kernel(sign_words(q), words, n, out)
        else:
            r = rng if rng is not None else np.empty(2, np.float32)
            _ivf_k.topn_cols_kernel(table, q.shape[0], n, out, r)
        return out.reshape(-1)
