"""Shared helpers of the data-stage plug-ins: seeded k-means over pair embeddings, the
``keep`` check, cosine distances to centroids.

The k-means is the project's Numba k-means of :mod:`retrieval_prune.kernels.tokens`
(k-means++ seeding from a splitmix64 stream, then Lloyd steps; the same code CRISP uses per
sequence), run once over a collection's pair embeddings. Its seed is drawn from the
generator :meth:`DataPreprocessor.select` hands the plug-in (``default_rng([seed,
collection index])``), so no global RNG is touched and the result is a function of the spec
and the input only.
"""

from __future__ import annotations

import numpy as np

from retrieval_prune.kernels import tokens as K

__all__ = ["auto_clusters", "kmeans", "cosine_to_centroids", "KMEANS_ITERS"]

#: Lloyd steps (stops earlier when the assignment settles)
KMEANS_ITERS = 30


def auto_clusters(n: int, clusters: int) -> int:
    """``clusters`` when given (> 0), else ``round(sqrt(n / 2))``; always within [1, n]."""
    k = int(clusters) if clusters and clusters > 0 else int(round(np.sqrt(n / 2.0)))
    return max(1, min(int(n), k))


def kmeans(
    x: np.ndarray, k: int, rng: np.random.Generator, iters: int = KMEANS_ITERS
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded k-means of the rows of ``x`` into at most ``k`` clusters.

    Parameters
    ----------
    x : float (n, d) vectors (the pair embeddings; unit vectors, squared Euclidean distance).
    k : clusters asked for (fewer come back when ``x`` has fewer distinct rows, or when a
        cluster ends empty).
    rng : the plug-in's generator; one integer is drawn from it as the k-means seed.

    Returns
    -------
    labels : int64 (n,), cluster of each row, ``0 .. k' - 1`` with every cluster non-empty.
    centroids : float64 (k', d), the mean of each cluster's members (not normalised).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[0]
    seed = int(rng.integers(0, 2**62))
    k = max(1, min(int(k), n))
    if k == 1:
        labels = np.zeros(n, np.int64)
    else:
        init = K.kmeans_pp_init(x, k, seed)
        labels = np.empty(n, np.int64)
        K.lloyd(x, init, max(int(iters), 1), labels)
    used, labels = np.unique(labels, return_inverse=True)  # drop empty clusters
    labels = labels.astype(np.int64).reshape(-1)
    counts = np.bincount(labels, minlength=used.size)
    cent = np.zeros((used.size, x.shape[1]), np.float64)
    np.add.at(cent, labels, x.astype(np.float64))
    cent /= counts[:, None]
    return labels, cent


def unit_rows(c: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    norms = np.linalg.norm(c, axis=1, keepdims=True)
    return np.divide(c, norms, out=np.zeros_like(c, dtype=np.float64), where=norms > 0)


def cosine_to_centroids(x: np.ndarray, labels: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Cosine distance ``1 - cos(x_i, c_{label(i)})`` of every row to its own centroid
    (float64 (n,))."""
    xu = unit_rows(np.asarray(x, np.float64))
    cu = unit_rows(centroids)
    return 1.0 - np.einsum("ij,ij->i", xu, cu[labels])
