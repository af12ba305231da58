"""HTTP server: a real uvicorn server on 127.0.0.1 (free port, background thread), httpx.

Every endpoint, every kind of bad request, persistence of adds/deletes, and searches
running while documents are added and deleted. The index uses the model-free
HashingEncoder (labelled synthetic text) so the whole file runs in seconds.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from retrieval_prune.index import storage  # noqa: E402
from retrieval_prune.retrieve import HashingEncoder, Retriever  # noqa: E402
from retrieval_prune.retrieve.server import create_app  # noqa: E402

DOCS = {
    "apple": "red apples grow on apple trees in the orchard",
    "pear": "green pears ripen slowly after the harvest",
    "car": "the electric car charges its battery overnight",
    "boat": "a sailing boat crosses the windy harbour",
    "bread": "fresh bread comes out of the bakery oven",
    "jazz": "jazz musicians improvise over a walking bass",
}
LIMITS = {"max_batch": 8, "max_documents": 5, "max_k": 50}


class ServerThread:
    """uvicorn serving ``app`` on an already-bound loopback socket, in a daemon thread."""

    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="critical"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = tmp_path_factory.mktemp("srv") / "index"
    ids = list(DOCS)
    Retriever.from_texts(
        ids,
        [DOCS[i] for i in ids],
        HashingEncoder(dim=32),
        "exact",
        [{"kind": "seed"}] * len(ids),
        path=path,
    )
    retriever = Retriever.from_index(path)
    app = create_app(retriever, **LIMITS)
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=20) as client:
        yield client, retriever, path


def search(client, queries, k=3, **kw):
    return client.post("/search", json={"queries": queries, "k": k, **kw})


# -- endpoints ---------------------------------------------------------------------------
def test_health_and_stats(served):
    client, retriever, _ = served
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["docs"] >= 1
    s = client.get("/stats").json()
    for key in (
        "docs",
        "vectors",
        "bytes",
        "pipeline",
        "encoder",
        "dim",
        "generation",
        "disk_bytes",
        "limits",
    ):
        assert key in s, key
    assert s["pipeline"] == "flat" and s["encoder"]["mode"] == "hashing"
    assert s["limits"]["max_batch"] == LIMITS["max_batch"] and s["bytes"] > 0


def test_search_answers_ids_and_scores_like_the_python_api(served):
    client, retriever, _ = served
    qs = ["apple orchard", "sailing boat", "jazz"]
    r = search(client, qs, k=3)
    assert r.status_code == 200
    results = r.json()["results"]
    assert len(results) == 3 and all(len(row) == 3 for row in results)
    assert set(results[0][0]) == {"id", "score"}
    assert [row[0]["id"] for row in results] == ["apple", "boat", "jazz"]
    py = retriever.retrieve_batch(qs, k=3)
    assert [[h["id"] for h in row] for row in results] == [[h.id for h in row] for row in py]
    assert [[h["score"] for h in row] for row in results] == [[h.score for h in row] for row in py]
    withtext = search(client, ["fresh bread"], k=1, with_text=True).json()["results"][0][0]
    assert withtext == {
        "id": "bread",
        "score": withtext["score"],
        "text": DOCS["bread"],
        "metadata": {"kind": "seed"},
    }
    assert len(search(client, ["bread"], k=50).json()["results"][0]) == len(retriever)


def test_add_get_delete_persist_a_generation_each(served):
    client, retriever, path = served
    gen0 = storage.current_generation(path).name
    r = client.post(
        "/documents",
        json={
            "documents": [
                {"id": "plum", "text": "purple plums in a bowl", "metadata": {"colour": "purple"}},
                {"id": "blank", "text": ""},
            ]
        },
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["added"] == 2 and body["ids"] == ["plum", "blank"] and body["generation"] > gen0
    assert storage.current_generation(path).name == body["generation"]
    top = search(client, ["purple plums"], k=1, with_text=True).json()["results"][0][0]
    assert top["id"] == "plum" and top["metadata"] == {"colour": "purple"}
    assert client.get("/documents/plum").json() == {
        "id": "plum",
        "text": "purple plums in a bowl",
        "metadata": {"colour": "purple"},
    }
    # what is on disk is what is served
    on_disk = Retriever.from_index(path)
    assert "plum" in on_disk and on_disk.get("plum").metadata == {"colour": "purple"}
    r = client.delete("/documents/plum")
    assert r.status_code == 200 and r.json()["deleted"] == "plum"
    assert r.json()["generation"] > body["generation"]
    assert "plum" not in Retriever.from_index(path)
    assert "plum" not in [
        h["id"] for h in search(client, ["purple plums"], k=50).json()["results"][0]
    ]
    assert client.delete("/documents/blank").status_code == 200
    assert client.get("/documents/plum").status_code == 404


# -- bad requests: clear 4xx, server stays up --------------------------------------------
BAD_SEARCHES = [
    # (body or raw bytes, status, words expected in the message)
    (b"{not json", 400, "not valid JSON"),
    (b"", 400, "body is missing"),
    (b"[1, 2]", 400, "JSON object"),
    ({"queries": ["a"], "k": 0}, 422, "k=0 must be >= 1"),
    ({"queries": ["a"], "k": -3}, 422, "k=-3"),
    ({"queries": ["a"], "k": 51}, 422, "limit of 50"),
    ({"queries": ["a"], "k": "10"}, 422, "k: Input should be a valid integer"),
    ({"queries": ["a"], "k": 2.5}, 422, "k:"),
    ({"queries": []}, 422, "queries is empty"),
    ({"queries": ["ok", "   "]}, 422, "queries[1] is empty"),
    ({"queries": "a string"}, 422, "queries: Input should be a valid list"),
    ({"queries": ["a", 3]}, 422, "queries[1]: Input should be a valid string"),
    ({"query": ["a"]}, 422, "queries: Field required"),
    ({"queries": ["q"] * 9}, 413, "at most 8"),
    ({"queries": ["a"], "with_text": "yes"}, 422, "with_text"),
]


@pytest.mark.parametrize(
    "body,status,words", BAD_SEARCHES, ids=[f"{i}-{s}" for i, (_, s, _) in enumerate(BAD_SEARCHES)]
)
def test_bad_search_requests(served, body, status, words):
    client, _, _ = served
    if isinstance(body, bytes):
        r = client.post("/search", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/search", json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"], r.json()


def test_bad_document_requests(served):
    client, retriever, path = served
    n0, gen0 = len(retriever), storage.current_generation(path).name

    def add(docs):
        return client.post("/documents", json={"documents": docs})

    cases = [
        (add([{"id": "apple", "text": "again"}]), 409, "'apple' is already in the index"),
        (add([{"id": "x1", "text": "a"}, {"id": "x1", "text": "b"}]), 409, "twice"),
        (add([]), 422, "documents is empty"),
        (add([{"id": f"n{i}", "text": "t"} for i in range(6)]), 413, "at most 5"),
        (add([{"id": "", "text": "t"}]), 422, "documents[0].id is empty"),
        (add([{"id": "x2"}]), 422, "documents[0].text: Field required"),
        (add([{"id": 7, "text": "t"}]), 422, "documents[0].id: Input should be a valid string"),
        (add([{"id": "x3", "text": "t", "metadata": "m"}]), 422, "metadata"),
        (
            client.post(
                "/documents",
                content=b'{"documents": [{"id": "x4", "text": "t", "metadata": {"v": NaN}}]}',
                headers={"content-type": "application/json"},
            ),
            422,
            "JSON",
        ),
        (client.post("/documents", json={"docs": []}), 422, "documents: Field required"),
        (client.delete("/documents/nope"), 404, "unknown document id 'nope'"),
        (client.get("/documents/nope"), 404, "unknown document id"),
        (client.get("/nowhere"), 404, "no endpoint GET /nowhere"),
        (client.put("/search", json={}), 405, "Method Not Allowed"),
    ]
    for r, status, words in cases:
        assert r.status_code == status, (status, r.text)
        assert words in r.json()["error"], r.json()
    assert len(retriever) == n0 and storage.current_generation(path).name == gen0
    assert client.get("/health").status_code == 200  # still serving
    assert client.get("/stats").json()["requests"]["errors"] >= len(cases)


def test_an_internal_error_is_a_500_and_the_server_goes_on(served, monkeypatch):
    client, retriever, _ = served

    def broken(*a, **kw):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(retriever, "retrieve_batch", broken)
    r = search(client, ["jazz"])
    assert r.status_code == 500 and "RuntimeError: disk on fire" in r.json()["error"]
    monkeypatch.undo()
    assert search(client, ["jazz"]).status_code == 200


def test_concurrent_searches_while_adding_and_deleting(served):
    client, retriever, _ = served
    url = str(client.base_url)
    n0 = len(retriever)
    errors: list[str] = []
    done = threading.Event()

    def searcher():
        with httpx.Client(base_url=url, timeout=20) as c:
            while not done.is_set():
                r = c.post("/search", json={"queries": ["jazz bass", "electric car"], "k": 2})
                if r.status_code != 200:
                    errors.append(r.text)
                    continue
                res = r.json()["results"]
                if [row[0]["id"] for row in res] != ["jazz", "car"]:
                    errors.append(f"unexpected ranking {res}")

    def writer(tag):
        with httpx.Client(base_url=url, timeout=20) as c:
            for i in range(8):
                r = c.post(
                    "/documents",
                    json={"documents": [{"id": f"{tag}{i}", "text": f"note {tag} {i}"}]},
                )
                if r.status_code != 201:
                    errors.append(r.text)
                r = c.delete(f"/documents/{tag}{i}")
                if r.status_code != 200:
                    errors.append(r.text)

    searchers = [threading.Thread(target=searcher) for _ in range(3)]
    writers = [threading.Thread(target=writer, args=(t,)) for t in ("w", "v")]
    for t in searchers + writers:
        t.start()
    for t in writers:
        t.join(60)
    done.set()
    for t in searchers:
        t.join(60)
    assert not errors, errors[:3]
    assert len(retriever) == n0
    assert client.get("/health").json()["docs"] == n0


# -- the CLI -------------------------------------------------------------------------------
def test_cli_imports_no_server_dependency():
    code = (
        "import sys, retrieval_prune.cli as c; c.build_parser(); "
        "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'langchain_core') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_subprocess(tmp_path):
    path = tmp_path / "index"
    Retriever.from_texts(list(DOCS), list(DOCS.values()), HashingEncoder(dim=16), path=path)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "retrieval_prune.cli",
            "serve",
            str(path),
            "--port",
            str(port),
            "--max-batch",
            "4",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.1)
        r = httpx.post(f"{url}/search", json={"queries": ["sailing"], "k": 1})
        assert r.json()["results"][0][0]["id"] == "boat"
        assert httpx.post(f"{url}/search", json={"queries": ["a"] * 5}).status_code == 413
        assert (
            httpx.post(
                f"{url}/documents", json={"documents": [{"id": "z", "text": "zebra"}]}
            ).status_code
            == 201
        )
        assert json.loads(httpx.get(f"{url}/stats").text)["docs"] == len(DOCS) + 1
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(20)
    assert "z" in Retriever.from_index(path)  # the add was persisted by the CLI server
