"""Data-stage plug-ins (training-pair selection) and training on a selection.

Plug-in checks run on synthetic, seeded pair embeddings and scores (labelled synthetic);
the train path uses adi's queries (a tiny model, a few steps).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from retrieval_prune import registry
from retrieval_prune.preprocess.base import DataPreprocessor, PairSet, Selection
from retrieval_prune.preprocess.data import (
    CoverageCentric,
    DensityBasedPruning,
    RandomPairs,
    SemDeDup,
    TopImportance,
)
from retrieval_prune.preprocess.data.ccs import paper_beta, stratum_budgets
from retrieval_prune.preprocess.data.dbp import water_fill

#: every data plug-in with a spec that selects something on the synthetic sets
SPECS = {
    "semdedup": "semdedup:eps=0.3,clusters=4",
    "dbp": "dbp:keep=0.3,clusters=5",
    "ccs": "ccs:keep=0.3,strata=8",
    "top_importance": "top_importance:keep=0.3",
    "random_pairs": "random_pairs:keep=0.3",
}
KEEP_PLUGINS = ["dbp", "ccs", "top_importance", "random_pairs"]


def synthetic_set(n=120, dim=16, seed=0, name="syn", clusters=6, spread=0.35):
    """Synthetic pair set: unit vectors around ``clusters`` centres, with EL2N-like scores
    in [0, sqrt 2]."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(clusters, size=n)] + spread * rng.standard_normal((n, dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    scores = rng.uniform(0.0, np.sqrt(2.0), n)
    return PairSet(name, [f"{name}-q{i}" for i in range(n)], x, scores)


def _sets(*sizes, seed=0):
    return [synthetic_set(n, seed=seed + i, name=f"c{i}") for i, n in enumerate(sizes)]


def test_every_data_plugin_is_tested_and_follows_the_protocol():
    data = registry.available("data")
    assert set(SPECS) <= set(data)
    for name in SPECS:
        cls = data[name]
        assert issubclass(cls, DataPreprocessor) and cls.stage == "data"
        assert cls.__doc__ and "Parameters" in cls.__doc__
        assert cls.identity_params is not None


@pytest.mark.parametrize("name", sorted(SPECS))
def test_spec_round_trip(name):
    step = registry.build(SPECS[name])
    again = registry.build(step.spec)
    assert again.spec == step.spec and again == step
    assert registry.build(name).spec == type(step)().spec  # defaults fill in


@pytest.mark.parametrize("name", sorted(SPECS))
def test_deterministic_under_a_seed_and_input_never_mutated(name):
    sets = _sets(90, 41)
    before = copy.deepcopy(sets)
    a = registry.build(SPECS[name]).select(sets)
    b = registry.build(SPECS[name]).select(sets)
    assert a.kept == b.kept and a.aliases == b.aliases
    for s, t in zip(sets, before, strict=True):
        assert s.query_ids == t.query_ids
        np.testing.assert_array_equal(s.embeddings, t.embeddings)
        np.testing.assert_array_equal(s.scores, t.scores)
    for ps in sets:  # kept in input order, a subset of the input
        kept = a.kept[ps.name]
        pos = [ps.query_ids.index(q) for q in kept]
        assert pos == sorted(pos) and len(set(kept)) == len(kept)


@pytest.mark.parametrize("name", ["semdedup", "dbp", "ccs", "random_pairs"])
def test_different_seeds_differ(name):
    sets = _sets(300, seed=3)
    spec = SPECS[name] + ",seed=0"
    if name == "semdedup":  # a threshold where duplicates depend on the clustering
        spec = "semdedup:eps=0.2,clusters=12,seed=0"
    a = registry.build(spec).select(sets)
    b = registry.build(spec.replace("seed=0", "seed=1")).select(sets)
    assert a.kept != b.kept


@pytest.mark.parametrize("name", KEEP_PLUGINS)
@pytest.mark.parametrize("keep", [0.01, 0.1, 0.3, 0.5, 0.77, 0.999])
def test_exact_budget_per_collection(name, keep):
    sizes = (1, 2, 3, 7, 50, 333)
    sets = _sets(*sizes, seed=5)
    spec = SPECS[name].replace("keep=0.3", f"keep={keep}")
    sel = registry.build(spec).select(sets)
    for ps, n in zip(sets, sizes, strict=True):
        want = max(1, min(n, int(round(keep * n))))
        assert len(sel.kept[ps.name]) == want, (ps.name, n)
        assert sel.report.details[ps.name] | {"queries": n, "kept": want} == sel.report.details[
            ps.name
        ]
    assert sel.report.bytes_before == sum(sizes)
    assert sel.report.bytes_after == sum(len(v) for v in sel.kept.values())


