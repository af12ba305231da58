"""Float codecs: ``fp16`` (half precision storage), ``f32`` (identity) and ``pca:dim=N``."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from retrieval_prune.compress.base import BATCH, Codec, check_tokens, sample_rows
from retrieval_prune.registry import Param, register

__all__ = ["Float16Codec", "Float32Codec", "PCACodec"]


@register
class Float32Codec(Codec):
    """Uncompressed float32 storage (4 bytes per dimension) — the identity codec.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.ones((2, 4), np.float32)
    >>> c = Float32Codec().fit(x)
    >>> c.code_size, bool((c.decode(c.encode(x)) == x).all())
    (16, True)
    """

    name = "f32"
    params: ClassVar[dict[str, Param]] = {}
    _dtype: ClassVar[type] = np.float32

    def _fit(self, tokens, rng, n_total, seed) -> None:
        pass

    def part_layout(self):
        return [("vectors", np.dtype(self._dtype), (self.dim_in,))]

    def _encode_block(self, tokens):
        return {"vectors": tokens.astype(self._dtype)}

    def _decode_parts(self, parts):
        return np.asarray(parts["vectors"], dtype=np.float32)


@register
class Float16Codec(Float32Codec):
    """Half-precision storage (2 bytes per dimension); scored by exact MaxSim after decode.

    Examples
    --------
    >>> import numpy as np
    >>> c = Float16Codec().fit(np.ones((3, 128), np.float32))
    >>> c.spec, c.code_size
    ('fp16', 256)
    """

    name = "fp16"
    _dtype = np.float16
    score_kind = "fp16"

    def _encode_block(self, tokens):
        big = np.abs(tokens).max(initial=0.0)
        if big > 65504:
            raise ValueError(
                f"a token value of magnitude {big:g} overflows float16 (max 65504); "
                "normalise the vectors or use f32"
            )
        return {"vectors": tokens.astype(np.float16)}


@register
class PCACodec(Codec):
    """Orthogonal projection onto the top ``dim`` principal axes (uncentred).

    The axes are the leading eigenvectors of the second-moment matrix ``E[x xᵀ]``
    of a token sample, so ``<x W, y W>`` is the best rank-``dim`` approximation of
    ``<x, y>`` and MaxSim can be computed in the projected space. No mean is
    subtracted: centring queries and documents alike would change MaxSim rankings.
    In a chain (``pca:dim=128 | residual:nbits=2``) the projection is applied to
    documents and queries and the next codec stores the projected vectors; alone, it
    stores them as float32. ``decode`` maps back to the input space (``y Wᵀ``).

    Parameters
    ----------
    dim : int
        Output dimension, ``1 <= dim <= input dim``.
    sample : int
        Maximum number of tokens used to estimate the axes.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((500, 16)).astype(np.float32)
    >>> p = PCACodec(dim=4).fit(x)
    >>> p.encode(x).shape, p.decode(p.encode(x)).shape, p.code_size
    ((500, 4), (500, 16), 16)
    """

    name = "pca"
    is_transform = True
    params: ClassVar[dict[str, Param]] = {
        "dim": Param(128, int, "output dimension", low=1),
        "sample": Param(100_000, int, "max tokens used to fit", low=1),
    }
    state_names = ("components",)

    @property
    def dim_out(self) -> int:
        self._check_fitted()
        return int(self.dim)

    def _fit(self, tokens, rng, n_total, seed) -> None:
        d = tokens.shape[1]
        if self.dim > d:
            raise ValueError(f"pca: dim={self.dim} exceeds the input dim={d}; choose dim <= {d}")
        rows = sample_rows(tokens.shape[0], self.sample, rng)
        cov = np.zeros((d, d), np.float64)
        for a in range(0, rows.size, BATCH):
            block = np.asarray(tokens[rows[a : a + BATCH]], dtype=np.float64)
            cov += block.T @ block
        vals, vecs = np.linalg.eigh(cov)
        comp = vecs[:, ::-1][:, : self.dim]
        # deterministic sign: the largest-magnitude entry of every axis is positive
        flip = np.sign(comp[np.abs(comp).argmax(axis=0), np.arange(comp.shape[1])])
        flip[flip == 0] = 1
        self.components_ = np.ascontiguousarray(comp * flip, dtype=np.float32)  # (d, dim)

    def _check_state(self) -> None:
        if self.components_.shape != (self.dim_in, int(self.dim)):
            raise ValueError(
                f"{self.spec}: components of shape {self.components_.shape}, expected "
                f"({self.dim_in}, {self.dim})"
            )
        self.components_ = np.ascontiguousarray(self.components_, dtype=np.float32)

    def transform(self, tokens: np.ndarray) -> np.ndarray:
        """Projected float32 ``(n, dim)`` vectors (the search space of a chain)."""
        self._check_fitted()
        tokens = check_tokens(tokens, self.dim_in)
        return np.ascontiguousarray(tokens @ self.components_, dtype=np.float32)

    def inverse(self, projected: np.ndarray) -> np.ndarray:
        """Back to the input space: float32 ``(n, dim_in)``."""
        self._check_fitted()
        return np.ascontiguousarray(np.asarray(projected, np.float32) @ self.components_.T)

    def part_layout(self):
        return [("vectors", np.dtype(np.float32), (int(self.dim),))]

    def _encode_block(self, tokens):
        return {"vectors": tokens @ self.components_}

    def _decode_parts(self, parts):
        return self.inverse(parts["vectors"])
