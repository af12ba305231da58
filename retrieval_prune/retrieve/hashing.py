"""A deterministic toy text encoder: every word becomes a fixed random unit vector.

It needs no model and no torch, so tests, examples and the HTTP server can run in
milliseconds. MaxSim over it behaves like soft word overlap: a query word that appears in a
document scores 1 against it. It is **not** a retrieval model; use
:class:`retrieval_prune.encode.Encoder` for real work.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from retrieval_prune.types import MultiVectors

__all__ = ["HashingEncoder", "HASHING_MODE"]

#: ``settings["mode"]`` of this encoder (how an index records that it used it)
HASHING_MODE = "hashing"
_WORD = re.compile(r"\w+", re.UNICODE)


class HashingEncoder:
    """Hash each lower-cased word to a seeded random unit vector of ``dim`` floats.

    Parameters
    ----------
    dim : int
        Vector dimension (>= 2).
    seed : int
        Mixed into every word's hash; two encoders agree iff ``dim`` and ``seed`` agree.
    doc_maxlen, query_maxlen : int
        Words kept per document / query (the rest is truncated, like a tokenizer would).

    Examples
    --------
    >>> enc = HashingEncoder(dim=8)
    >>> q = enc.encode_queries(["red apple"])
    >>> d = enc.encode_documents(["an apple", ""], progress=False)
    >>> q.lengths.tolist(), d.lengths.tolist()
    ([2], [2, 0])
    """

    def __init__(self, dim: int = 32, seed: int = 0, doc_maxlen: int = 256, query_maxlen: int = 32):
        for name, v, lo in (
            ("dim", dim, 2),
            ("doc_maxlen", doc_maxlen, 1),
            ("query_maxlen", query_maxlen, 1),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}={v!r} must be an int >= {lo}")
        self.dim, self.seed = dim, int(seed)
        self.doc_maxlen, self.query_maxlen = doc_maxlen, query_maxlen
        self._cache: dict[str, np.ndarray] = {}

    @property
    def settings(self) -> dict[str, Any]:
        """JSON-able settings; :meth:`from_settings` rebuilds an equal encoder."""
        return {
            "mode": HASHING_MODE,
            "dim": self.dim,
            "seed": self.seed,
            "doc_maxlen": self.doc_maxlen,
            "query_maxlen": self.query_maxlen,
            "normalize": True,
        }

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> HashingEncoder:
        if settings.get("mode") != HASHING_MODE:
            raise ValueError(f"settings mode={settings.get('mode')!r} is not {HASHING_MODE!r}")
        return cls(
            dim=settings["dim"],
            seed=settings["seed"],
            doc_maxlen=settings["doc_maxlen"],
            query_maxlen=settings["query_maxlen"],
        )

    def __repr__(self) -> str:
        return f"HashingEncoder(dim={self.dim}, seed={self.seed})"

    def _word(self, w: str) -> np.ndarray:
        v = self._cache.get(w)
        if v is None:
            h = hashlib.blake2b(f"{self.seed}\0{w}".encode(), digest_size=8).digest()
            rng = np.random.default_rng(int.from_bytes(h, "little"))
            v = rng.standard_normal(self.dim).astype(np.float32)
            v /= np.linalg.norm(v)
            self._cache[w] = v  # benign race: every thread computes the same vector
        return v

    def _encode(self, texts: Sequence[str], maxlen: int) -> MultiVectors:
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, got one str; wrap it in a list")
        docs = []
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"texts hold a {type(t).__name__}, expected str")
            words = _WORD.findall(t.lower())[:maxlen]
            docs.append(
                np.stack([self._word(w) for w in words])
                if words
                else np.zeros((0, self.dim), np.float32)
            )
        return MultiVectors.from_list(docs, dim=self.dim)

    def encode_documents(
        self, texts: Sequence[str], *, progress: bool = False, return_importance: bool = False
    ) -> MultiVectors:
        """Documents as ``(n_words, dim)`` unit vectors; ``return_importance`` gives 1/n weights."""
        mv = self._encode(texts, self.doc_maxlen)
        if return_importance:
            n = np.repeat(np.maximum(mv.lengths, 1), mv.lengths).astype(np.float32)
            mv = MultiVectors(mv.embeddings, mv.offsets, (1.0 / n).astype(np.float32))
        return mv

    def encode_queries(
        self, texts: Sequence[str], *, progress: bool = False, return_importance: bool = False
    ) -> MultiVectors:
        """Queries as ``(n_words, dim)`` unit vectors."""
        return self._encode(texts, self.query_maxlen)
