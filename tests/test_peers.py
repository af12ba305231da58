"""The peer worker and its client (retrieval_prune.evaluation.peer_worker / peers), on small
seeded synthetic data (labelled synthetic).

The worker runs under our own python with its ``exact`` engine (brute-force MaxSim in numpy,
checked against tests/naive.py), so these tests need no peer installed; the real peers
(fast-plaid, xtr-warp-rs) are exercised only where ``make peers`` made ``.venv-peers``.
"""

import io
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from retrieval_prune.evaluation import bench_plaid as bp
from retrieval_prune.evaluation.peer_worker import (
    MAGIC,
    BadArray,
    ProtocolError,
    read_frame,
    write_frame,
)
from retrieval_prune.evaluation.peers import PeerEngine, PeerError, PeerProcess, peer_configs
from retrieval_prune.types import MultiVectors
from tests import naive
from tests.conftest import random_docs
from tests.test_bench_plaid import synthetic_context

PEERS_PYTHON = Path(__file__).resolve().parents[1] / ".venv-peers" / "bin" / "python"
REQUIRED_KEYS = {"engine", "pipeline", "encoder", "ndcg@10", "recall@100", "bytes_per_doc",
                 "p50_ms_k10", "p95_ms_k10", "p50_ms_k100", "p95_ms_k100", "e2e_p50_ms_k10",
                 "e2e_p95_ms_k10", "e2e_p50_ms_k100", "e2e_p95_ms_k100", "error"}


# -- framing ----------------------------------------------------------------------------
def test_frame_round_trip_keeps_dtypes_shapes_and_values():
    rng = np.random.default_rng(0)
    arrays = {"f32": rng.standard_normal((7, 5)).astype(np.float32),
              "f16": rng.standard_normal((3, 4)).astype(np.float16),
              "i64": np.arange(9, dtype=np.int64),
              "empty": np.zeros((0, 128), np.float32),
              "strided": np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::2]}
    buf = io.BytesIO()
    write_frame(buf, {"op": "x", "k": 3, "nested": {"a": [1, 2]}}, arrays)
    write_frame(buf, {"op": "second"})
    buf.seek(0)
    head, out = read_frame(buf)
    assert head == {"op": "x", "k": 3, "nested": {"a": [1, 2]}}
    assert list(out) == list(arrays)
    for name, a in arrays.items():
        assert out[name].dtype == a.dtype and out[name].shape == a.shape
        np.testing.assert_array_equal(out[name], a)
    assert read_frame(buf) == ({"op": "second"}, {})
    with pytest.raises(EOFError):
        read_frame(buf)


def test_array_bytes_are_plain_npy_files():
    """Each array travels as exactly what np.save(allow_pickle=False) writes."""
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    buf = io.BytesIO()
    write_frame(buf, {}, {"a": a})
    raw = buf.getvalue()
    (n,) = struct.unpack("<Q", raw[4:12])
    head = json.loads(raw[12 : 12 + n])
    ref = io.BytesIO()
    np.save(ref, a, allow_pickle=False)
    assert head["arrays"] == [["a", len(ref.getvalue())]]
    assert raw[12 + n :] == ref.getvalue()


