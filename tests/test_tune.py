"""`retrieval-prune tune`: pseudo-judgements from exact MaxSim, successive halving, the budget
rules, the CLI. Synthetic embedding sets (labelled synthetic) for the search's invariants; the
real adi collection with the real encoder for the CLI."""

import json

import numpy as np
import pytest

from retrieval_prune.cli import main
from retrieval_prune.data.embeddings import make_synthetic_colpali_set, save_embedding_set
from retrieval_prune.evaluation.metrics import evaluate
from retrieval_prune.evaluation.tune import (
    default_candidates,
    pseudo_qrels,
    pseudo_queries,
    tune,
)

CANDS = ["exact", "fp16", "binary:sign", "pool:factor=2 | fp16", "pool:factor=4 | binary:sign"]


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory):
    # synthetic ColPali-shaped pages: 60 docs, 12 queries (labelled synthetic)
    es = make_synthetic_colpali_set(n_docs=60, n_queries=12, seed=3)
    return save_embedding_set(tmp_path_factory.mktemp("tune") / "set", es)


def test_pseudo_qrels_grade_by_exact_rank_and_rank_the_exact_run_ideal():
    run = {"q": {f"d{i}": 1.0 - i / 200 for i in range(150)}, "e": {}}
    qrels = pseudo_qrels(run)
    assert set(qrels) == {"q"}  # a query without results has nothing to judge
    g = qrels["q"]
    assert len(g) == 100 and g["d0"] == 1000 and g["d1"] == 330 and g["d2"] == 172
    assert g["d99"] == 1 and "d100" not in g
    assert all(g[f"d{i}"] >= g[f"d{i + 1}"] for i in range(99))
    # the exact run is its own ideal ranking; moving its top document to rank 11 costs the
    # most, swapping ranks 9 and 10 costs little
    assert evaluate(qrels, run)["ndcg@10"] == pytest.approx(1.0, abs=1e-12)
    top_out = dict(run["q"], d0=0.0)
    swap = dict(run["q"], d8=run["q"]["d9"], d9=run["q"]["d8"])
    lose_top = 1 - evaluate(qrels, {"q": top_out})["ndcg@10"]
    lose_swap = 1 - evaluate(qrels, {"q": swap})["ndcg@10"]
    assert 0 < lose_swap < 0.01 < lose_top


def test_pseudo_queries_are_windows_of_documents_and_seeded():
    texts = [" ".join(f"w{d}_{i}" for i in range(n)) for d, n in enumerate([3, 40, 20, 9])]
    src, qs = pseudo_queries(texts, 50, seed=1)
    assert (src, qs) == pseudo_queries(texts, 50, seed=1)
    assert pseudo_queries(texts, 50, seed=2) != (src, qs)
    assert 0 not in src  # a 3-word document is too short to cut a query from
    for d, q in zip(src, qs, strict=True):
        words = q.split()
        assert 8 <= len(words) <= 16 and q in texts[d]
    with pytest.raises(ValueError, match="--queries log"):
        pseudo_queries(["too short"], 3)


def test_default_grid_parses_and_holds_exact():
    from retrieval_prune.pipeline import make_pipeline

    for dim in (16, 128, 384):
        grid = default_candidates(dim)
        assert grid[0] == "exact" and len(set(grid)) == len(grid)
        for s in grid:
            make_pipeline(s)
    assert any("pca:dim=64" in s for s in default_candidates(128))


def test_tune_max_loss_zero_keeps_exact_agreement(synthetic_set):
    res = tune(str(synthetic_set), max_loss=0.0, candidates=CANDS, queries="log",
               min_docs=1000, progress=False)
    assert res.n_docs == 60 and res.rungs == [60] and len(res.tried) == len(CANDS)
    by = {p["pipeline"]: p for p in res.tried}
    # exact is compared with itself: the same arithmetic, so agreement is exact
    assert by["exact"]["est_loss"] == 0.0 and by["exact"]["top10_overlap"] == 1.0
    chosen = by[res.chosen]
    assert res.feasible and chosen["est_loss"] == 0.0
    # the smallest of those without loss, and nothing smaller is without loss
    assert all(p["est_loss"] > 0 or p["bytes_per_doc"] >= chosen["bytes_per_doc"]
               for p in res.tried)


