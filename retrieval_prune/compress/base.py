"""The codec protocol shared by every compression step.

A codec is a registered :class:`~retrieval_prune.registry.Component` of stage
``"codec"``, faiss ``sa_encode``/``sa_decode`` style with scikit-learn manners:

``fit(tokens, seed=0) -> self``   learn state (attributes ending in ``_``) on a bounded sample
``encode(tokens) -> codes``       one array whose first axis is the token
``decode(codes) -> tokens``       float32 ``(n, dim_out)``
``code_size``                     bytes stored per vector
``state_arrays()`` / ``load_state(arrays)``  persistence as plain arrays (no pickle)

Storage codecs may hold a code in several *parts* (a residual codec stores centroid
ids ``uint16 (n,)`` and packed residual bits ``uint8 (n, nbytes)``): ``encode_parts``
returns them by name, which is what an index stores and what the search kernels read;
``encode`` joins them into one ``uint8 (n, code_size)`` byte row per vector.

*Transform* codecs (``is_transform = True``, e.g. PCA) map floats to floats and are
applied to documents and queries alike; see :class:`~retrieval_prune.compress.chain.CodecChain`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from retrieval_prune.registry import Component

__all__ = [
    "Codec",
    "NotFittedError",
    "check_tokens",
    "sample_rows",
    "colbert_num_centroids",
    "nearest_centroid",
]

#: tokens processed per batch by encode / assignment (bounded memory)
BATCH = 65536


class NotFittedError(ValueError, AttributeError):
    """A codec was used before :meth:`Codec.fit` (or ``load_state``)."""


def check_tokens(
    tokens: Any, dim: int | None = None, what: str = "tokens", allow_empty: bool = True
) -> np.ndarray:
    """Validate a ``float32 (n, dim)`` token matrix and return it (no copy when possible).

    Raises ``ValueError`` naming the value and the fix for: a non-array, a wrong
    number of axes, a dtype other than float32, a dim other than ``dim``, NaN/Inf.
    """
    if not isinstance(tokens, np.ndarray):
        raise ValueError(
            f"{what} must be a numpy float32 array (n_tokens, dim), got {type(tokens).__name__}; "
            "pass MultiVectors.embeddings or np.asarray(x, dtype=np.float32)"
        )
    if tokens.ndim != 2:
        raise ValueError(
            f"{what} must be 2-D (n_tokens, dim), got shape {tokens.shape}; "
            "reshape one vector with x.reshape(1, -1)"
        )
    if tokens.dtype != np.float32:
        raise ValueError(
            f"{what} dtype is {tokens.dtype}, expected float32; convert with x.astype(np.float32)"
        )
    if dim is not None and tokens.shape[1] != dim:
        raise ValueError(
            f"{what} have dim={tokens.shape[1]} but the codec was fitted on dim={dim}; "
            "encode vectors from the same encoder (and projection) the codec was fitted on"
        )
    if tokens.shape[1] == 0:
        raise ValueError(f"{what} have dim=0; vectors need at least one dimension")
    if not allow_empty and tokens.shape[0] == 0:
        raise ValueError(f"{what} are empty (0 vectors); fit needs at least one token vector")
    for a in range(0, tokens.shape[0], BATCH):  # batched: no n x dim bool temporary
        block = tokens[a : a + BATCH]
        if not np.isfinite(block).all():
            row = a + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
            raise ValueError(
                f"{what} contain NaN or Inf (first at row {row}); clean or drop those vectors"
            )
    return tokens


def sample_rows(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted random row indices, ``min(n, size)`` of them (all rows when ``size >= n``)."""
    if size >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, size=size, replace=False))


def colbert_num_centroids(n_tokens: int) -> int:
    """colbert-ai's default codebook size ``2**floor(log2(16 * sqrt(n_tokens)))``.

    Capped at 65,536 (uint16 codes) and at the largest power of two ``<= n_tokens``.
    """
    if n_tokens < 1:
        raise ValueError(f"n_tokens={n_tokens} must be >= 1 to size a codebook")
    k = 2 ** int(np.floor(np.log2(16 * np.sqrt(n_tokens))))
    k = min(k, 65536, 2 ** int(np.floor(np.log2(n_tokens))))
    return max(k, 1)


