"""The PLAID benchmark module (retrieval_prune.evaluation.bench_plaid) on a tiny
synthetic set (labelled synthetic): our engine's path always, colbert-ai's PLAID only
when colbert-ai is installed (slow: it compiles C++ extensions on first use)."""

import json
import sys

import numpy as np
import pytest

from retrieval_prune.cli import main
from retrieval_prune.evaluation import bench_plaid as bp
from retrieval_prune.evaluation.runner import DatasetContext
from retrieval_prune.types import MultiVectors
from tests.conftest import random_docs

ROW_KEYS = {"dataset", "split", "pipeline", "checkpoint", "encoder", "ndcg@10", "recall@100",
            "mrr@10", "exact_ndcg@10", "delta_ndcg@10", "exact_top10_recall", "n_docs",
            "n_queries", "bytes_per_doc", "vectors_per_doc", "compression_ratio", "build_s",
            "p50_ms", "p95_ms", "query_encode_ms", "peak_rss_mb", "engine",
            "build_s_with_encoding", "p50_ms_k10", "p95_ms_k10", "p50_ms_k100", "p95_ms_k100"}


def synthetic_context(n_docs=120, n_queries=12, dim=128, seed=0) -> DatasetContext:
    """Synthetic documents; each query is 32 noisy tokens of one document (its answer)."""
    docs = random_docs(n_docs=n_docs, dim=dim, max_len=30, seed=seed)
    rng = np.random.default_rng(seed + 1)
    queries, qids, qrels = [], [], {}
    for i in range(n_queries):
        d = (i * 7) % n_docs
        x = docs.embeddings[docs.offsets[d] : docs.offsets[d + 1]]
        q = x[rng.integers(0, len(x), 32)] + 0.1 * rng.standard_normal((32, dim))
        queries.append((q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32))
        qids.append(f"q{i}")
        qrels[f"q{i}"] = {f"d{d}": 1}
    return DatasetContext(
        name="synthetic", split="test", doc_ids=[f"d{i}" for i in range(n_docs)], docs=docs,
        qids=qids, queries=MultiVectors.from_list(queries, dim=dim), qrels=qrels,
        encoder_settings={"synthetic": seed}, encoder_name="synthetic", query_encode_ms=None)


def test_our_engine_rows_without_colbert(tmp_path):
    ctx = synthetic_context()
    specs = ["residual:k=16,nbits=2,normalize=true | ivf",
             "pool:factor=2 | residual:k=16,nbits=1,normalize=true | ivf:nprobe=2"]
    res = bp.run(ctx, pipelines=specs, nbits=(), threads=(1,), scratch=tmp_path, warmup=1,
                 progress=False, log=lambda s: None)
    rows = res["rows"]
    assert [r["pipeline"] for r in rows] == specs
    for r in rows:
        assert ROW_KEYS <= set(r)
        assert r["engine"] == "retrieval_prune" and r["threads"] == 1
        assert r["latency_pass_matches_quality_pass"] is True
        assert r["p50_ms"] == r["p50_ms_k100"] > 0 and r["p50_ms_k10"] > 0
        assert r["n_queries"] == 12 and r["bytes_per_doc"] > 0
        assert set(r["latency"]["1"]) == {"10", "100"}
        assert r["build_s_with_encoding"] is None  # no text corpus: nothing to time
        assert r["ndcg@10"] > 0.5
    assert [r["nbits"] for r in rows] == [2, 1]
    assert rows[1]["vectors_per_doc"] < rows[0]["vectors_per_doc"]  # pooled
    assert res["summary"]["reference"] is None  # no PLAID row
    md = bp.format_markdown(res, "cmd")
    assert "\\|" in md and "| retrieval_prune |" in md
    json.dumps(res, default=bp._json_default)


