"""CRISP in the training loop: per-sequence k-means in torch, centroids with gradient.

Veneroso et al. 2025 (arXiv 2505.11471): during fine-tuning every query and every document
runs k-means over its own token vectors and the MaxSim loss is computed on the cluster
centroids. Assignments are constants (computed under ``no_grad``); each centroid is the
masked mean of its members, so the gradient flows back to every member token and the
encoder learns embeddings that cluster well.

Choices the paper leaves open (ours, documented here and in the checkpoint config):

* **init**: deterministic, evenly spaced tokens (token ``floor(j * m / k)`` of the ``m``
  kept tokens, ``j < k``): no random stream, the same sequence always gets the same
  clusters, and a batch of sequences runs as one tensor program;
* **5 Lloyd steps** (squared Euclidean distance), a cluster left empty keeps its previous
  centroid during the steps and is **masked** in the output (never zero-padded);
* a sequence with ``m <= k`` tokens keeps all of them (identity labels);
* centroids are **re-normalised** to unit length, like the token vectors they replace and
  like the post-hoc ``crisp`` plug-in (``normalize=True``) that runs at index/query time.

:func:`parse_crisp` reads the ``--crisp`` forms: ``"8x32"`` (fixed k, query x document) and
``"25%"`` / ``"50%"`` (relative k = ``ceil(p * m)`` on both sides).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["CrispSpec", "parse_crisp", "kmeans_pool", "cluster_counts", "DEFAULT_ITERS"]

DEFAULT_ITERS = 5
_FIXED = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")
_REL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


@dataclass(frozen=True)
class CrispSpec:
    """How many clusters per query / per document.

    Either fixed (``q`` and ``d`` set, ``rel`` None) or relative (``rel`` in (0, 1], the
    fraction of each sequence's tokens, rounded up).
    """

    q: int | None = None
    d: int | None = None
    rel: float | None = None
    iters: int = DEFAULT_ITERS
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.rel is None:
            for name in ("q", "d"):
                v = getattr(self, name)
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"CrispSpec {name}={v!r} must be an int >= 1")
        else:
            if self.q is not None or self.d is not None:
                raise ValueError(
                    f"CrispSpec: give rel (relative k) or q and d (fixed k), not both; got "
                    f"q={self.q}, d={self.d}, rel={self.rel}"
                )
            if not (0.0 < float(self.rel) <= 1.0):
                raise ValueError(f"CrispSpec rel={self.rel!r} must be in (0, 1]")
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 1:
            raise ValueError(f"CrispSpec iters={self.iters!r} must be an int >= 1")

    @property
    def label(self) -> str:
        """The paper's name: ``C8x32`` or ``C25``."""
        if self.rel is None:
            return f"C{self.q}x{self.d}"
        return f"C{_pct(self.rel)}"

    @property
    def plugin_spec(self) -> str:
        """The matching post-hoc token plug-in spec for index/query time."""
        if self.rel is None:
            return f"crisp:q={self.q},d={self.d}"
        return f"crisp:rel={self.rel:g}"

    def k(self, lengths: torch.Tensor, kind: str) -> torch.Tensor:
        """Clusters per sequence (int64, same shape as ``lengths``), before the m <= k rule."""
        if kind not in ("queries", "documents"):
            raise ValueError(f"kind={kind!r} must be 'queries' or 'documents'")
        lengths = lengths.to(torch.int64)
        if self.rel is None:
            return torch.full_like(lengths, self.q if kind == "queries" else self.d)
        # ceil(rel * m), robust to float noise, at least 1 (as the post-hoc plug-in)
        k = torch.ceil(torch.round(lengths.double() * float(self.rel), decimals=9)).to(torch.int64)
        return k.clamp_min(1)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "label": self.label, "plugin_spec": self.plugin_spec}


def _pct(rel: float) -> str:
    p = rel * 100
    return str(int(round(p))) if abs(p - round(p)) < 1e-9 else f"{p:g}"


def parse_crisp(text: str, *, iters: int = DEFAULT_ITERS) -> CrispSpec:
    """Parse ``--crisp``: ``"QxD"`` (e.g. ``"8x32"``, ``"4x8"``) or ``"P%"`` (``"25%"``).

    Raises
    ------
    ValueError
        naming the value and the accepted forms.
    """
    if not isinstance(text, str):
        raise TypeError(f"--crisp expects a string such as '8x32' or '25%', got {text!r}")
    m = _FIXED.match(text)
    if m:
        q, d = int(m.group(1)), int(m.group(2))
        if q < 1 or d < 1:
            raise ValueError(
                f"--crisp {text!r}: cluster counts must be >= 1 (query x document, e.g. 8x32)"
            )
        return CrispSpec(q=q, d=d, iters=iters)
    m = _REL.match(text)
    if m:
        p = float(m.group(1))
        if not (0.0 < p <= 100.0):
            raise ValueError(
                f"--crisp {text!r}: a relative k must be in (0%, 100%] of each sequence's "
                "tokens, e.g. 25% or 50%"
            )
        return CrispSpec(rel=p / 100.0, iters=iters)
    raise ValueError(
        f"--crisp {text!r} is not understood; use QxD for fixed clusters per query x document "
        "(e.g. 8x32 or 4x8) or P% for a fraction of each sequence's tokens (e.g. 25% or 50%)"
    )