@pytest.mark.parametrize("name", sorted(SPECS))
def test_identity_params_keep_everything(name):
    cls = registry.get(name)
    sets = _sets(64, 5, 1)
    sel = cls(**cls.identity_params).select(sets)
    for ps in sets:
        assert sel.kept[ps.name] == ps.query_ids
        assert sel.aliases[ps.name] == {}
    assert sel.report.kept_fraction == 1.0


def test_semdedup_removes_planted_duplicates_and_aliases_them():
    rng = np.random.default_rng(7)
    base = synthetic_set(80, dim=32, seed=7, spread=1.0)  # well spread: no natural duplicates
    x = base.embeddings.copy()
    # plant: 10 exact copies and 10 near copies (cosine > 0.99) of distinct originals
    originals = rng.choice(80, size=20, replace=False)
    extra = []
    for r, j in enumerate(originals):
        v = x[j].astype(np.float64)
        if r >= 10:
            v = v + 0.01 * rng.standard_normal(v.size)
        extra.append(v / np.linalg.norm(v))
    x = np.vstack([x, np.asarray(extra, np.float32)])
    ids = base.query_ids + [f"dup{r}" for r in range(20)]
    ps = PairSet("syn", ids, x)
    natural = SemDeDup(eps=0.05, clusters=6).select([base])
    assert natural.kept["syn"] == base.query_ids  # nothing to remove without the plants
    sel = SemDeDup(eps=0.05, clusters=6).select([ps])
    kept, aliases = sel.kept["syn"], sel.aliases["syn"]
    assert len(kept) == 80 and set(aliases) == set(ids) - set(kept)
    for r, j in enumerate(originals):
        dup, orig = f"dup{r}", ids[j]
        # exactly one of each (original, duplicate) pair stays and the other points at it
        assert (dup in kept) != (orig in kept)
        removed, keeper = (orig, dup) if dup in kept else (dup, orig)
        assert aliases[removed] == keeper
    assert all(v in kept for v in aliases.values())
    assert sel.report.details["syn"]["removed"] == 20


def test_semdedup_keeps_the_member_farthest_from_the_centroid():
    # synthetic: one tight group of 3 near-identical vectors plus spread points, 1 cluster
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 8))
    x[1] = x[0] + 1e-3 * rng.standard_normal(8)
    x[2] = x[0] + 1e-3 * rng.standard_normal(8)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    ps = PairSet("g", [str(i) for i in range(12)], x)
    sel = SemDeDup(eps=0.01, clusters=1).select([ps])
    c = x.astype(np.float64).mean(0)
    cos = x[:3] @ c / np.linalg.norm(c)
    keeper = str(int(np.argmin(cos)))  # least similar to the centroid
    assert [q for q in "012" if q in sel.kept["g"]] == [keeper]
    assert sel.aliases["g"] == {q: keeper for q in "012" if q != keeper}


def test_semdedup_eps_zero_keeps_exact_copies():
    x = np.repeat(np.eye(4, dtype=np.float32), 2, axis=0)
    ps = PairSet("copies", list("abcdefgh"), x)
    assert SemDeDup(eps=0.0).select([ps]).kept["copies"] == list("abcdefgh")
    assert SemDeDup(eps=1e-6, clusters=4).select([ps]).kept["copies"] == list("aceg")


def test_water_fill_caps_and_sums_exactly():
    rng = np.random.default_rng(1)
    for trial in range(300):
        k = int(rng.integers(1, 12))
        sizes = rng.integers(0, 30, size=k)
        if sizes.sum() == 0:
            continue
        logits = rng.normal(0, 5, size=k) * (10 if trial % 3 == 0 else 1)
        total = int(rng.integers(0, sizes.sum() + 1))
        got = water_fill(total, sizes, logits)
        assert got.sum() == total and np.all(got <= sizes) and np.all(got >= 0)
        # no cap binding on an open cluster: allocations follow the softmax order
        open_ = got < sizes
        if open_.sum() > 1:
            p = np.exp(logits[open_] - logits[open_].max())
            share = (total - got[~open_].sum()) * p / p.sum()
            assert np.all(np.abs(got[open_] - share) < 1.0 + 1e-9)
    # one dominant cluster smaller than its share: filled, the rest shared
    np.testing.assert_array_equal(water_fill(10, np.array([3, 20, 20]), np.array([50.0, 0, 0])),
                                  [3, 4, 3])  # fmt: skip
    # tiny temperature: underflow never empties the shares of the open clusters
    got = water_fill(12, np.array([2, 5, 5, 5]), np.array([1e4, 0.0, 1.0, -1e4]))
    assert got.tolist() == [2, 5, 5, 0]  # 2 full, then 7.3 > 5 full, then the rest
    with pytest.raises(ValueError, match="outside"):
        water_fill(11, np.array([5, 5]), np.zeros(2))