def test_no_pickle_either_way():
    with pytest.raises(TypeError, match="pickle"):
        write_frame(io.BytesIO(), {}, {"o": np.array([{"x": 1}], dtype=object)})
    # a hand-made frame carrying a pickled object array is refused on reading, and the
    # stream stays in step (the next frame reads)
    obj = io.BytesIO()
    np.save(obj, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    hb = json.dumps({"op": "search", "arrays": [["queries", len(obj.getvalue())]]}).encode()
    buf = io.BytesIO(MAGIC + struct.pack("<Q", len(hb)) + hb + obj.getvalue())
    buf.seek(0, 2)
    write_frame(buf, {"op": "ping"})
    buf.seek(0)
    with pytest.raises(BadArray, match="allow_pickle"):
        read_frame(buf)
    assert read_frame(buf)[0] == {"op": "ping"}
    with pytest.raises(ProtocolError, match="magic"):
        read_frame(io.BytesIO(b"XXXX" + bytes(8)))


# -- the worker ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def docs():
    return random_docs(n_docs=40, dim=16, max_len=12, seed=3, empty=(0, 17))


def test_worker_exact_engine_matches_naive_maxsim(tmp_path, docs):
    rng = np.random.default_rng(5)
    with PeerProcess(sys.executable, log=tmp_path / "w.log") as p:
        info = p.request("info")[0]
        assert info["threads"] == 1 and info["versions"]["numpy"] == np.__version__
        rep, _ = p.request("build", {"embeddings": docs.embeddings, "offsets": docs.offsets},
                           engine="exact", settings={}, index=str(tmp_path / "ix"))
        assert rep["index_bytes"] > docs.embeddings.nbytes and rep["build_s"] >= 0
        for i in range(5):
            q = rng.standard_normal((1 + 3 * i, 16)).astype(np.float32)
            for k in (1, 7, 100):
                rep, arr = p.request("search", {"queries": q}, k=k)
                ref_s, ref_i = naive.topk(naive.maxsim_scores(q, docs.embeddings, docs.offsets),
                                          min(k, 38))  # two documents are empty
                assert arr["ids"].dtype == np.int64 and rep["search_s"] >= 0
                np.testing.assert_array_equal(arr["ids"], ref_i)
                np.testing.assert_allclose(arr["scores"], ref_s, rtol=1e-5, atol=1e-5)
                assert 0 not in arr["ids"] and 17 not in arr["ids"]  # empty: never matches
    # a second worker opens the saved index and answers the same
    with PeerProcess(sys.executable) as p:
        p.request("open", engine="exact", settings={}, index=str(tmp_path / "ix"))
        _, arr = p.request("search", {"queries": docs.embeddings[5:9]}, k=3)
        ref = naive.topk(naive.maxsim_scores(docs.embeddings[5:9], docs.embeddings,
                                             docs.offsets), 3)[1]
        np.testing.assert_array_equal(arr["ids"], ref)


def test_bad_requests_come_back_as_errors_and_the_worker_goes_on(tmp_path, docs):
    q = np.ones((2, 16), np.float32)
    with PeerProcess(sys.executable, log=tmp_path / "w.log") as p:
        with pytest.raises(PeerError, match="no index"):
            p.request("search", {"queries": q}, k=3)
        with pytest.raises(PeerError, match="engine='nope'"):
            p.request("build", {"embeddings": docs.embeddings, "offsets": docs.offsets},
                      engine="nope", index=str(tmp_path / "x"))
        with pytest.raises(PeerError, match="unknown op"):
            p.request("frobnicate")
        with pytest.raises(PeerError, match="offsets"):
            p.request("build", {"embeddings": docs.embeddings,
                                "offsets": np.array([0, 5], np.int64)},
                      engine="exact", index=str(tmp_path / "x"))
        p.request("build", {"embeddings": docs.embeddings, "offsets": docs.offsets},
                  engine="exact", index=str(tmp_path / "x"))
        with pytest.raises(PeerError, match="k=0"):
            p.request("search", {"queries": q}, k=0)
        with pytest.raises(PeerError, match="shape"):
            p.request("search", {"queries": np.ones(16, np.float32)}, k=3)
        with pytest.raises(PeerError, match="not exist"):
            p.request("open", engine="exact", index=str(tmp_path / "missing"))
        assert p.request("ping")[0]["ok"]  # still serving
        # a worker that dies (as a segfaulting peer would) is reported, not a hang
        with pytest.raises(PeerError, match="exited with code 3"):
            p.request("crash", code=3)
        with pytest.raises(PeerError, match="exited"):
            p.request("ping")


def test_missing_peers_python_is_an_error_with_the_fix():
    with pytest.raises(PeerError, match="make peers"):
        PeerProcess("/nonexistent/python")


def test_peer_configs_defaults_and_matched():
    cfgs = peer_configs(["fast-plaid", "xtr-warp-rs"], (2, 4))
    assert [(c["peer"], c["nbits"], c["kind"]) for c in cfgs] == [
        ("fast-plaid", 4, "defaults"),
        ("fast-plaid", 2, "matched nbits=2, budget"),
        ("fast-plaid", 4, "matched nbits=4, budget"),
        ("xtr-warp-rs", 4, "defaults (= matched nbits=4)"),
        ("xtr-warp-rs", 2, "matched nbits=2")]
    assert cfgs[0]["settings"] == {"create": {}, "search": {}}
    assert cfgs[1]["settings"]["create"] == {"nbits": 2}
    # fast-plaid's matched rows fully score as many documents as our n_candidates by k
    assert cfgs[1]["settings"]["search"] == {"by_k": {"10": {"n_full_scores": 256},
                                                       "100": {"n_full_scores": 1024}}}
    assert cfgs[4]["settings"] == {"create": {"nbits": 2}, "search": {}}
    with pytest.raises(ValueError, match="not one of"):
        peer_configs(["colbert"])


# -- engines in the benchmark -------------------------------------------------------------
def test_peer_engine_exact_row_and_crash_mid_pass(tmp_path):
    ctx = synthetic_context(n_docs=60, n_queries=6, dim=32)
    e = PeerEngine(ctx, "exact", None, tmp_path, python=sys.executable, kind="defaults")
    assert e.failed is None and e.row["engine"] == "exact"
    assert e.row["ndcg@10"] == pytest.approx(ctx.exact_metrics["ndcg@10"])
    assert e.row["exact_top10_recall"] == pytest.approx(1.0)
    assert e.row["bytes_per_doc"] > 0 and e.row["vectors_per_doc"] > 0
    e.open()
    assert [d for d, _ in e.search(2, 3)] == \
        sorted(ctx.exact_run[ctx.qids[2]], key=lambda d: -ctx.exact_run[ctx.qids[2]][d])[:3]
    assert len(e.ping_ms(5)) == 5
    e.proc.proc.kill()  # the worker dies mid-pass
    e.proc.proc.wait()
    assert e.search(3, 10) == []
    assert "exited" in e.row["error"] and e.failed
    assert e.search(4, 10) == []  # stays failed, quietly
    e.close()


def test_unrunnable_peer_is_a_row_with_error(tmp_path):
    ctx = synthetic_context(n_docs=30, n_queries=3, dim=16)
    e = PeerEngine(ctx, "fast-plaid", None, tmp_path, python="/nonexistent/python", nbits=4)
    assert "make peers" in e.row["error"] and e.row["pipeline"] == "fast-plaid:nbits=4"


class _FakeEncoder:
    """Text "q<i>" -> the context's query i (plus a small perturbation for a 2nd precision)."""

    def __init__(self, ctx, precision, noise=0.0):
        self.ctx, self.precision, self.name, self.noise = ctx, precision, "fake", noise

    def encode_queries(self, texts, progress=False):
        out = []
        for t in texts:
            i = int(t[1:])
            x = np.asarray(self.ctx.queries.doc(i), np.float32)
            out.append(x + self.noise * np.sin(np.arange(x.size, dtype=np.float32)).reshape(
                x.shape))
        return MultiVectors.from_list(out, dim=self.ctx.queries.dim)


def test_bench_with_a_peer_has_every_column_and_e2e(tmp_path):
    ctx = synthetic_context(n_docs=80, n_queries=8, dim=32)
    texts = [f"q{i}" for i in range(8)]
    encoders = {"float32": _FakeEncoder(ctx, "float32"),
                "int8-onnx": _FakeEncoder(ctx, "int8-onnx", noise=1e-3)}
    spec = "exact"
    res = bp.run(ctx, pipelines=[spec], nbits=(), threads=(1,), scratch=tmp_path, warmup=1,
                 progress=False, log=lambda s: None, peers=("exact",),
                 peers_python=sys.executable, query_texts=texts, encoders=encoders)
    rows = res["rows"]
    assert [(r["engine"], r["encoder_precision"]) for r in rows] == [
        ("retrieval_prune", "float32"), ("retrieval_prune", "int8-onnx"), ("exact", "float32")]
    for r in rows:
        assert REQUIRED_KEYS <= set(r), REQUIRED_KEYS - set(r)
        assert r["error"] is None
        for k in (10, 100):
            assert 0 < r[f"p50_ms_k{k}"] <= r[f"p95_ms_k{k}"]
            assert 0 < r[f"e2e_p50_ms_k{k}"] <= r[f"e2e_p95_ms_k{k}"]
    ours, fast, exact = rows
    assert ours["e2e_ndcg@10"] == pytest.approx(ours["ndcg@10"])  # same vectors either way
    assert fast["encoder"].endswith("int8-onnx") and fast["bytes_per_doc"] == ours["bytes_per_doc"]
    assert exact["ndcg@10"] == pytest.approx(ctx.exact_metrics["ndcg@10"])
    assert exact["latency_pass_matches_quality_pass"] is True
    assert exact["worker_p50_ms_k10"] > 0 and exact["pipe_ping_ms_p50"] > 0
    assert exact["pipe_overhead_ms_p50_k100"] is not None
    md = bp.format_markdown(res, "cmd")
    assert "e2e p50 k10" in md and "| exact |" in md and "worker p50 k10" in md
    json.dumps(res, default=bp._json_default)
    # the same run with the peer unrunnable: its row carries the error, ours still run
    res = bp.run(ctx, pipelines=[spec], nbits=(), threads=(1,), scratch=tmp_path, warmup=1,
                 progress=False, log=lambda s: None, peers=("fast-plaid",),
                 peers_python="/nonexistent/python", query_texts=texts,
                 encoders={"float32": encoders["float32"]})
    ours, *peers = res["rows"]
    assert ours["error"] is None and ours["e2e_p50_ms_k10"] > 0
    assert [p["pipeline"] for p in peers] == ["fast-plaid:nbits=4", "fast-plaid:nbits=2,budget=matched",
                                              "fast-plaid:nbits=4,budget=matched"]
    for peer in peers:
        assert "make peers" in peer["error"] and peer["p50_ms_k10"] is None
    assert "make peers" in bp.format_markdown(res)


@pytest.mark.skipif(not PEERS_PYTHON.exists(),
                    reason=".venv-peers not found: `make peers` installs fast-plaid and "
                           "xtr-warp-rs (torch 2.11) there")
@pytest.mark.parametrize("peer", ["fast-plaid", "xtr-warp-rs"])
def test_real_peer_finds_documents(tmp_path, peer):
    """Clustered synthetic tokens (a peer's centroid threshold is tuned for real
    embeddings: isotropic noise vectors sit far from every centroid)."""
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((32, 64)).astype(np.float32)
    lens = rng.integers(4, 20, size=300)
    emb = centers[rng.integers(0, 32, lens.sum())] \
        + 0.3 * rng.standard_normal((lens.sum(), 64)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    off = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=off[1:])
    with PeerProcess(PEERS_PYTHON, threads=2, log=tmp_path / "w.log") as p:
        assert p.request("info")[0]["versions"][peer]
        # fast-plaid: a search budget by depth (the matched rows' n_full_scores)
        search = {"by_k": {"10": {"n_full_scores": 64}}} if peer == "fast-plaid" else {}
        rep, _ = p.request("build", {"embeddings": emb, "offsets": off}, engine=peer,
                           settings={"create": {"nbits": 2}, "search": search},
                           index=str(tmp_path / "ix"))
        assert rep["meta"]["nbits"] == 2 and rep["index_bytes"] > 0
        hits = 0
        for i in range(0, 300, 30):
            rep, arr = p.request("search", {"queries": emb[off[i] : off[i + 1]]}, k=5)
            hits += int(arr["ids"][0] == i)
            if peer == "fast-plaid":
                assert rep["search_settings"] == {"n_full_scores": 64}
        assert hits >= 9, hits