def cluster_counts(mask: torch.Tensor, spec: CrispSpec, kind: str) -> torch.Tensor:
    """Output vectors per sequence before empty clusters: ``min(k, m)`` (int64 (batch,))."""
    m = mask.sum(dim=1).to(torch.int64)
    return torch.minimum(spec.k(m, kind), m)


def _init_centroids(
    x: torch.Tensor, mask: torch.Tensor, k: torch.Tensor, n_slots: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Evenly spaced kept tokens as initial centroids; (centroids (B,K,D), active (B,K))."""
    b, seq, _ = x.shape
    m = mask.sum(dim=1).to(torch.int64)  # (B,)
    # positions of kept tokens, in order, first: a stable sort of "not kept"
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices  # (B, L)
    j = torch.arange(n_slots, device=x.device).expand(b, n_slots)
    active = j < k[:, None]
    rank = torch.div(j * m[:, None], k.clamp_min(1)[:, None], rounding_mode="floor")
    rank = torch.where(active, rank, torch.zeros_like(rank)).clamp_max(max(seq - 1, 0))
    pos = torch.gather(order, 1, rank)  # (B, K) token positions
    cent = torch.gather(x, 1, pos[..., None].expand(-1, -1, x.shape[-1]))
    return cent, active


@torch.no_grad()
def _assign(
    x: torch.Tensor, mask: torch.Tensor, k: torch.Tensor, iters: int
) -> tuple[torch.Tensor, int]:
    """k-means labels per token (int64 (B, L); -1 where not kept) and the slot count K."""
    b, seq, _ = x.shape
    m = mask.sum(dim=1).to(torch.int64)
    n_slots = max(int(k.max()) if b else 1, 1)
    xf = x.detach().float()
    cent, active = _init_centroids(xf, mask, k, n_slots)
    x2 = (xf * xf).sum(-1)  # (B, L)
    maskf = mask.to(xf.dtype)
    labels = torch.zeros((b, seq), dtype=torch.int64, device=x.device)
    for _ in range(iters):
        # squared distance |x|^2 - 2 x.c + |c|^2, inactive slots never chosen
        dist = x2[:, :, None] - 2.0 * torch.einsum("bld,bkd->blk", xf, cent)
        dist = dist + (cent * cent).sum(-1)[:, None, :]
        dist = dist.masked_fill(~active[:, None, :], float("inf"))
        labels = dist.argmin(dim=-1)  # (B, L)
        onehot = F.one_hot(labels, n_slots).to(xf.dtype) * maskf[..., None]  # (B, L, K)
        counts = onehot.sum(dim=1)  # (B, K)
        sums = torch.einsum("blk,bld->bkd", onehot, xf)
        new = sums / counts.clamp_min(1.0)[..., None]
        cent = torch.where((counts > 0)[..., None], new, cent)  # empty: keep old centroid
    # a sequence with m <= k keeps every token: label = rank among the kept tokens
    rank = torch.cumsum(mask.to(torch.int64), dim=1) - 1
    labels = torch.where((m <= k)[:, None], rank, labels)
    labels = torch.where(mask, labels, torch.full_like(labels, -1))
    return labels, n_slots


def kmeans_pool(
    vectors: torch.Tensor, mask: torch.Tensor, spec: CrispSpec, kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each sequence's kept tokens by the centroids of a k-means over them.

    Parameters
    ----------
    vectors : float (batch, seq, dim); positions outside ``mask`` are ignored.
    mask : bool (batch, seq), True where a position is a vector.
    spec : CrispSpec
    kind : ``"queries"`` (``spec.q`` clusters) or ``"documents"`` (``spec.d``).

    Returns
    -------
    centroids : float (batch, K, dim), K = the largest k in the batch; masked means of the
        members (with gradient to each member), re-normalised when ``spec.normalize``;
        zero where ``cmask`` is False.
    cmask : bool (batch, K), True for non-empty clusters.
    """
    if vectors.dim() != 3 or mask.shape != vectors.shape[:2]:
        raise ValueError(
            f"vectors must be (batch, seq, dim) and mask (batch, seq); got "
            f"{tuple(vectors.shape)} and {tuple(mask.shape)}"
        )
    mask = mask.bool()
    m = mask.sum(dim=1).to(torch.int64)
    k = torch.minimum(spec.k(m, kind), m.clamp_min(1))
    labels, n_slots = _assign(vectors, mask, k, spec.iters)
    # constant assignment matrix (no grad); centroids = masked means (grad to members)
    onehot = F.one_hot(labels.clamp_min(0), n_slots).to(vectors.dtype)
    onehot = onehot * mask[..., None].to(vectors.dtype)  # (B, L, K)
    counts = onehot.sum(dim=1)  # (B, K)
    cmask = counts > 0
    cent = torch.einsum("blk,bld->bkd", onehot, vectors) / counts.clamp_min(1.0)[..., None]
    if spec.normalize:
        cent = F.normalize(cent, p=2, dim=-1)
    cent = cent * cmask[..., None].to(cent.dtype)
    return cent, cmask


def n_clusters_bound(m: int, spec: CrispSpec, kind: str) -> int:
    """``min(k, m)`` for one sequence of ``m`` tokens (a Python int, for reports)."""
    k = spec.k(torch.tensor([m]), kind)
    return int(min(int(k[0]), m)) if m > 0 else 0