def test_tune_max_bytes_picks_lowest_loss_within_bytes(synthetic_set):
    res = tune(str(synthetic_set), max_bytes_per_doc=40_000, candidates=CANDS, queries="log",
               min_docs=1000, progress=False)
    fit = [p for p in res.tried if p["bytes_per_doc"] <= 40_000]
    assert fit and res.feasible
    best = min(fit, key=lambda p: (p["est_loss"], p["bytes_per_doc"]))
    assert res.chosen == best["pipeline"]
    # nothing fits: the lowest-loss candidate, flagged
    res = tune(str(synthetic_set), max_bytes_per_doc=1, candidates=CANDS, queries="log",
               min_docs=1000, progress=False)
    assert not res.feasible
    assert res.chosen == min(res.tried, key=lambda p: (p["est_loss"], p["bytes_per_doc"]))[
        "pipeline"]


def test_successive_halving_rungs_nest_and_shrink(synthetic_set):
    res = tune(str(synthetic_set), max_loss=0.05, candidates=CANDS, queries="log",
               min_docs=6, eta=3, progress=False)
    assert res.rungs == [7, 20, 60]  # ceil(60/9), ceil(60/3), all
    per = [[p for p in res.tried if p["rung"] == r] for r in range(3)]
    assert [len(x) for x in per][0] == len(CANDS)
    assert all(p["n_docs"] == res.rungs[r] for r in range(3) for p in per[r])
    # each rung keeps ceil(n/3) plus (when not among them) the lowest-loss candidate
    assert len(per[1]) <= 2 + 1 and len(per[2]) <= 1 + 1
    names = [{p["pipeline"] for p in x} for x in per]
    assert names[2] <= names[1] <= names[0]
    assert res.chosen in names[2]
    # the frontier is the last rung's Pareto front, sorted by bytes
    b = [p["bytes_per_doc"] for p in res.frontier]
    assert b == sorted(b) and all(p["rung"] == 2 for p in res.frontier)


def test_tune_refuses_bad_input(synthetic_set):
    with pytest.raises(ValueError, match="give a budget"):
        tune(str(synthetic_set), queries="log")
    with pytest.raises(ValueError, match="0.01 is 1%"):
        tune(str(synthetic_set), max_loss=1.5, queries="log")
    with pytest.raises(ValueError, match="--queries log"):
        tune(str(synthetic_set), max_loss=0.01)  # an embedding set has no text
    with pytest.raises(ValueError, match="eta"):
        tune(str(synthetic_set), max_loss=0.01, queries="log", eta=1)
    with pytest.raises(ValueError, match="attention importance"):
        tune(str(synthetic_set), max_loss=0.01, queries="log", candidates=["attn_prune"])


def test_cli_tune_adi_real_encoder(tmp_path, data_dir, capsys):
    out = tmp_path / "t.json"
    rc = main(["tune", "--data", str(data_dir / "adi"), "--max-loss", "0.05", "-q",
               "--pipeline", "exact", "--pipeline", "fp16", "--pipeline", "binary:sign",
               "--pipeline", "pool:factor=2 | binary:sign", "--queries-n", "40",
               "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert {"chosen", "frontier", "tried", "feasible", "budget"} <= set(doc)
    for p in doc["frontier"]:
        assert {"pipeline", "bytes_per_doc", "compression_ratio", "est_loss", "p50_ms"} <= set(p)
    assert doc["n_docs"] == 82 and doc["n_queries"] == 40 and doc["queries"] == "corpus"
    assert doc["chosen"] in {p["pipeline"] for p in doc["tried"]}
    text = capsys.readouterr().out
    assert "chosen (within max_loss=0.05" in text and doc["chosen"] in text
    assert np.isfinite([p["est_loss"] for p in doc["tried"]]).all()


def test_cli_tune_bad_budget_is_one_line_exit_2(data_dir, capsys):
    assert main(["tune", "--data", str(data_dir / "adi"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "give a budget" in err
