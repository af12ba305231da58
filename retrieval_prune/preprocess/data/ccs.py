"""Coverage-centric coreset selection (Zheng et al. 2023), and its two controls: the
top-importance selector and uniform random selection."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from retrieval_prune.preprocess.base import DataPreprocessor, PairSet
from retrieval_prune.registry import Param, register

__all__ = ["CoverageCentric", "TopImportance", "RandomPairs", "paper_beta", "stratum_budgets"]

#: The paper's hard cutoff rates on CIFAR-10 (Zheng et al. 2023, appendix; the 90% entry is
#: also the repository README's example, ``--mis-ratio 0.3``), as (pruning rate from which it
#: applies, beta): beta = 0 below 70% pruning, 0.1 from 70%, 0.3 from 90%.
PAPER_BETA = ((0.0, 0.0), (0.7, 0.1), (0.9, 0.3))


def paper_beta(keep: float) -> float:
    """The hard cutoff rate the paper pairs with pruning rate ``1 - keep`` (:data:`PAPER_BETA`,
    a step function; float noise in ``1 - keep`` is rounded away at 9 digits)."""
    alpha = round(1.0 - float(keep), 9)
    beta = 0.0
    for start, b in PAPER_BETA:
        if alpha >= start:
            beta = b
    return beta


def stratum_budgets(total: int, sizes: np.ndarray) -> np.ndarray:
    """The paper's Algorithm 1 budget: visit strata from the smallest (ties: lower index),
    give each ``min(size, floor(left / strata_left))`` and carry the rest over.

    Empty strata take nothing. Exact: the budgets sum to ``total`` when
    ``total <= sizes.sum()`` (the largest strata come last and absorb what is left)."""
    sizes = np.asarray(sizes, np.int64)
    if not 0 <= total <= int(sizes.sum()):
        raise ValueError(f"budget {total} is outside [0, {int(sizes.sum())}]")
    out = np.zeros(sizes.size, np.int64)
    order = np.lexsort((np.arange(sizes.size), sizes))
    left = int(total)
    for i, s in enumerate(order):
        take = min(int(sizes[s]), left // (sizes.size - i))
        out[s] = take
        left -= take
    if left != 0:  # pragma: no cover - invariant
        raise RuntimeError(f"stratum_budgets left {left} unassigned")
    return out


def _beta_value(name: str, raw: Any) -> str:
    """``beta`` as written in the canonical spec: ``"auto"`` or ``repr(float)`` in [0, 1)."""
    if isinstance(raw, str) and raw.strip().lower() == "auto":
        return "auto"
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: beta={raw!r} must be 'auto' or a number in [0, 1)") from None
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name}: beta={value} must be 'auto' or a number in [0, 1)")
    return repr(value)


@register
class CoverageCentric(DataPreprocessor):
    """Coverage-centric coreset selection (CCS) over per-query difficulty scores.

    Zheng, Liu, Lai, Prakash, "Coverage-centric Coreset Selection for High Pruning Rates",
    ICLR 2023 (arXiv:2210.15809), Algorithm 1. Per collection of ``n`` queries with
    importance ``PairSet.scores`` (EL2N of the full-data run; higher = harder):

    1. drop the ``beta * n`` hardest queries (the hard cutoff, against mislabeled / noisy
       pairs); ``beta=auto`` takes the paper's rate for pruning rate ``1 - keep``
       (:func:`paper_beta`: 0 below 70% pruning, 0.1 from 70%, 0.3 from 90%). The cutoff is
       capped at ``n - round(keep * n)`` so the budget can always be met;
    2. split the remaining score range into ``strata`` equal-width strata (the top edge is
       included in the last one);
    3. allocate the budget ``round(keep * n)`` over strata with the paper's rule
       (:func:`stratum_budgets`: smallest stratum first, each gets ``min(size, left /
       strata left)``);
    4. sample uniformly without replacement inside each stratum (the seeded generator).

    ``keep=1`` is the identity (no cutoff: everything is kept).

    Parameters
    ----------
    keep : float in (0, 1], default 0.3
    beta : ``"auto"`` or float in [0, 1), default ``"auto"``
        Fraction of all queries (the hardest) cut before sampling.
    strata : int >= 1, default 50 (the paper's)
    seed : int >= 0, default 0

    Examples
    --------
    >>> import numpy as np
    >>> from retrieval_prune import registry
    >>> from retrieval_prune.preprocess.base import PairSet
    >>> s = np.linspace(0.0, 1.0, 100)               # synthetic scores
    >>> sel = registry.build("ccs:keep=0.1,strata=5").select([PairSet("toy", [str(i) for i in range(100)], scores=s)])
    >>> len(sel.kept["toy"]), sel.report.details["toy"]["cut"]    # beta=auto: 0.3 at 90% pruning
    (10, 30)
    """

    name = "ccs"
    params: ClassVar[dict[str, Param]] = {
        "keep": Param(0.3, float, "fraction of training queries kept, in (0, 1]", low=0.0, high=1.0),
        "beta": Param("auto", str, "hard cutoff: 'auto' (the paper's rate) or a fraction in [0, 1)"),
        "strata": Param(50, int, "equal-width score strata", low=1),
        "seed": Param(0, int, "sampling seed", low=0),
    }
    needs_scores: ClassVar[bool] = True
    identity_params: ClassVar[dict[str, Any]] = {"keep": 1.0}

    @classmethod
    def _check_params(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        values = super()._check_params(kwargs)
        values["beta"] = _beta_value(cls.name, values["beta"])
        return values

    @property
    def beta_rate(self) -> float:
        """The cutoff rate in use (``beta``, or the paper's rate for ``keep``)."""
        return paper_beta(self.keep) if self.beta == "auto" else float(self.beta)

    def _select(
        self, ps: PairSet, rng: np.random.Generator
    ) -> tuple[np.ndarray, dict[int, int], dict[str, Any]]:
        n = len(ps)
        budget = self.budget(n)
        if budget == n:
            return np.arange(n, dtype=np.int64), {}, {"cut": 0, "strata": 0}
        scores = np.asarray(ps.scores, np.float64)
        cut = min(int(round(self.beta_rate * n)), n - budget)
        order = np.lexsort((np.arange(n), -scores))  # hardest first, ties by position
        pool = np.sort(order[cut:])
        s = scores[pool]
        lo, hi = float(s.min()), float(s.max())
        k = int(self.strata)
        if hi > lo:
            which = np.floor((s - lo) / (hi - lo) * k).astype(np.int64)
            which = np.clip(which, 0, k - 1)  # the top edge belongs to the last stratum
        else:
            which = np.zeros(s.size, np.int64)
        sizes = np.bincount(which, minlength=k)
        quota = stratum_budgets(budget, sizes)
        kept = []
        for j in range(k):
            if quota[j]:
                members = pool[which == j]
                kept.append(rng.choice(members, size=int(quota[j]), replace=False))
        pos = np.sort(np.concatenate(kept)).astype(np.int64)
        info = {
            "beta": self.beta_rate,
            "cut": int(cut),
            "strata": k,
            "nonempty_strata": int((sizes > 0).sum()),
            "full_strata": int(((quota == sizes) & (sizes > 0)).sum()),
        }
        return pos, {}, info


@register
class TopImportance(DataPreprocessor):
    """Keep the ``round(keep * n)`` hardest training queries (highest ``PairSet.scores``).

    The "top-importance only" control of CCS (Zheng et al. 2023, ICLR; the EL2N selection of
    Paul, Ganguli, Dziugaite, "Deep Learning on a Data Diet", NeurIPS 2021): monotonic
    selection by importance, which the CCS paper shows collapses at high pruning rates.
    Deterministic (ties by position), so it has no seed. ``keep=1`` is the identity.

    Parameters
    ----------
    keep : float in (0, 1], default 0.3
    """

    name = "top_importance"
    params: ClassVar[dict[str, Param]] = {
        "keep": Param(0.3, float, "fraction of training queries kept, in (0, 1]", low=0.0, high=1.0),
    }
    needs_scores: ClassVar[bool] = True
    identity_params: ClassVar[dict[str, Any]] = {"keep": 1.0}

    def _select(
        self, ps: PairSet, rng: np.random.Generator
    ) -> tuple[np.ndarray, dict[int, int], dict[str, Any]]:
        n = len(ps)
        budget = self.budget(n)
        order = np.lexsort((np.arange(n), -np.asarray(ps.scores, np.float64)))
        pos = np.sort(order[:budget]).astype(np.int64)
        return pos, {}, {"min_kept_score": float(np.asarray(ps.scores)[pos].min())}


@register
class RandomPairs(DataPreprocessor):
    """Keep ``round(keep * n)`` training queries uniformly at random (the control every
    selection method is compared with; "random pruning" in Zheng et al. 2023 and Abbas et
    al. 2024). Needs neither embeddings nor scores. ``keep=1`` is the identity.

    Parameters
    ----------
    keep : float in (0, 1], default 0.3
    seed : int >= 0, default 0
    """

    name = "random_pairs"
    params: ClassVar[dict[str, Param]] = {
        "keep": Param(0.3, float, "fraction of training queries kept, in (0, 1]", low=0.0, high=1.0),
        "seed": Param(0, int, "sampling seed", low=0),
    }
    identity_params: ClassVar[dict[str, Any]] = {"keep": 1.0}

    def _select(
        self, ps: PairSet, rng: np.random.Generator
    ) -> tuple[np.ndarray, dict[int, int], dict[str, Any]]:
        n = len(ps)
        budget = self.budget(n)
        if budget == n:
            return np.arange(n, dtype=np.int64), {}, {}
        pos = np.sort(rng.choice(n, size=budget, replace=False)).astype(np.int64)
        return pos, {}, {}
