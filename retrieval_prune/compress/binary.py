"""Sign-bit binary codec: one bit per dimension (16 bytes per 128-d vector).

Canonical layout (shared with the kernels): ``uint8 (n, ceil(dim/8)) =
np.packbits(x > 0, axis=1, bitorder="little")``. Two scorings:

``score=asym``     float query against the ±1 document bits: ``Σ_i max_j <q_i, s_j>``
``score=hamming``  query signs against document signs: ``Σ_i max_j (dim - 2·hamming)``

Decoded vectors are ``±1 / sqrt(dim)`` (unit norm, like the normalised inputs); both
scorings rank as the products above do.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from retrieval_prune.compress.base import Codec, check_tokens
from retrieval_prune.registry import Param, register

__all__ = ["BinaryCodec", "sign_bits", "bits_to_signs"]


def sign_bits(x: np.ndarray) -> np.ndarray:
    """``uint8 (n, ceil(dim/8))``: bit ``j`` of a row (LSB-first) is ``x[j] > 0``."""
    return np.packbits(np.asarray(x) > 0, axis=1, bitorder="little")


def bits_to_signs(bits: np.ndarray, dim: int) -> np.ndarray:
    """``float32 (n, dim)`` of ±1 from :func:`sign_bits` output."""
    b = np.unpackbits(np.asarray(bits, np.uint8), axis=1, count=dim, bitorder="little")
    return b.astype(np.float32) * 2.0 - 1.0


@register
class BinaryCodec(Codec):
    """Sign bits of every dimension (``x > 0``), scored asymmetrically or by Hamming.

    Parameters
    ----------
    kind : {"sign"}
        Which binary code (sign bits; hierarchical centroid ids are ``hkmeans``).
    score : {"asym", "hamming"}
        Float query vs document bits (default, keeps more quality) or bits vs bits.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((4, 128)).astype(np.float32)
    >>> c = BinaryCodec().fit(x)
    >>> c.spec, c.code_size, c.encode(x).shape
    ('binary:kind=sign,score=asym', 16, (4, 16))
    """

    name = "binary"
    score_kind = "binary"
    params: ClassVar[dict[str, Param]] = {
        "kind": Param("sign", str, "binary code", choices=("sign",)),
        "score": Param("asym", str, "query scoring", choices=("asym", "hamming")),
    }

    def _fit(self, tokens, rng, n_total, seed) -> None:
        pass

    def part_layout(self):
        return [("bits", np.dtype(np.uint8), (-(-self.dim_in // 8),))]

    def _encode_block(self, tokens):
        return {"bits": sign_bits(tokens)}

    def _decode_parts(self, parts):
        return bits_to_signs(parts["bits"], self.dim_in) / np.float32(np.sqrt(self.dim_in))

    def query_vectors(self, queries: np.ndarray) -> np.ndarray:
        """Query side of the scoring: the float query (asym) or its ±1 signs (hamming),
        scaled so that ``<query_vectors(q), decode(code)>`` is the score."""
        self._check_fitted()
        q = check_tokens(queries, self.dim_in, what="queries")
        if self.score == "asym":
            return np.ascontiguousarray(q * np.float32(np.sqrt(self.dim_in)))
        return bits_to_signs(sign_bits(q), self.dim_in) * np.float32(np.sqrt(self.dim_in))
