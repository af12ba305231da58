"""Centroid-id codecs: ``kmeans`` (faiss k-means, arbitrary ids) and ``hkmeans``
(balanced hierarchical 2-means, the id is the path in the tree).

Both store one centroid id per vector (uint8 for K <= 256, uint16 up to 65,536) and
keep a global codebook. Scoring against codes goes through a per-query table
``T (K, n_q)`` and ``score(q, d) = Σ_i max_j T[code_j, i]``:

``score=table``    ``T = centroids @ qᵀ`` (centroid interaction; the ids carry no meaning)
``score=hamming``  query tokens are coded too and ``T[k, i] = b - popcount(k ^ id(q_i))``
``score=prefix``   ``T[k, i]`` = length of the common leading-bit prefix of ``k`` and ``id(q_i)``

``hamming``/``prefix`` are HPC-ColPali's b-bit centroid strings. With k-means ids they
are arbitrary labels; with ``hkmeans`` a short Hamming/prefix distance means a near
centroid — :func:`id_geometry` measures how well each tracks centroid distance.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from retrieval_prune.compress.base import (
    Codec,
    check_tokens,
    code_dtype,
    colbert_num_centroids,
    faiss_threads,
    nearest_centroid,
    sample_rows,
)
from retrieval_prune.registry import Param, register

__all__ = ["KMeansCodec", "HierarchicalKMeansCodec", "train_kmeans", "id_geometry", "id_similarity"]

SCORES = ("table", "hamming", "prefix")


def _round_fp16(c: np.ndarray) -> np.ndarray:
    """Centroids as stored (float16, as colbert-ai keeps them) when that is lossless in range."""
    h = c.astype(np.float16)
    if np.isfinite(h).all():
        return h.astype(np.float32)
    return np.ascontiguousarray(c, dtype=np.float32)


#: the ``centroid_bits`` parameter of the centroid codecs
CENTROID_BITS_HELP = (
    "bits per stored centroid coordinate: 16 (float16, as colbert-ai stores them) or 8 (int8 "
    "with a float32 scale per centroid: half the codebook's bytes; codes and residuals are "
    "computed against exactly the stored values)"
)
CENTROID_BITS = (16, 8)


def _quantize_int8(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8 quantization: ``(q int8 (K, d), scale float32 (K,))``."""
    c = np.asarray(c, np.float32)
    amax = np.abs(c).max(axis=1) if c.size else np.zeros(c.shape[0], np.float32)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(c / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def _dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The float32 centroids an int8 codebook stands for (the same values at fit and load)."""
    return np.ascontiguousarray(q.astype(np.float32) * np.asarray(scale, np.float32)[:, None])


def train_kmeans(x: np.ndarray, k: int, niter: int, seed: int) -> np.ndarray:
    """faiss k-means on ``x`` (already sampled), float32 centroids ``(k, dim)``."""
    import faiss

    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=niter,
        seed=seed,
        verbose=False,
        min_points_per_centroid=1,
        max_points_per_centroid=max(1, -(-x.shape[0] // k)),  # we sampled already
    )
    with faiss_threads(float(x.shape[0]) * k * x.shape[1] * niter):
        km.train(np.ascontiguousarray(x, dtype=np.float32))
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def id_bits(k: int) -> int:
    """Bits of an id for a codebook of ``k`` entries (``ceil(log2 k)``, at least 1)."""
    return max(1, int(np.ceil(np.log2(k))))


def _bit_length(v: np.ndarray) -> np.ndarray:
    out = np.zeros(v.shape, np.int64)
    v = v.astype(np.int64)
    while np.any(v):
        nz = v > 0
        out[nz] += 1
        v = v >> 1
    return out


def id_similarity(a: np.ndarray, b: np.ndarray, nbits: int, metric: str) -> np.ndarray:
    """Similarity of b-bit ids (broadcast): ``nbits - hamming`` or the common-prefix length."""
    x = np.bitwise_xor(np.asarray(a, np.int64), np.asarray(b, np.int64))
    if metric == "hamming":
        return (nbits - np.bitwise_count(x)).astype(np.float32)
    if metric == "prefix":
        return (nbits - _bit_length(x)).astype(np.float32)
    raise ValueError(f"metric={metric!r} is not one of ['hamming', 'prefix']")


def id_geometry(centroids: np.ndarray, n_pairs: int = 20000, seed: int = 0) -> dict[str, float]:
    """Spearman correlation between centroid L2 distance and id distance, on random pairs.

    Returns ``{"hamming": rho, "prefix": rho}``; near 0 means the ids carry no geometry.
    """
    k = centroids.shape[0]
    nbits = id_bits(k)
    rng = np.random.default_rng(seed)
    a = rng.integers(0, k, n_pairs)
    b = rng.integers(0, k, n_pairs)
    keep = a != b
    a, b = a[keep], b[keep]
    dist = np.linalg.norm(centroids[a] - centroids[b], axis=1)

    def rank(v: np.ndarray) -> np.ndarray:  # average ranks for ties
        order = np.argsort(v, kind="stable")
        r = np.empty(v.size, np.float64)
        r[order] = np.arange(v.size)
        _, inv, counts = np.unique(v, return_inverse=True, return_counts=True)
        sums = np.bincount(inv, weights=r)
        return (sums / counts)[inv]

    out = {}
    rd = rank(dist)
    for metric in ("hamming", "prefix"):
        idd = -id_similarity(a, b, nbits, metric)  # distance = -similarity
        out[metric] = float(np.corrcoef(rd, rank(idd))[0, 1])
    return out


#: the ``k_scale`` parameter of the centroid codecs
K_SCALE_HELP = (
    "multiplier of the default codebook size when k is unset (rounded down to a power of "
    "two); 2 after a step that halves the tokens (pool:factor=2) keeps the codebook of the "
    "unpooled corpus"
)


class _CentroidCodec(Codec):
    """Shared machinery of the id codecs: codebook, assignment, query tables."""

    state_names = ("centroids",)
    score_kind = "table"
    #: int8 codebook and its per-centroid scales (``centroid_bits=8``), else None
    _centroids_i8: np.ndarray | None = None
    centroid_scale_: np.ndarray | None = None

    def _set_centroids(self, c: np.ndarray) -> None:
        """Store trained centroids at the precision they will be saved with, so that codes
        and residuals are computed against exactly the values a reloaded index uses."""
        if int(getattr(self, "centroid_bits", 16)) == 8:
            q, scale = _quantize_int8(c)
            self._centroids_i8, self.centroid_scale_ = q, scale
            self.centroids_ = _dequantize_int8(q, scale)
        else:
            self._centroids_i8 = self.centroid_scale_ = None
            self.centroids_ = _round_fp16(c)

    @property
    def n_centroids(self) -> int:
        self._check_fitted()
        return int(self.centroids_.shape[0])

    def _resolve_k(self, n_tokens: int, n_total: int) -> int:
        if self.k is not None:
            k = self.k
        else:
            k = colbert_num_centroids(n_total)
            scale = float(getattr(self, "k_scale", 1.0))
            if scale != 1.0:  # still a power of two, within the formula's caps
                k = 2 ** int(np.floor(np.log2(k * scale)))
                k = max(2, min(k, 65536, 2 ** int(np.floor(np.log2(max(n_total, 2))))))
        if n_tokens < k:
            raise ValueError(
                f"{self.name}: n_tokens={n_tokens} should be >= k={k}; lower k or fit on more tokens"
            )
        return int(k)

    def part_layout(self):
        return [("codes", code_dtype(self.n_centroids), ())]

    def _encode_block(self, tokens):
        return {"codes": nearest_centroid(tokens, self.centroids_, code_dtype(self.n_centroids))}

    def _decode_parts(self, parts):
        return self.centroids_[np.asarray(parts["codes"], np.int64)]

    def state_arrays(self):
        out = super().state_arrays()
        if self._centroids_i8 is not None:
            out["centroids"] = self._centroids_i8  # a quarter of float32's bytes
            out["centroid_scale"] = np.asarray(self.centroid_scale_, np.float32)
            return out
        c16 = self.centroids_.astype(np.float16)
        if np.array_equal(c16.astype(np.float32), self.centroids_):
            out["centroids"] = c16  # half the bytes; exactly the values in use
        return out

    def load_state(self, arrays):
        scale = arrays.get("centroid_scale")
        self.centroid_scale_ = None if scale is None else np.array(scale, np.float32)
        return super().load_state(arrays)

    def _after_load(self) -> None:
        c = self.centroids_
        if c.dtype == np.int8:
            scale = self.centroid_scale_
            if scale is None or scale.shape != (c.shape[0],):
                raise ValueError(
                    f"{self.spec}: int8 centroids {c.shape} need a float32 centroid_scale of shape "
                    f"({c.shape[0]},); the saved state has "
                    f"{'none' if scale is None else scale.shape} -- rebuild the index"
                )
            self._centroids_i8 = c
            self.centroids_ = _dequantize_int8(c, scale)
        else:
            self._centroids_i8 = self.centroid_scale_ = None
            self.centroids_ = np.ascontiguousarray(c, dtype=np.float32)

    def _check_state(self) -> None:
        c = self.centroids_
        if c.ndim != 2 or c.shape[1] != self.dim_in or not 1 <= c.shape[0] <= 65536:
            raise ValueError(
                f"{self.spec}: centroids of shape {c.shape} do not fit dim_in={self.dim_in} "
                "(1..65536 centroids of that dimension)"
            )
        s = self.centroid_scale_
        if s is not None and (s.shape != (c.shape[0],) or not np.isfinite(s).all() or (s < 0).any()):
            raise ValueError(f"{self.spec}: centroid_scale must be {c.shape[0]} finite values >= 0")

    def check_codes(self, parts: dict[str, np.ndarray]) -> None:
        """Every stored id names a centroid (a kernel would read outside the codebook)."""
        codes = parts.get("codes")
        if codes is not None and codes.size and int(np.max(codes)) >= self.n_centroids:
            raise ValueError(
                f"codes.codes holds id {int(np.max(codes))}, but there are {self.n_centroids} centroids"
            )

    def query_table(self, queries: np.ndarray) -> np.ndarray:
        """Per-token score table ``float32 (K, n_q)`` for code-table MaxSim."""
        self._check_fitted()
        q = check_tokens(queries, self.dim_in, what="queries")
        if self.score == "table":
            return np.ascontiguousarray(self.centroids_ @ q.T, dtype=np.float32)
        qids = nearest_centroid(q, self.centroids_, np.dtype(np.int64))
        k = np.arange(self.n_centroids, dtype=np.int64)
        sim = id_similarity(k[:, None], qids[None, :], id_bits(self.n_centroids), self.score)
        return np.ascontiguousarray(sim, dtype=np.float32)


@register
class KMeansCodec(_CentroidCodec):
    """Global k-means codebook; each vector stored as its nearest centroid's id.

    Parameters
    ----------
    k : int, optional
        Codebook size, 2..65,536 (uint8 codes up to 256). Default: colbert-ai's
        ``2**floor(log2(16 * sqrt(n_tokens)))`` of the fitted corpus.
    score : {"table", "hamming", "prefix"}
        How codes are scored against queries (see module docstring).
    sample : int
        Maximum tokens used to train the codebook (a uniform sample; memory bounded).
    niter : int
        k-means iterations.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((2000, 8)).astype(np.float32)
    >>> c = KMeansCodec(k=16).fit(x)
    >>> c.encode(x).dtype, c.code_size, c.decode(c.encode(x[:3])).shape
    (dtype('uint8'), 1, (3, 8))
    """

    name = "kmeans"
    params: ClassVar[dict[str, Param]] = {
        "k": Param(None, int, "codebook size (default: colbert-ai formula)", low=2, high=65536),
        "k_scale": Param(1.0, float, K_SCALE_HELP, low=0.0625, high=16.0),
        "score": Param("table", str, "query scoring", choices=SCORES),
        "sample": Param(262_144, int, "max training tokens", low=1),
        "niter": Param(4, int, "k-means iterations (colbert-ai: 4)", low=1),
        "centroid_bits": Param(16, int, CENTROID_BITS_HELP, choices=CENTROID_BITS),
    }

    def _fit(self, tokens, rng, n_total, seed) -> None:
        k = self._resolve_k(tokens.shape[0], n_total)
        rows = sample_rows(tokens.shape[0], max(self.sample, k), rng)
        self._set_centroids(train_kmeans(tokens[rows], k, self.niter, seed))


def balanced_tree(
    x: np.ndarray, depth: int, rng: np.random.Generator, niter: int = 4
) -> np.ndarray:
    """Balanced hierarchical 2-means: leaf centroids ``(2**depth, dim)`` in path order.

    Every node splits its points into two halves of equal size (the median of the
    projection on the 2-means boundary normal); the left child gets bit 0. Leaf ``i``
    is the node whose path, read MSB-first, spells ``i`` — so leaves sharing a long
    prefix descend from a small common subtree.
    """
    n = x.shape[0]
    order = np.arange(n)
    bounds = [(0, n)]
    for _ in range(depth):
        new_bounds = []
        for s, e in bounds:
            idx = order[s:e]
            pts = np.asarray(x[idx], dtype=np.float32)  # float32: bounded memory
            m = e - s
            half = m // 2
            if m >= 2:
                centred = pts - pts.mean(axis=0)
                v = rng.standard_normal(x.shape[1]).astype(np.float32)
                for _ in range(3):  # power iteration: the top principal direction
                    v = centred.T @ (centred @ v)
                    v /= np.linalg.norm(v) or 1.0
                proj = centred @ v
                for _ in range(niter):
                    part = np.argsort(proj, kind="stable")
                    c0 = pts[part[:half]].mean(axis=0)
                    c1 = pts[part[half:]].mean(axis=0)
                    proj = pts @ (c1 - c0)
                part = np.argsort(proj, kind="stable")
                order[s:e] = idx[part]
            new_bounds += [(s, s + half), (s + half, e)]
        bounds = new_bounds
    return np.stack([x[order[s:e]].mean(axis=0) for s, e in bounds]).astype(np.float32)


@register
class HierarchicalKMeansCodec(_CentroidCodec):
    """Centroid ids that are paths of a balanced 2-means tree (geometry-aware ids).

    The sound version of HPC-ColPali's b-bit centroid strings: ``k = 2**b`` leaves,
    each split halves its points, the id is the leaf's path, so the Hamming and
    common-prefix distances between ids track the distance between centroids.
    Vectors are coded with their nearest leaf centroid (exact L2 over all leaves).

    Parameters
    ----------
    k : int, optional
        Number of leaves, a power of two in 2..65,536 (default: colbert-ai formula).
    score : {"hamming", "table", "prefix"}
        How codes are scored against queries; default Hamming between id bits.
    sample : int
        Maximum tokens used to build the tree.
    niter : int
        Balanced 2-means iterations per node.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((1000, 8)).astype(np.float32)
    >>> c = HierarchicalKMeansCodec(k=16).fit(x)
    >>> c.spec, c.n_centroids
    ('hkmeans:k=16,score=hamming,sample=262144,niter=4', 16)
    """

    name = "hkmeans"
    params: ClassVar[dict[str, Param]] = {
        "k": Param(None, int, "number of leaves (power of two)", low=2, high=65536),
        "score": Param("hamming", str, "query scoring", choices=("hamming", "table", "prefix")),
        "sample": Param(262_144, int, "max training tokens", low=1),
        "niter": Param(4, int, "2-means iterations per node", low=1),
    }

    def __init__(self, **params) -> None:
        super().__init__(**params)
        if self.k is not None and self.k & (self.k - 1):
            lo = 1 << (self.k.bit_length() - 1)
            raise ValueError(
                f"hkmeans: k={self.k} must be a power of two (the id is a tree path); "
                f"use k={lo} or k={lo * 2}"
            )

    def _check_state(self) -> None:
        super()._check_state()
        k = self.centroids_.shape[0]
        if k < 2 or k & (k - 1):
            raise ValueError(f"{self.spec}: {k} leaves is not a power of two >= 2 (ids are tree paths)")

    def _fit(self, tokens, rng, n_total, seed) -> None:
        k = self._resolve_k(tokens.shape[0], n_total)
        rows = sample_rows(tokens.shape[0], max(self.sample, k), rng)
        depth = int(np.log2(k))
        self._set_centroids(
            balanced_tree(np.asarray(tokens[rows]), depth, rng, self.niter)
        )
