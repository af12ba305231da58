import json

import pytest

from retrieval_prune.data import load_beir
from retrieval_prune.evaluation.metrics import evaluate


def test_metrics_hand_computed():
    qrels = {"q1": {"a": 1, "b": 1}, "q2": {"c": 2}, "q3": {"z": -1}}
    run = {"q1": {"a": 3.0, "x": 2.0, "b": 1.0}}  # q2 has no results: scores 0, not skipped
    m = evaluate(qrels, run)
    # q1: DCG = 1 + 1/log2(4) = 1.5 ; IDCG = 1 + 1/log2(3) = 1.6309
    assert m["ndcg@10"] == pytest.approx((1.5 / 1.6309297535714575) / 2)
    assert m["recall@100"] == pytest.approx(0.5)
    assert m["mrr@10"] == pytest.approx(0.5)


def test_metrics_empty_run_scores_zero():
    assert evaluate({"q": {"a": 1}}, {})["ndcg@10"] == 0.0
    with pytest.raises(ValueError, match="no relevant"):
        evaluate({"q": {"a": 0}}, {})


def test_load_adi(data_dir):
    c = load_beir(data_dir / "adi")
    assert len(c) == 82 and c.name == "adi"
    qids, texts = c.judged_queries()
    assert len(qids) == len(c.qrels) > 0 and all(texts)


def test_load_by_name_and_slice(data_dir):
    c = load_beir("scifact", max_docs=50)
    judged = {d for r in c.qrels.values() for d in r}
    assert judged <= set(c.doc_ids) and len(c) < 5183


def test_missing_folder_and_split(tmp_path, data_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_beir(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="splits available"):
        load_beir(data_dir / "adi", split="dev")


def test_jsonl_split_on_newline_only(tmp_path):
    (tmp_path / "qrels").mkdir()
    with open(tmp_path / "corpus.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"_id": "d1", "title": "T", "text": "a\u2028b\u0085c"}, ensure_ascii=False) + "\n")
    (tmp_path / "queries.jsonl").write_text(json.dumps({"_id": "q", "text": "b"}) + "\n")
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq\td1\t1\n")
    c = load_beir(tmp_path)
    assert c.doc_texts == ["T a\u2028b\u0085c"]


def test_empty_corpus_rejected(tmp_path):
    (tmp_path / "qrels").mkdir()
    (tmp_path / "corpus.jsonl").write_text("")
    (tmp_path / "queries.jsonl").write_text("")
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n")
    with pytest.raises(ValueError, match="no documents"):
        load_beir(tmp_path)