def code_dtype(k: int) -> np.dtype:
    return np.dtype(np.uint8) if k <= 256 else np.dtype(np.uint16)


class faiss_threads:
    """Context manager: run faiss single-threaded for small inputs (an OpenMP team
    costs more than it saves there, badly so on a shared machine)."""

    def __init__(self, work: float, threshold: float = 2e8) -> None:
        self.single = work < threshold

    def __enter__(self):
        import faiss

        self.before = faiss.omp_get_max_threads()
        if self.single:
            faiss.omp_set_num_threads(1)
        return self

    def __exit__(self, *exc):
        import faiss

        faiss.omp_set_num_threads(self.before)


def nearest_centroid(
    x: np.ndarray, centroids: np.ndarray, dtype: np.dtype, k: int = 1
) -> np.ndarray:
    """Id of the nearest centroid (L2) of every row of ``x`` (``(n, k)`` nearest when
    ``k > 1``, closest first), in batches, via faiss."""
    import faiss

    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    out = np.empty((x.shape[0], k), dtype=dtype)
    with faiss_threads(float(x.shape[0]) * centroids.shape[0] * centroids.shape[1]):
        for a in range(0, x.shape[0], BATCH):
            block = np.ascontiguousarray(x[a : a + BATCH], dtype=np.float32)
            _, ids = index.search(block, k)
            out[a : a + block.shape[0]] = ids
    return out[:, 0] if k == 1 else out


#: largest vector dimension an index may declare
MAX_DIM = 65536


