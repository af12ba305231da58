"""End-to-end evaluation on a synthetic ColPali-shaped embedding set (labelled synthetic)
and on the real adi collection with the real encoder."""

import json

import numpy as np
import pytest

from retrieval_prune.cli import main
from retrieval_prune.data.embeddings import (
    load_embedding_set,
    make_synthetic_colpali_set,
    save_embedding_set,
)
from retrieval_prune.evaluation.plot import frontier_plot, pareto_front
from retrieval_prune.evaluation.runner import evaluate_grid

ROW_KEYS = {"dataset", "pipeline", "checkpoint", "ndcg@10", "recall@100", "mrr@10",
            "exact_ndcg@10", "delta_ndcg@10", "n_docs", "bytes_per_doc", "vectors_per_doc",
            "build_s", "p50_ms", "p95_ms", "query_encode_ms", "peak_rss_mb",
            "exact_top10_recall", "compression_ratio"}


@pytest.fixture(scope="module")
def colpali_dir(tmp_path_factory):
    es = make_synthetic_colpali_set(n_docs=30, n_queries=10, seed=1)
    assert es.docs.lengths.tolist() == [1030] * 30 and es.docs.dim == 128
    return save_embedding_set(tmp_path_factory.mktemp("vidore") / "set", es)


def test_embedding_set_round_trip(colpali_dir):
    es = load_embedding_set(colpali_dir)
    ref = make_synthetic_colpali_set(n_docs=30, n_queries=10, seed=1)
    np.testing.assert_array_equal(es.docs.embeddings, ref.docs.embeddings)
    np.testing.assert_array_equal(es.docs.weights, ref.docs.weights)
    assert es.doc_ids == ref.doc_ids and es.qrels == ref.qrels


def test_exact_eval_on_embedding_set_is_its_own_reference(colpali_dir):
    rows = evaluate_grid([str(colpali_dir)], ["exact"], progress=False)
    (row,) = rows
    assert ROW_KEYS <= set(row)
    assert row["delta_ndcg@10"] == 0.0 and row["exact_top10_recall"] == 1.0
    assert row["vectors_per_doc"] == 1030 and row["query_encode_ms"] is None
    # 30 docs x 1030 x 128 x 4 bytes of float32, plus ids, offsets and the manifest
    assert 1030 * 128 * 4 < row["bytes_per_doc"] < 1030 * 128 * 4 * 1.05
    assert row["ndcg@10"] > 0.5  # the synthetic queries are built to find their page


def test_pareto_front_and_plot(tmp_path):
    assert pareto_front([(1, 0.1), (2, 0.05), (3, 0.3)]) == [0, 2]
    rows = [
        {"dataset": "d", "pipeline": "exact", "bytes_per_doc": 1e5, "ndcg@10": 0.7, "exact_ndcg@10": 0.7},
        {"dataset": "d", "pipeline": "x", "bytes_per_doc": 1e3, "ndcg@10": 0.65, "exact_ndcg@10": 0.7},
        {"dataset": "d", "pipeline": "p", "engine": "plaid", "nbits": 2, "bytes_per_doc": 5e3,
         "ndcg@10": 0.6, "exact_ndcg@10": 0.7},
    ]
    out = frontier_plot(rows, tmp_path / "f.png")
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"


def test_label_offsets_separate_close_points():
    from retrieval_prune.evaluation.plot import _label_offsets

    # two points at the same place get labels a text line apart; a far one keeps its offset
    off = _label_offsets([(1e4, 0.50), (1e4, 0.50), (1e2, 0.50)], height_pt=250)
    assert off[0] != off[1] and abs(off[0] - off[1]) >= 8
    assert off[2] == 4.0


def test_cli_eval_adi_real_encoder(tmp_path, data_dir, capsys):
    out = tmp_path / "rows.json"
    rc = main(["eval", "--data", str(data_dir / "adi"), "--pipeline", "exact", "-q",
               "--json", str(out), "--plot", str(tmp_path / "p.png")])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and ROW_KEYS <= set(rows[0])
    assert rows[0]["n_docs"] == 82 and rows[0]["delta_ndcg@10"] == 0.0
    assert rows[0]["ndcg@10"] > 0.3  # BM25 gets 0.432 on adi; zero-shot MaxSim should be close
    assert "nDCG@10" in capsys.readouterr().out


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["eval", "--data", str(tmp_path / "missing"), "-q"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "--data", "x", "--pipeline", "nosuch:a=1", "-q"]) == 2
    assert "unknown component" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["search", str(tmp_path), "--query", "x", "-k", "0"])
