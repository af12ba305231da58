"""``serve --ray``: a sharded index served through Ray Serve on the session's local Ray
cluster, checked over real HTTP (httpx) against the in-process Retriever: the same ids and
scores, /health, the bearer token for adds (then findable), the Host allow-list (421),
scrubbed errors, concurrent searches; and the CLI: one line (exit 2) without Ray, and a
real ``retrieval-prune serve IDX --ray`` process that serves and stops on SIGTERM.

Synthetic texts through the model-free HashingEncoder (labelled synthetic).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from retrieval_prune import cli  # noqa: E402
from retrieval_prune.pipeline.sharded import build_sharded  # noqa: E402
from retrieval_prune.retrieve import HashingEncoder, Retriever  # noqa: E402
from tests.conftest import wait_healthy  # noqa: E402
from tests.test_sharded import corpus  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SPEC = "pool:factor=2 | residual:nbits=2,k=32 | ivf"
TOKEN = "ray-serve-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def synthetic_corpus(n=200, seed=7):
    """``n`` documents and 12 queries of random words w0..w199 (labelled synthetic)."""
    return corpus(n, seed, n_words=200, n_queries=12)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hits(rows):
    """``[[(id, score), ...], ...]`` of Hits or of JSON hits."""
    return [[(h["id"], h["score"]) if isinstance(h, dict) else (h.id, h.score) for h in row]
            for row in rows]


@pytest.fixture(scope="module")
def served(tmp_path_factory, ray_cluster):
    from ray import serve

    from retrieval_prune.retrieve import ray_serve

    ids, texts, queries = synthetic_corpus()
    path = tmp_path_factory.mktemp("ray-serve") / "index"
    build_sharded(SPEC, ids, texts=texts, encoder=HashingEncoder(), shards=2, out=path)
    port = free_port()
    # num_cpus=0: the session cluster's 2 CPUs may be held by other tests' actors
    ray_serve.run(path, port=port, token=TOKEN, num_cpus=0)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client, path, queries
    finally:
        serve.shutdown()


def test_search_over_ray_serve_equals_the_in_process_retriever(served):
    client, path, queries = served
    local = Retriever.from_index(path)  # opened now: whatever generation the server holds
    for k in (1, 10, 50):
        r = client.post("/search", json={"queries": queries, "k": k})
        assert r.status_code == 200, r.text
        assert hits(r.json()["results"]) == hits(local.retrieve_batch(queries, k))
    r = client.post("/search", json={"queries": queries[:1], "k": 3, "with_text": True})
    assert r.json()["results"][0][0]["text"] == local.get(r.json()["results"][0][0]["id"]).text


def test_health_and_stats(served):
    client, path, _ = served
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok", "docs": len(Retriever.from_index(path))}
    st = client.get("/stats").json()
    assert st["index_type"] == "sharded" and st["path"] == "index"  # the folder's name only
    assert st["mutation"] == "bearer token"


def test_an_add_needs_the_token_and_is_then_findable(served):
    client, path, _ = served
    text = "w3 w17 w42 w99 w150 w3 w17 w42"
    doc = {"documents": [{"id": "zebra", "text": text, "metadata": {"a": 1}}]}
    r = client.post("/documents", json=doc)
    assert r.status_code == 401 and "bearer token" in r.json()["error"]
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = client.post("/documents", json=doc, headers={"Authorization": "Bearer wrong-token"})
    assert r.status_code == 403
    r = client.post("/documents", json=doc, headers=AUTH)
    assert r.status_code == 201, r.text
    assert r.json()["ids"] == ["zebra"] and r.json()["generation"].startswith("gen-")
    r = client.post("/search", json={"queries": [text, "w3 w17 w42 w99"], "k": 5})
    assert [row[0]["id"] for row in r.json()["results"]] == ["zebra", "zebra"]
    assert hits(r.json()["results"]) == hits(Retriever.from_index(path).retrieve_batch([text, "w3 w17 w42 w99"], 5))
    assert client.get("/documents/zebra").json()["metadata"] == {"a": 1}
    assert "zebra" in Retriever.from_index(path)  # saved as a new generation
    assert client.post("/documents", json=doc, headers=AUTH).status_code == 409
    r = client.delete("/documents/zebra", headers=AUTH)
    assert r.status_code == 200 and r.json()["deleted"] == "zebra"
    assert client.get("/documents/zebra").status_code == 404
    assert "zebra" not in Retriever.from_index(path)


def test_a_host_not_allowed_is_421(served):
    client, _, _ = served
    r = client.get("/health", headers={"Host": "rebound.example.com"})
    assert r.status_code == 421 and "rebound.example.com" in r.json()["error"]
    assert client.get("/health", headers={"Host": "localhost:1234"}).status_code == 200


def test_errors_are_the_same_json_without_paths(served):
    client, path, _ = served
    r = client.post("/search", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    assert client.post("/search", json={"queries": ["a"], "k": 0}).status_code == 422
    r = client.get("/documents/no-such-doc")
    assert r.status_code == 404 and str(path.parent) not in r.text
    assert client.get("/nowhere").json() == {"error": "no endpoint GET /nowhere; see /docs"}


def test_concurrent_searches_all_answer_right(served):
    client, path, queries = served
    want = dict(zip(queries, hits(Retriever.from_index(path).retrieve_batch(queries, 5)), strict=True))
    got: list = []

    def work(i):
        for j in range(4):
            q = queries[(i + j) % len(queries)]
            r = client.post("/search", json={"queries": [q], "k": 5})
            got.append((q, r.status_code, hits(r.json()["results"])[0] if r.status_code == 200 else r.text))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(got) == 24
    assert all(status == 200 and row == want[q] for q, status, row in got), got


# -- the CLI ---------------------------------------------------------------------------------
def test_cli_without_ray_is_one_line_exit_2(served, monkeypatch, capsys):
    _, path, _ = served
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if not installed
    assert cli.main(["serve", str(path), "--ray"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install -e '.[ray]'" in err and "Traceback" not in err


def test_cli_ray_options_need_ray(served, capsys):
    _, path, _ = served
    assert cli.main(["serve", str(path), "--replicas", "2"]) == 2
    assert "--address and --replicas are for --ray" in capsys.readouterr().err
    # an add kept in one replica's memory would be invisible to the others: refused up front
    assert cli.main(["serve", str(path), "--ray", "--replicas", "2", "--no-persist"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--no-persist" in err


def test_cli_serve_ray_subprocess(tmp_path, ray_cluster):
    ids, texts, queries = synthetic_corpus(60, seed=3)
    path = tmp_path / "index"
    build_sharded(SPEC, ids, texts=texts, encoder=HashingEncoder(), shards=2, out=path)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "RETRIEVAL_PRUNE_TOKEN": TOKEN, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    # its own local cluster (the default), so that its Serve does not meet this session's
    proc = subprocess.Popen(
        [sys.executable, "-m", "retrieval_prune.cli", "serve", str(path), "--ray",
         "--port", str(port), "--max-k", "20"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, 90, "Ray Serve", interval=0.25)
        with httpx.Client(base_url=url, timeout=60) as client:  # a busy machine: be patient
            r = client.post("/search", json={"queries": queries[:3], "k": 5})
            want = Retriever.from_index(path).retrieve_batch(queries[:3], 5)
            assert hits(r.json()["results"]) == hits(want)
            assert client.post("/search", json={"queries": ["w1"], "k": 21}).status_code == 422
            add = {"documents": [{"id": "new", "text": "w1 w2"}]}
            assert client.post("/documents", json=add).status_code == 401
            assert client.post("/documents", json=add, headers=AUTH).status_code == 201
            assert client.get("/health", headers={"Host": "evil.example"}).status_code == 421
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, err[-2000:]
    assert "through Ray Serve (1 replica(s), one Ray actor per shard)" in err and TOKEN not in err
    assert "new" in Retriever.from_index(path)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2)
