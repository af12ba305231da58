"""A chain of codecs: float transforms (PCA) first, then at most one storage codec.

``pca:dim=128 | residual:nbits=2`` projects documents *and queries* to 128-d, then
stores residual codes of the projected document vectors. A chain of transforms only
(``pca:dim=64``) stores the projected vectors as float32.
"""

from __future__ import annotations

import numpy as np

from retrieval_prune import registry
from retrieval_prune.compress.base import Codec, NotFittedError, check_tokens, sample_rows
from retrieval_prune.compress.floats import Float32Codec

__all__ = ["CodecChain"]

#: tokens handed to the storage codec's fit after the transforms (it subsamples further)
FIT_SAMPLE = 1 << 20


class CodecChain:
    """Ordered codecs: ``transforms`` (float -> float, applied to queries too) + ``storage``.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((3000, 32)).astype(np.float32)
    >>> chain = CodecChain.from_spec("pca:dim=16 | residual:k=64,nbits=2").fit(x)
    >>> chain.spec
    'pca:dim=16,sample=100000 | residual:k=64,k_scale=1.0,nbits=2,sample=262144,niter=4,normalize=false,candidates=8,centroid_bits=16'
    >>> chain.code_size, chain.encode(x).shape, chain.decode(chain.encode(x)).shape
    (5, (3000, 5), (3000, 32))
    """

    def __init__(self, steps: list[Codec]) -> None:
        if not steps:
            raise ValueError("a codec chain needs at least one codec, e.g. 'residual:nbits=2'")
        for s in steps:
            if not isinstance(s, Codec):
                raise ValueError(f"{s!r} is not a codec (stage {getattr(s, 'stage', None)!r})")
        storage = [i for i, s in enumerate(steps) if not s.is_transform]
        if len(storage) > 1 or (storage and storage[0] != len(steps) - 1):
            raise ValueError(
                f"chain {' | '.join(s.spec for s in steps)!r}: projections come first and at "
                "most one storage codec (kmeans, residual, binary, fp16...) comes last"
            )
        self.steps = list(steps)
        self.transforms = [s for s in steps if s.is_transform]
        self.storage: Codec = steps[-1] if storage else Float32Codec()
        self._implicit_storage = not storage

    @classmethod
    def from_spec(cls, spec: str) -> CodecChain:
        steps = registry.build_pipeline(spec)
        return cls(steps)  # type: ignore[arg-type]

    @property
    def spec(self) -> str:
        """Canonical spec (every default written); parses back to an equal chain."""
        return " | ".join(s.spec for s in self.steps)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CodecChain) and self.steps == other.steps

    def __repr__(self) -> str:
        return f"CodecChain({self.spec!r})"

    @property
    def is_fitted(self) -> bool:
        return all(s.is_fitted for s in self.steps) and self.storage.is_fitted

    @property
    def dim_in(self) -> int:
        return (self.transforms[0] if self.transforms else self.storage).dim_in

    @property
    def dim_search(self) -> int:
        """Dimension of the space documents are scored in (after the transforms)."""
        return self.storage.dim_in

    @property
    def code_size(self) -> int:
        return self.storage.code_size

    def fit(self, tokens: np.ndarray, seed: int = 0) -> CodecChain:
        """Fit each transform, then the storage codec on a transformed sample."""
        tokens = check_tokens(tokens, what="fit tokens", allow_empty=False)
        n_total = tokens.shape[0]
        x = tokens
        for t in self.transforms:
            t.fit(x, seed=seed)
            rows = sample_rows(x.shape[0], FIT_SAMPLE, np.random.default_rng(seed))
            x = t.transform(np.ascontiguousarray(x[rows]))
        self.storage.fit(x, seed=seed, n_total=n_total)
        return self

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"codec chain {self.spec!r} is not fitted; call fit(tokens) first")

    def transform(self, tokens: np.ndarray) -> np.ndarray:
        """Apply the float transforms (what queries go through)."""
        self._check_fitted()
        x = check_tokens(tokens, self.dim_in)
        for t in self.transforms:
            x = t.transform(x)
        return x

    def encode_parts(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        return self.storage.encode_parts(self.transform(tokens))

    def encode(self, tokens: np.ndarray) -> np.ndarray:
        return self.storage.encode(self.transform(tokens))

    def decode_search(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        """Decoded vectors in the search space (after the transforms)."""
        return self.storage.decode_parts(parts)

    def _inverse(self, x: np.ndarray) -> np.ndarray:
        for t in reversed(self.transforms):
            x = t.inverse(x)
        return x

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Back to the input space: float32 ``(n, dim_in)``."""
        self._check_fitted()
        return self._inverse(self.storage.decode(codes))

    # -- persistence --------------------------------------------------------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        """``codec.<step>.<name>`` -> array for every step (implicit f32 storage included)."""
        self._check_fitted()
        out = {}
        steps = self.steps + ([self.storage] if self._implicit_storage else [])
        for i, s in enumerate(steps):
            for name, arr in s.state_arrays().items():
                out[f"codec.{i}.{name}"] = arr
        return out

    def load_state(self, arrays: dict[str, np.ndarray]) -> CodecChain:
        steps = self.steps + ([self.storage] if self._implicit_storage else [])
        for i, s in enumerate(steps):
            prefix = f"codec.{i}."
            try:
                s.load_state({k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)})
            except ValueError as exc:
                raise ValueError(f"codec.{i}.*: {exc}") from None
        for a, b in zip(steps, steps[1:], strict=False):
            if a.dim_out != b.dim_in:
                raise ValueError(
                    f"codec chain: {a.name} puts out dim={a.dim_out} but {b.name} takes dim={b.dim_in}"
                )
        return self
