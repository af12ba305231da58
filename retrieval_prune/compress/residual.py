"""PLAID / ColBERTv2 residual codec: centroid id + per-dimension n-bit residual.

Bit layout (shared with the search kernels): for ``nbits`` in {1, 2, 4} a token's
residual occupies ``dim * nbits / 8`` bytes; byte ``b`` holds dims
``b*(8/nbits) .. (b+1)*(8/nbits) - 1``, the ``t``-th of them at bit position
``t * nbits`` (LSB first; for ``nbits=1`` this is ``np.packbits(..., bitorder="little")``).
Every dimension shares the bucket table: ``decoded = centroid[code] + bucket_values[bits]``.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from retrieval_prune.compress.base import code_dtype, nearest_centroid, sample_rows
from retrieval_prune.compress.kmeans import (
    CENTROID_BITS,
    CENTROID_BITS_HELP,
    K_SCALE_HELP,
    _CentroidCodec,
    train_kmeans,
)
from retrieval_prune.registry import Param, register

__all__ = ["ResidualCodec", "pack_bits", "unpack_bits"]

NBITS = (1, 2, 4)
#: held-out tokens used for the bucket quantiles (colbert-ai: 5% of the sample, capped)
HELDOUT_MAX = 65_536


def pack_bits(buckets: np.ndarray, nbits: int) -> np.ndarray:
    """Pack bucket indices ``uint8 (n, dim)`` (< 2**nbits) into ``uint8 (n, dim*nbits/8)``."""
    n, dim = buckets.shape
    per = 8 // nbits
    shifts = (np.arange(per, dtype=np.uint8) * nbits).astype(np.uint8)
    grouped = buckets.astype(np.uint8).reshape(n, dim // per, per)
    return np.bitwise_or.reduce(grouped << shifts, axis=2).astype(np.uint8)


def unpack_bits(packed: np.ndarray, nbits: int, dim: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: bucket indices ``uint8 (n, dim)``."""
    per = 8 // nbits
    shifts = (np.arange(per, dtype=np.uint8) * nbits).astype(np.uint8)
    mask = np.uint8((1 << nbits) - 1)
    vals = (np.asarray(packed, np.uint8)[:, :, None] >> shifts) & mask
    return vals.reshape(packed.shape[0], dim)