class Codec(Component):
    """Base class of every codec; subclasses implement the ``_``-prefixed hooks."""

    stage: ClassVar[str] = "codec"
    #: True for float -> float steps (PCA) applied to queries as well as documents
    is_transform: ClassVar[bool] = False
    #: names of the learned state arrays, persisted by state_arrays/load_state
    state_names: ClassVar[tuple[str, ...]] = ()
    #: how the index scores this codec's codes against float queries
    #: "float" (exact MaxSim kernel on the stored floats), "fp16", "table" (code-table
    #: MaxSim), "residual" (decompress in the scan), "binary" (sign bits)
    score_kind: ClassVar[str] = "float"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.dim_in_: int | None = None

    # -- fitted state -------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return self.dim_in_ is not None

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(
                f"{self.spec}: this codec is not fitted; call fit(tokens) (or load an index) first"
            )

    @property
    def dim_in(self) -> int:
        """Dimension of the vectors the codec encodes."""
        self._check_fitted()
        return int(self.dim_in_)  # type: ignore[arg-type]

    @property
    def dim_out(self) -> int:
        """Dimension of decoded vectors (= dim_in except for projections)."""
        return self.dim_in

    # -- protocol -----------------------------------------------------------------
    def fit(self, tokens: np.ndarray, seed: int = 0, n_total: int | None = None) -> Codec:
        """Learn the codec on (a bounded sample of) ``tokens``, float32 ``(n, dim)``.

        ``n_total`` is the corpus size when ``tokens`` is already a sample (it sizes
        default codebooks); ``seed`` makes the fit deterministic.
        """
        tokens = check_tokens(tokens, what="fit tokens", allow_empty=False)
        self._fit(tokens, np.random.default_rng(seed), n_total or tokens.shape[0], seed)
        self.dim_in_ = int(tokens.shape[1])
        return self

    def _fit(self, tokens: np.ndarray, rng: np.random.Generator, n_total: int, seed: int) -> None:
        raise NotImplementedError

    def part_layout(self) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
        """``[(name, dtype, trailing shape)]`` of the stored parts of one vector's code."""
        raise NotImplementedError

    def encode_parts(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        """Codes of ``tokens`` by part name, each with first axis ``n_tokens``."""
        self._check_fitted()
        tokens = check_tokens(tokens, self.dim_in)
        n = tokens.shape[0]
        out = {name: np.empty((n, *tail), dtype) for name, dtype, tail in self.part_layout()}
        for a in range(0, n, BATCH):
            block = np.ascontiguousarray(tokens[a : a + BATCH])
            for name, arr in self._encode_block(block).items():
                out[name][a : a + block.shape[0]] = arr
        return out

    def _encode_block(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def decode_parts(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        """Float32 ``(n, dim_out)`` vectors from stored parts."""
        self._check_fitted()
        layout = self.part_layout()
        n = None
        for name, dtype, tail in layout:
            if name not in parts:
                raise ValueError(f"{self.spec}: codes lack their {name!r} part")
            arr = parts[name]
            if arr.dtype != dtype or arr.shape[1:] != tail:
                raise ValueError(
                    f"{self.spec}: part {name!r} has dtype {arr.dtype} shape {arr.shape}, "
                    f"expected {np.dtype(dtype)} (n, {', '.join(map(str, tail))}); "
                    "pass codes produced by this codec's encode"
                )
            if n is not None and arr.shape[0] != n:
                raise ValueError(f"{self.spec}: parts disagree on the number of vectors")
            n = arr.shape[0]
        return self._decode_parts(parts)

    def _decode_parts(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def encode(self, tokens: np.ndarray) -> np.ndarray:
        """Codes of ``tokens``: the single part, or all parts joined as ``uint8 (n, code_size)``."""
        parts = self.encode_parts(tokens)
        if len(parts) == 1:
            return next(iter(parts.values()))
        n = next(iter(parts.values())).shape[0]
        rows = [np.ascontiguousarray(p).view(np.uint8).reshape(n, -1) for p in parts.values()]
        return np.concatenate(rows, axis=1)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Float32 vectors ``(n, dim_out)`` from :meth:`encode` output."""
        self._check_fitted()
        layout = self.part_layout()
        if not isinstance(codes, np.ndarray):
            raise ValueError(f"codes must be a numpy array, got {type(codes).__name__}")
        if len(layout) == 1:
            name = layout[0][0]
            return self.decode_parts({name: codes})
        if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] != self.code_size:
            raise ValueError(
                f"{self.spec}: codes must be uint8 (n, {self.code_size}), got {codes.dtype} "
                f"{codes.shape}; pass the output of encode()"
            )
        parts, col = {}, 0
        for name, dtype, tail in layout:
            width = int(np.dtype(dtype).itemsize * int(np.prod(tail, dtype=np.int64)))
            raw = np.ascontiguousarray(codes[:, col : col + width])
            parts[name] = raw.view(dtype).reshape(codes.shape[0], *tail)
            col += width
        return self.decode_parts(parts)

    @property
    def code_size(self) -> int:
        """Bytes stored per vector (all parts)."""
        return int(
            sum(
                np.dtype(dt).itemsize * int(np.prod(tail, dtype=np.int64))
                for _, dt, tail in self.part_layout()
            )
        )

    # -- persistence ------------------------------------------------------------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        """Learned state as plain arrays (``dim_in`` included) for the index format."""
        self._check_fitted()
        out = {"dim_in": np.array([self.dim_in_], np.int64)}
        for name in self.state_names:
            out[name] = np.asarray(getattr(self, name + "_"))
        return out

    def load_state(self, arrays: dict[str, np.ndarray]) -> Codec:
        """Restore what :meth:`state_arrays` wrote; raises ``ValueError`` if incomplete."""
        missing = [n for n in ("dim_in", *self.state_names) if n not in arrays]
        if missing:
            raise ValueError(f"{self.spec}: saved codec state lacks {missing}")
        d = np.asarray(arrays["dim_in"])
        if d.shape != (1,) or d.dtype.kind not in "iu" or not 1 <= int(d[0]) <= MAX_DIM:
            raise ValueError(f"{self.spec}: dim_in must be one integer in 1..{MAX_DIM}, got {d.tolist()[:4]}")
        for name in self.state_names:
            a = np.array(arrays[name])  # small: copy off the mmap
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise ValueError(f"{self.spec}: saved state {name!r} holds NaN or Inf")
            setattr(self, name + "_", a)
        self.dim_in_ = int(d[0])
        self._after_load()
        self._check_state()
        return self

    def _check_state(self) -> None:
        """Raise ``ValueError`` unless the loaded state fits the spec and ``dim_in`` (shapes,
        ranges), so that no kernel indexes outside an array. Subclasses extend it."""

    def _after_load(self) -> None:
        pass