def test_summary_ratios():
    plaid = {"engine": "plaid", "nbits": 2, "pipeline": "plaid:nbits=2", "ndcg@10": 0.70,
             "bytes_per_doc": 8000.0, "p50_ms_k10": 30.0, "p50_ms_k100": 60.0}
    ours = [{"engine": "retrieval_prune", "pipeline": "a", "ndcg@10": 0.697,
             "bytes_per_doc": 2000.0, "p50_ms_k10": 5.0, "p50_ms_k100": 30.0},
            {"engine": "retrieval_prune", "pipeline": "b", "ndcg@10": 0.69,
             "bytes_per_doc": 1000.0, "p50_ms_k10": 1.0, "p50_ms_k100": 1.0}]
    s = bp.summarize([plaid, *ours])
    a, b = s["rows"]
    assert s["reference"] == "plaid:nbits=2"
    assert a["quality_ok"] and a["size_ratio"] == 4.0 and a["speed_ratio_k10"] == 6.0
    assert a["meets_target_k10"] and not a["meets_target_k100"]  # 2x faster only at k=100
    assert not b["quality_ok"] and not b["meets_target_k10"]  # 0.01 below PLAID


def test_a_failing_plaid_build_is_its_rows_error_not_the_runs(monkeypatch, tmp_path):
    """colbert-ai failing inside its indexer (it has: CUDA probing, faiss, memory) must not
    lose the rows already measured: the PLAID row carries the error, ours are complete."""

    class Boom:
        def __init__(self, *a, **k):
            raise RuntimeError("indexer exploded")

    monkeypatch.setattr(bp, "require_colbert", lambda: None)
    monkeypatch.setattr(bp, "warm_colbert_extensions", lambda log=None: 0.0)
    monkeypatch.setattr(bp, "PlaidEngine", Boom)
    ctx = synthetic_context()
    spec = "residual:k=16,nbits=2,normalize=true | ivf"
    res = bp.run(ctx, pipelines=[spec], nbits=(2,), threads=(1,), scratch=tmp_path, warmup=1,
                 progress=False, log=lambda s: None)
    ours, plaid = res["rows"]
    assert ours["engine"] == "retrieval_prune" and ours["error"] is None
    assert ours["p50_ms_k10"] > 0 and ours["ndcg@10"] > 0.5
    assert plaid["engine"] == "plaid" and plaid["pipeline"] == "plaid:nbits=2"
    assert "RuntimeError: indexer exploded" in plaid["error"]
    assert plaid["p50_ms_k10"] is None and plaid["latency"] is None
    assert res["summary"]["reference"] is None  # no working reference: no ratios
    md = bp.format_markdown(res, "cmd")
    assert "failed**: RuntimeError: indexer exploded" in md
    json.dumps(res, default=bp._json_default)


def test_missing_colbert_gives_install_hint(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "colbert", None)  # import colbert -> ImportError
    with pytest.raises(ImportError, match=r"pip install -e '\.\[plaid\]'"):
        bp.require_colbert()
    rc = main(["bench", "plaid", "--data", "scifact", "--json", str(tmp_path / "x.json")])
    assert rc == 2
    assert "pip install -e '.[plaid]'" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_plaid_rows_on_synthetic(tmp_path):
    pytest.importorskip("colbert")
    ctx = synthetic_context(n_docs=200, n_queries=10)
    res = bp.run(ctx, pipelines=["residual:k=64,nbits=2,normalize=true | ivf"], nbits=(2,),
                 threads=(1,), scratch=tmp_path, warmup=1, progress=False, log=lambda s: None)
    ours, plaid = res["rows"]
    assert plaid["engine"] == "plaid" and plaid["nbits"] == 2
    assert ROW_KEYS <= set(plaid)
    assert plaid["latency_pass_matches_quality_pass"] is True
    assert plaid["ndcg@10"] > 0.5 and plaid["bytes_per_doc"] > 0
    assert plaid["vectors_per_doc"] == pytest.approx(ctx.docs.n_tokens / 200)
    st = plaid["plaid_search_settings"]
    assert st["10"]["ndocs"] == 256 and st["100"]["ndocs"] == 1024  # colbert-ai defaults
    assert res["summary"]["rows"][0]["pipeline"] == ours["pipeline"]