@register
class ResidualCodec(_CentroidCodec):
    """Centroid id plus the residual ``x - c`` quantized per dimension to ``nbits``.

    Bucket cutoffs are the ``i / 2**nbits`` quantiles of the residuals of held-out
    tokens (not used to train the codebook), bucket values the ``(i + 0.5) / 2**nbits``
    quantiles (midpoints), shared by all dimensions — as in ColBERTv2.
    Bytes per vector: ``dim * nbits / 8`` plus 1 (K <= 256) or 2 for the id.

    Parameters
    ----------
    k : int, optional
        Codebook size, 2..65,536 (default: colbert-ai's ``2**floor(log2(16 sqrt(n)))``).
    nbits : {1, 2, 4}
        Bits per residual dimension.
    sample : int
        Maximum tokens used to train the codebook.
    niter : int
        k-means iterations.
    normalize : bool
        L2-normalise decoded vectors (ColBERTv2 does; off by default so that
        ``decode(encode(.))`` is idempotent).
    centroid_bits : {16, 8}
        Precision of the stored codebook: float16 (colbert-ai) or int8 with one float32
        scale per centroid (a quarter of float32's bytes; the residuals are taken against
        the int8 values, so only the centroid-interaction stage sees the rounding).
    candidates : int
        A vector is coded against whichever of its ``candidates`` nearest centroids
        gives the smallest *quantized* reconstruction error (1 = the nearest centroid,
        as colbert-ai does). Never worse than 1, and it makes ``decode(encode(.))``
        idempotent: a decoded vector reconstructs exactly from its own centroid.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float32)
    >>> c = ResidualCodec(k=32, nbits=2).fit(x)
    >>> c.code_size, c.encode(x).shape
    (5, (3000, 5))
    """

    name = "residual"
    score_kind = "residual"
    params: ClassVar[dict[str, Param]] = {
        "k": Param(None, int, "codebook size (default: colbert-ai formula)", low=2, high=65536),
        "k_scale": Param(1.0, float, K_SCALE_HELP, low=0.0625, high=16.0),
        "nbits": Param(2, int, "bits per residual dimension", choices=NBITS),
        "sample": Param(262_144, int, "max training tokens", low=1),
        "niter": Param(4, int, "k-means iterations (colbert-ai: 4)", low=1),
        "normalize": Param(False, bool, "L2-normalise decoded vectors"),
        "candidates": Param(8, int, "nearest centroids tried per vector", low=1, high=64),
        "centroid_bits": Param(16, int, CENTROID_BITS_HELP, choices=CENTROID_BITS),
    }
    state_names = ("centroids", "cutoffs", "bucket_values")

    def __init__(self, **params) -> None:
        raw = params.get("nbits")
        if raw is not None:
            try:
                val = int(raw)
            except (TypeError, ValueError):
                val = None
            if val is not None and val not in NBITS:
                raise ValueError(
                    f"residual: nbits={raw} is not supported; choose nbits in {list(NBITS)}"
                )
        super().__init__(**params)
        self.score = "table"  # centroid-only table (candidate generation) if asked for

    def _fit(self, tokens, rng, n_total, seed) -> None:
        per = 8 // self.nbits
        if tokens.shape[1] % per:
            raise ValueError(
                f"residual: dim={tokens.shape[1]} must be a multiple of {per} for nbits={self.nbits} "
                f"(whole bytes per vector); project with pca:dim=... first"
            )
        n = tokens.shape[0]
        k = self._resolve_k(n, n_total)
        perm = rng.permutation(n) if n <= 4 * (self.sample + HELDOUT_MAX) else None
        heldout_n = min(HELDOUT_MAX, n // 20) if n - n // 20 >= k else 0
        if perm is None:  # very large n: sample without a full permutation
            pick = sample_rows(n, heldout_n + max(self.sample, k), rng)
            perm = rng.permutation(pick)
        held = np.sort(perm[:heldout_n])
        train = np.sort(perm[heldout_n : heldout_n + max(self.sample, k)])
        self._set_centroids(train_kmeans(tokens[train], k, self.niter, seed))
        ref = tokens[held] if heldout_n else tokens[train]
        codes = nearest_centroid(ref, self.centroids_, np.dtype(np.int64))
        res = (np.asarray(ref, np.float32) - self.centroids_[codes]).ravel()
        b = 1 << self.nbits
        self.cutoffs_ = np.quantile(res, np.arange(1, b) / b).astype(np.float32)
        self.bucket_values_ = np.quantile(res, (np.arange(b) + 0.5) / b).astype(np.float32)

    def part_layout(self):
        return [
            ("codes", code_dtype(self.n_centroids), ()),
            ("residuals", np.dtype(np.uint8), (self.dim_in * self.nbits // 8,)),
        ]

    def _quantize(self, res: np.ndarray) -> np.ndarray:
        return (
            np.searchsorted(self.cutoffs_, res.ravel(), side="left")
            .astype(np.uint8)
            .reshape(res.shape)
        )

    def _encode_block(self, tokens):
        m = min(self.candidates, self.n_centroids)
        if m == 1:
            codes = nearest_centroid(tokens, self.centroids_, np.dtype(np.int64))
        else:
            cand = nearest_centroid(tokens, self.centroids_, np.dtype(np.int64), k=m)
            codes = cand[:, 0].copy()
            best = np.full(tokens.shape[0], np.inf, np.float32)
            for j in range(m):  # keep the candidate with the smallest quantized error
                res = tokens - self.centroids_[cand[:, j]]
                err = res - self.bucket_values_[self._quantize(res)]
                err = np.einsum("ij,ij->i", err, err)
                better = err < best
                best[better] = err[better]
                codes[better] = cand[better, j]
        res = tokens - self.centroids_[codes]
        return {
            "codes": codes.astype(code_dtype(self.n_centroids)),
            "residuals": pack_bits(self._quantize(res), self.nbits),
        }

    def _decode_parts(self, parts):
        codes = np.asarray(parts["codes"], np.int64)
        buckets = unpack_bits(parts["residuals"], self.nbits, self.dim_in)
        out = self.centroids_[codes] + self.bucket_values_[buckets]
        if self.normalize:
            norm = np.linalg.norm(out, axis=1, keepdims=True)
            out /= np.maximum(norm, 1e-12)
        return out.astype(np.float32, copy=False)

    def _after_load(self) -> None:
        super()._after_load()
        self.cutoffs_ = np.asarray(self.cutoffs_, np.float32)
        self.bucket_values_ = np.asarray(self.bucket_values_, np.float32)

    def _check_state(self) -> None:
        super()._check_state()
        b = 1 << self.nbits
        if self.cutoffs_.shape != (b - 1,) or self.bucket_values_.shape != (b,):
            raise ValueError(
                f"{self.spec}: cutoffs {self.cutoffs_.shape} / bucket_values "
                f"{self.bucket_values_.shape} must have {b - 1} / {b} entries for nbits={self.nbits}"
            )
        if (self.dim_in * self.nbits) % 8:
            raise ValueError(f"{self.spec}: dim_in={self.dim_in} does not fill whole bytes at nbits={self.nbits}")