def test_dbp_budgets_follow_complexity_and_keep_the_far_members():
    sets = [synthetic_set(400, seed=11, clusters=8, spread=0.5)]
    step = DensityBasedPruning(keep=0.25, clusters=8, tau=0.05)
    sel = step.select(sets)
    d = sel.report.details["syn"]
    assert d["budget"] == 100 == len(sel.kept["syn"]) and d["clusters"] == 8
    # kept members are the farthest from their centroid within their cluster
    from retrieval_prune.preprocess.data._cluster import cosine_to_centroids, kmeans

    ps = sets[0]
    labels, cent = kmeans(ps.embeddings, 8, np.random.default_rng([0, 0]))
    dist = cosine_to_centroids(ps.embeddings, labels, cent)
    kept = np.array([ps.query_ids.index(q) for q in sel.kept["syn"]])
    for c in np.unique(labels[kept]):
        members = np.flatnonzero(labels == c)
        kept_c = np.intersect1d(members, kept)
        dropped = np.setdiff1d(members, kept)
        if dropped.size:
            assert dist[kept_c].min() >= dist[dropped].max()


def test_stratum_budgets_follow_algorithm_1():
    # smallest first: 2 gets all of it (<= 24 // 4), then 3, then floor(19 / 2) = 9, rest 10
    np.testing.assert_array_equal(stratum_budgets(24, np.array([50, 2, 3, 40])), [10, 2, 3, 9])
    np.testing.assert_array_equal(stratum_budgets(5, np.array([0, 4, 0, 4])), [0, 2, 0, 3])
    rng = np.random.default_rng(2)
    for _ in range(200):
        sizes = rng.integers(0, 20, size=int(rng.integers(1, 10)))
        total = int(rng.integers(0, sizes.sum() + 1))
        got = stratum_budgets(total, sizes)
        assert got.sum() == total and np.all(got <= sizes)


def test_ccs_cutoff_strata_and_sampling():
    n = 200
    s = np.linspace(0.0, 1.0, n)  # synthetic scores; position = rank
    ps = PairSet("lin", [str(i) for i in range(n)], scores=s)
    sel = CoverageCentric(keep=0.1, beta="0.2", strata=4).select([ps])
    kept = np.array([int(q) for q in sel.kept["lin"]])
    assert kept.size == 20 and kept.max() < 160  # the 40 hardest are cut
    # 160 left, 4 equal-width strata of 40 each: 5 from each
    np.testing.assert_array_equal(np.bincount(kept // 40, minlength=4), [5, 5, 5, 5])
    assert sel.report.details["lin"]["cut"] == 40
    # the cutoff never makes the budget unreachable
    sel = CoverageCentric(keep=0.9, beta="0.5", strata=4).select([ps])
    assert len(sel.kept["lin"]) == 180 and sel.report.details["lin"]["cut"] == 20
    # skewed scores: the sparse strata are taken whole, the dense ones share the rest
    sk = np.concatenate([np.full(190, 0.1), np.linspace(0.5, 1.0, 10)])
    sel = CoverageCentric(keep=0.1, beta="0.0", strata=10).select(
        [PairSet("sk", [str(i) for i in range(n)], scores=sk)]
    )
    kept = np.array([int(q) for q in sel.kept["sk"]])
    assert kept.size == 20 and (kept >= 190).sum() == 10


def test_ccs_beta_auto_follows_the_paper():
    assert paper_beta(0.9) == 0.0 and paper_beta(0.5) == 0.0 and paper_beta(0.3) == 0.1
    assert paper_beta(0.2) == 0.1 and paper_beta(0.1) == 0.3 and paper_beta(0.05) == 0.3
    assert CoverageCentric(keep=0.1).beta == "auto"
    assert CoverageCentric(keep=0.1).beta_rate == 0.3
    assert CoverageCentric(keep=0.1, beta=0.25).spec == "ccs:keep=0.1,beta=0.25,strata=50,seed=0"
    assert registry.build("ccs:beta=.5").beta == "0.5"


def test_top_importance_keeps_the_hardest():
    ps = synthetic_set(50, seed=4)
    sel = TopImportance(keep=0.2).select([ps])
    want = sorted(np.argsort(-ps.scores, kind="stable")[:10].tolist())
    assert sel.kept["syn"] == [ps.query_ids[i] for i in want]


def test_random_pairs_needs_nothing_and_is_uniform():
    ps = PairSet("ids", [str(i) for i in range(1000)])
    counts = np.zeros(1000)
    for seed in range(40):
        sel = RandomPairs(keep=0.5, seed=seed).select([ps])
        counts[[int(q) for q in sel.kept["ids"]]] += 1
    assert counts.min() > 5 and counts.max() < 35  # every query drawn about 20 times


@pytest.mark.parametrize(
    "spec, match",
    [
        ("dbp:keep=0", r"keep=0.0 must be in \(0, 1\]"),
        ("ccs:keep=1.5", "keep=1.5 must be <= 1"),
        ("random_pairs:keep=-0.1", "must be >= 0"),
        ("top_importance:keep=nan", r"must be in \(0, 1\]"),
        ("semdedup:eps=1.2", "eps=1.2 must be <= 1"),
        ("ccs:beta=1.0", r"beta=1.0 must be 'auto' or a number in \[0, 1\)"),
        ("ccs:beta=lots", "beta='lots' must be 'auto'"),
        ("dbp:tau=0", "tau=0.0 must be >="),
        ("ccs:strata=0", "strata=0 must be >= 1"),
        ("semdedup:clusters=-1", "clusters=-1 must be >= 0"),
    ],
)
def test_bad_params_are_refused(spec, match):
    with pytest.raises(ValueError, match=match):
        registry.build(spec)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_bad_input_is_refused(name):
    step = registry.build(SPECS[name])
    with pytest.raises(ValueError, match="no training collections"):
        step.select([])
    with pytest.raises(ValueError, match="has no training queries"):
        step.select([PairSet("empty", [], np.zeros((0, 4), np.float32), np.zeros(0))])
    bare = PairSet("bare", ["a", "b"])
    if step.needs_embeddings:
        with pytest.raises(ValueError, match="needs pair embeddings"):
            step.select([bare])
        bad = PairSet("nan", ["a", "b"], np.array([[1, 0], [np.nan, 0]], np.float32))
        with pytest.raises(ValueError, match="NaN or Inf"):
            step.select([bad])
    if step.needs_scores:
        with pytest.raises(ValueError, match="needs finite per-query scores"):
            step.select([bare])
        with pytest.raises(ValueError, match="needs finite per-query scores"):
            step.select([PairSet("s", ["a", "b"], scores=np.array([0.1, np.inf]))])
    if not (step.needs_embeddings or step.needs_scores):
        assert len(step.select([bare]).kept["bare"]) == 1
    with pytest.raises(TypeError, match="PairSet"):
        step.select([{"name": "x"}])


# -- selections on TrainPairs, saved files, training --------------------------------------
def _toy_pairs(n=12, name="toy"):
    from retrieval_prune.train.data import TrainPairs

    return TrainPairs(
        name=name,
        split="train",
        doc_ids=[f"d{i}" for i in range(6)],
        doc_texts=[f"doc {i}" for i in range(6)],
        query_ids=[f"q{i}" for i in range(n)],
        query_texts=[f"query {i}" for i in range(n)],
        positives=[np.array([i % 6]) for i in range(n)],
        negatives=[np.array([(i + 1) % 6]) for i in range(n)],
    )


def test_select_save_load_round_trip_and_restrict(tmp_path):
    from retrieval_prune.train.select import (
        INPUTS_KEY,
        load_selection,
        save_selection,
        select_pairs,
    )

    pairs = [_toy_pairs(12, "a"), _toy_pairs(5, "b")]
    out, sel = select_pairs("random_pairs:keep=0.5,seed=3", pairs, progress=False)
    assert isinstance(sel, Selection) and [len(p) for p in out] == [6, 2]
    for p, orig in zip(out, pairs, strict=True):
        assert p.doc_ids == orig.doc_ids and p.doc_texts is orig.doc_texts  # documents stay
        assert p.query_ids == sel.kept[p.name]
        for q, pos in zip(p.query_ids, p.positives, strict=True):
            assert pos.tolist() == orig.positives[orig.query_ids.index(q)].tolist()
        assert p.describe()["selection"] == "random_pairs:keep=0.5,seed=3"
    assert len(pairs[0]) == 12  # the input is not changed
    assert sel.report.details[INPUTS_KEY]["scoring_seconds"] == 0.0
    path = save_selection(sel, tmp_path / "sel.json")
    doc = json.loads(path.read_text())
    assert doc["spec"] == "random_pairs:keep=0.5,seed=3"
    assert doc["counts"] == {"a": {"queries": 12, "kept": 6}, "b": {"queries": 5, "kept": 2}}
    back = load_selection(path)
    assert back.kept == sel.kept and back.aliases == sel.aliases
    assert back.report.to_dict() == json.loads(json.dumps(sel.report.to_dict()))
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a selection file"):
        load_selection(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="needs per-query EL2N scores"):
        select_pairs("ccs:keep=0.5", pairs)
    with pytest.raises(ValueError, match="not a data step"):
        select_pairs("pool:factor=2", pairs)


def test_a_chain_of_data_steps():
    from retrieval_prune.train.select import _chain, build_data_steps, select_pairs

    x = np.repeat(synthetic_set(40, seed=9, spread=1.0).embeddings, 2, axis=0)  # pairs of copies
    ps = PairSet("pairs", [f"q{i}" for i in range(80)], x)
    steps = build_data_steps("semdedup:eps=0.01,clusters=3 | random_pairs:keep=0.5")
    sel = _chain(steps, [ps])
    kept = sel.kept["pairs"]
    assert len(kept) == 20 and sel.report.step == " | ".join(s.spec for s in steps)
    assert [r["bytes_after"] for r in sel.report.details["_steps"]] == [40, 20]
    assert sel.report.details["pairs"] == {"queries": 80, "kept": 20}
    # aliases only where the representative survived the second step
    assert sel.aliases["pairs"] and all(t in kept for t in sel.aliases["pairs"].values())
    assert len(sel.aliases["pairs"]) == 20
    out, sel = select_pairs("random_pairs:keep=0.5 | random_pairs:keep=0.5", [_toy_pairs(12)],
                            progress=False)  # fmt: skip
    assert len(out[0]) == 3 and out[0].info["selection"].count("random_pairs") == 2
    with pytest.raises(ValueError, match="not a data step"):
        build_data_steps("random_pairs | pool:factor=2")


@pytest.fixture(scope="module")
def adi_pairs():
    from retrieval_prune.train.data import load_pairs

    return load_pairs("adi", split="test", allow_eval_split=True, negatives="none", max_queries=8)


def test_pair_embeddings_on_adi_are_unit_and_cached(adi_pairs):
    from retrieval_prune.train.select import pair_sets, select_pairs

    timings = {}
    (ps,) = pair_sets([adi_pairs], True, None, progress=False, timings=timings)
    assert ps.embeddings.shape == (8, 384) and ps.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ps.embeddings, axis=1), 1.0, atol=1e-5)
    assert ps.scores is None and timings["embedding_seconds"] > 0
    (again,) = pair_sets([adi_pairs], True, None, progress=False)
    np.testing.assert_array_equal(ps.embeddings, again.embeddings)
    out, sel = select_pairs("semdedup:eps=0.05", [adi_pairs], progress=False)
    assert len(out[0]) == len(sel.kept[adi_pairs.name])


def _cfg(**kw):
    from retrieval_prune.train.loop import TrainConfig

    base = dict(
        data=("adi",), max_steps=2, batch_size=4, negatives=1, doc_maxlen=48, dim=32,
        index_doc_maxlen=48, minutes=5, seed=0, save_every_minutes=0, threads=1,
        precision="float32",
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_train_on_a_selection_records_spec_and_counts(tmp_path, adi_pairs):
    from retrieval_prune.encode import load_checkpoint
    from retrieval_prune.train.loop import train
    from retrieval_prune.train.select import save_selection, select_pairs
    from tests.test_train import _tiny_model

    res = train(_cfg(select="random_pairs:keep=0.5"), tmp_path / "spec", pairs=[adi_pairs],
                model=_tiny_model(), progress=False)  # fmt: skip
    assert res.steps == 2
    meta = load_checkpoint(tmp_path / "spec").config["metadata"]["training"]
    assert meta["config"]["select"] == "random_pairs:keep=0.5"
    assert meta["selection"] == {
        "spec": "random_pairs:keep=0.5,seed=0",
        "source": "spec",
        "counts": {adi_pairs.name: {"queries": 8, "kept": 4}},
    }
    assert meta["data"][0]["queries"] == 4 and meta["data"][0]["queries_before_selection"] == 8

    _, sel = select_pairs("random_pairs:keep=0.25,seed=1", [adi_pairs], progress=False)
    path = save_selection(sel, tmp_path / "sel.json")
    train(_cfg(select=str(path)), tmp_path / "file", pairs=[adi_pairs], model=_tiny_model(),
          progress=False)  # fmt: skip
    meta = load_checkpoint(tmp_path / "file").config["metadata"]["training"]
    assert meta["selection"]["source"] == str(path.resolve())
    assert meta["selection"]["counts"] == {adi_pairs.name: {"queries": 8, "kept": 2}}
    assert meta["data"][0]["queries"] == 2

    train(_cfg(), tmp_path / "all", pairs=[adi_pairs], model=_tiny_model(), progress=False)
    meta = load_checkpoint(tmp_path / "all").config["metadata"]["training"]
    assert meta["selection"] is None and meta["config"]["select"] is None


def test_train_config_refuses_bad_selections(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such selection file"):
        _cfg(select=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="unknown component"):
        _cfg(select="nonsense:keep=0.3")
    with pytest.raises(ValueError, match="not a data step"):
        _cfg(select="pool:factor=2")
    with pytest.raises(ValueError, match=r"keep=0.0 must be in \(0, 1\]"):
        _cfg(select="random_pairs:keep=0")


def test_el2n_scores_from_a_checkpoint(tmp_path, adi_pairs):
    from retrieval_prune.train.loop import train
    from retrieval_prune.train.select import (
        EL2N_CANDIDATES,
        _el2n_candidates,
        el2n_scores,
        select_pairs,
    )
    from tests.test_train import _tiny_model

    cand = _el2n_candidates(adi_pairs, EL2N_CANDIDATES, 7)
    assert cand.shape == (8, EL2N_CANDIDATES)
    for row, pos in zip(cand, adi_pairs.positives, strict=True):
        assert row[0] == pos[0] and len(set(row.tolist())) == EL2N_CANDIDATES
        assert not set(row[1:].tolist()) & set(pos.tolist())
    np.testing.assert_array_equal(cand, _el2n_candidates(adi_pairs, EL2N_CANDIDATES, 7))

    train(_cfg(max_steps=1), tmp_path / "full", pairs=[adi_pairs], model=_tiny_model(),
          progress=False)  # fmt: skip
    scores, info = el2n_scores(adi_pairs, tmp_path / "full", progress=False)
    assert scores.shape == (8,) and np.all((scores >= 0) & (scores <= np.sqrt(2) + 1e-9))
    assert info["cached"] is False and info["scoring_seconds"] > 0
    again, info2 = el2n_scores(adi_pairs, tmp_path / "full", progress=False)
    np.testing.assert_array_equal(scores, again)
    assert info2["cached"] is True and info2["scoring_seconds"] == info["scoring_seconds"]
    out, sel = select_pairs("ccs:keep=0.5,strata=3", [adi_pairs], scores_from=tmp_path / "full",
                            progress=False)  # fmt: skip
    assert len(out[0]) == 4
    assert sel.report.details["_inputs"]["scoring_seconds"] == info["scoring_seconds"]


def test_el2n_scores_from_the_shipped_encoder_by_name(adi_pairs):
    """--scores-from ft128: the shipped full-data fine-tune, by name (a new user has no
    full-data run of their own)."""
    from retrieval_prune.encode.checkpoint import SHIPPED, read_config
    from retrieval_prune.train.select import el2n_scores

    scores, info = el2n_scores(adi_pairs, "ft128", progress=False)
    assert scores.shape == (8,) and np.isfinite(scores).all()
    assert info["checkpoint"] == "ft128"
    assert info["weights_sha256"] == read_config(SHIPPED / "ft128")["weights_sha256"]


def test_near_duplicate_fraction_matches_all_pairs():
    from retrieval_prune.train.select import near_duplicate_fraction

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16))
    x[150:170] = x[:20] + 0.02 * rng.normal(size=(20, 16))  # 40 rows with a near twin
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for eps in (0.0, 0.01, 0.05, 0.5):
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        want = float((sim > 1 - eps).any(axis=1).mean())
        # blocks smaller than n exercise the diagonal bookkeeping across blocks
        assert near_duplicate_fraction(x, eps, block=64) == want
        assert near_duplicate_fraction(x, eps) == want
    assert near_duplicate_fraction(x[:1], 0.5) == 0.0
    with pytest.raises(ValueError, match="eps"):
        near_duplicate_fraction(x, 1.5)
