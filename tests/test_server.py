"""HTTP server: a real uvicorn server on 127.0.0.1 (free port, background thread), httpx.

Every endpoint, every kind of bad request, persistence of adds/deletes, and searches
running while documents are added and deleted; the bearer token, the Host allow-list,
error bodies free of paths and tracebacks, a failed save rolled back, lone surrogates and
deep nesting. The index uses the model-free HashingEncoder (labelled synthetic text) so
the whole file runs in seconds.
"""

import argparse
import contextlib
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
from retrieval_prune.retrieve.server import (  # noqa: E402
    add_serve_parser,
    create_app,
    read_token,
    startup_warnings,
)
from tests.conftest import wait_healthy  # noqa: E402

DOCS = {
    "apple": "red apples grow on apple trees in the orchard",
    "pear": "green pears ripen slowly after the harvest",
    "car": "the electric car charges its battery overnight",
    "boat": "a sailing boat crosses the windy harbour",
    "bread": "fresh bread comes out of the bakery oven",
    "jazz": "jazz musicians improvise over a walking bass",
}
LIMITS = {"max_batch": 8, "max_documents": 5, "max_k": 50}
TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


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
    app = create_app(retriever, token=TOKEN, **LIMITS)
    with (
        ServerThread(app) as srv,
        httpx.Client(base_url=srv.url, timeout=20, headers=AUTH) as client,
    ):
        yield client, retriever, path


def build_index(path, dim=32):
    ids = list(DOCS)
    Retriever.from_texts(ids, [DOCS[i] for i in ids], HashingEncoder(dim=dim), "exact", path=path)
    return path


@contextlib.contextmanager
def serving(retriever, headers=None, **kw):
    """A client (without the token unless ``headers`` has it) of a fresh server."""
    with (
        ServerThread(create_app(retriever, **kw)) as srv,
        httpx.Client(base_url=srv.url, timeout=20, headers=headers) as client,
    ):
        yield client


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
    assert r.status_code == 500, r.text
    assert r.json()["error"] == "internal error (RuntimeError); see the server log"
    monkeypatch.undo()
    assert search(client, ["jazz"]).status_code == 200


# -- the bearer token ----------------------------------------------------------------------
def test_adds_and_deletes_need_the_bearer_token(served):
    client, retriever, path = served
    n0, gen0 = len(retriever), storage.current_generation(path).name
    with httpx.Client(base_url=str(client.base_url), timeout=20) as anon:
        add = {"documents": [{"id": "intruder", "text": "should not land"}]}
        r = anon.post("/documents", json=add)
        assert r.status_code == 401, r.text
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert "Authorization: Bearer" in r.json()["error"]
        for bad in ("Basic dTpw", "Bearer", "Bearer a\tb", "Token " + TOKEN, f"Bearer {TOKEN} x"):
            r = anon.post("/documents", json=add, headers={"Authorization": bad})
            assert r.status_code == 401, (bad, r.text)
            assert r.headers["www-authenticate"].startswith("Bearer")
        for wrong in ("Bearer nope", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}"):
            r = anon.post("/documents", json=add, headers={"Authorization": wrong})
            assert r.status_code == 403 and r.json()["error"] == "wrong bearer token", r.text
        # the scheme is case-insensitive
        r = anon.post("/documents", json=add, headers={"Authorization": f"bearer {TOKEN}"})
        assert r.status_code == 201, r.text
        assert anon.delete("/documents/intruder").status_code == 401
        assert anon.delete("/documents/intruder", headers=AUTH).status_code == 200
        # checked before the body is read: invalid bodies get 401/403, not 400/422
        for body in (b"{not json", b"", b"[" * 100_000, b'{"documents": 3}'):
            r = anon.post("/documents", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 401, (body[:10], r.text)
            r = anon.post(
                "/documents",
                content=body,
                headers={"content-type": "application/json", "Authorization": "Bearer no"},
            )
            assert r.status_code == 403, (body[:10], r.text)
        assert anon.delete("/documents/no-such-id").status_code == 401
        # reading needs no token
        assert anon.get("/health").status_code == 200
        assert anon.get("/stats").json()["mutation"] == "bearer token"
        assert anon.get("/documents/apple").status_code == 200
        assert search(anon, ["apple"]).status_code == 200
    assert len(retriever) == n0 and "intruder" not in retriever
    assert storage.current_generation(path).name > gen0  # the authorised add and delete


def test_without_a_token_the_server_is_read_only():
    retriever = Retriever.from_texts(list(DOCS), list(DOCS.values()), HashingEncoder(dim=16))
    with serving(retriever, headers=AUTH) as client:  # sending a token changes nothing
        r = client.post("/documents", json={"documents": [{"id": "x", "text": "t"}]})
        assert r.status_code == 403, r.text
        assert r.json()["error"].endswith(
            "mutation is disabled: start the server with --token-file or RETRIEVAL_PRUNE_TOKEN"
        )
        assert client.delete("/documents/apple").status_code == 403
        assert client.get("/documents/apple").status_code == 200
        assert search(client, ["sailing boat"], k=1).json()["results"][0][0]["id"] == "boat"
        assert client.get("/stats").json()["mutation"] == "disabled"
    assert len(retriever) == len(DOCS)


def test_create_app_refuses_a_bad_token_or_host():
    retriever = Retriever.from_texts(["a"], ["apples"], HashingEncoder(dim=16))
    for bad in ("", "two words", "tab\there", "caf\u00e9"):
        with pytest.raises(ValueError):
            create_app(retriever, token=bad)
    with pytest.raises(ValueError, match="allowed host"):
        create_app(retriever, allowed_hosts=["http://x/"])
    with pytest.raises(TypeError):
        create_app(retriever, allowed_hosts="localhost")


# -- the Host allow-list -------------------------------------------------------------------
def test_host_header_allow_list(served):
    client, _, _ = served
    port = client.base_url.port
    for host in (
        "127.0.0.1",
        f"127.0.0.1:{port}",
        "localhost",
        "LOCALHOST:1",
        "localhost.",
        "[::1]",
        "[::1]:8000",
        "[0:0::1]",
    ):
        r = client.get("/health", headers={"Host": host})
        assert r.status_code == 200, (host, r.text)
    for host in (
        "evil.example.com",
        f"evil.example.com:{port}",
        "127.0.0.1.evil.example.com",
        "localhost.evil.example.com",
        "10.0.0.1",
        "[::2]",
        "",
        "a b",
    ):
        for method, url in (("GET", "/health"), ("POST", "/search"), ("POST", "/documents")):
            r = client.request(method, url, json={"queries": ["a"]}, headers={"Host": host})
            assert r.status_code == 421, (host, method, url, r.text)
    r = client.get("/health", headers={"Host": "Evil.Example.com:80"})
    assert r.json()["error"].startswith("Host 'evil.example.com' is not served here; ")
    assert "--allowed-host" in r.json()["error"]


def test_allowed_hosts_option():
    retriever = Retriever.from_texts(list(DOCS), list(DOCS.values()), HashingEncoder(dim=16))
    with serving(retriever, allowed_hosts=["Search.Internal", "10.0.0.5", "[fd00::1]"]) as c:
        for host in ("search.internal:8000", "10.0.0.5", "[fd00::1]:80", "localhost"):
            assert c.get("/health", headers={"Host": host}).status_code == 200, host
        assert c.get("/health", headers={"Host": "other.internal"}).status_code == 421
        assert "search.internal" in c.get("/stats").json()["allowed_hosts"]
    with serving(retriever, allowed_hosts=["*"]) as c:
        assert c.get("/health", headers={"Host": "anything.example"}).status_code == 200


# -- error bodies: no paths, no tracebacks ---------------------------------------------------
def _assert_clean(r, path):
    text = r.text
    for leak in (str(path), str(path.resolve()), "/tmp", "Traceback", 'File "'):
        assert leak not in text, (r.status_code, leak, text)


def test_no_error_body_holds_a_path_or_a_traceback(tmp_path, monkeypatch):
    path = build_index(tmp_path / "ix")
    retriever = Retriever.from_index(path)
    gen0 = storage.current_generation(path).name
    json_h = {"content-type": "application/json"}
    seen: dict[int, int] = {}
    with serving(retriever, headers=AUTH, token=TOKEN, **LIMITS) as client:

        def check(r, status, words=""):
            assert r.status_code == status, (status, r.text)
            assert words in r.json()["error"], r.json()
            _assert_clean(r, path)
            seen[status] = seen.get(status, 0) + 1

        check(client.post("/search", content=b"{not json", headers=json_h), 400, "not valid JSON")
        check(client.post("/search", content=b"", headers=json_h), 400, "body is missing")
        check(client.post("/search", content=b"[" * 100_000, headers=json_h), 400, "nested")
        surrogate = b'{"queries": ["\\ud800"]}'
        check(client.post("/search", content=surrogate, headers=json_h), 400, "queries[0]")
        check(client.get("/nowhere"), 404, "no endpoint GET /nowhere")
        check(client.get("/documents/nope"), 404, "unknown document id")
        check(client.delete("/documents/nope"), 404, "unknown document id")
        dup = {"documents": [{"id": "apple", "text": "again"}]}
        check(client.post("/documents", json=dup), 409, "already in the index")
        many = {"documents": [{"id": f"n{i}", "text": "t"} for i in range(6)]}
        check(client.post("/documents", json=many), 413, "at most 5")
        check(client.post("/search", json={"queries": ["a"], "k": "x"}), 422, "k:")
        check(client.post("/documents", json=dup, headers={"Authorization": "x"}), 401)
        check(client.post("/documents", json=dup, headers={"Authorization": "Bearer x"}), 403)
        check(client.get("/health", headers={"Host": "evil.example.com"}), 421)
        # an exception whose message holds the index's absolute path: type name only
        with monkeypatch.context() as m:

            def broken(*a, **kw):
                raise RuntimeError(f"cannot read {path}/gen-000001/manifest.json")

            m.setattr(retriever, "retrieve_batch", broken)
            r = client.post("/search", json={"queries": ["jazz"]})
            check(r, 500, "internal error (RuntimeError); see the server log")
            # a known error whose message holds paths: scrubbed, not dropped
            m.setattr(
                retriever,
                "get",
                lambda doc_id: (_ for _ in ()).throw(
                    storage_unknown(f"{path}/gen-000001/ids.json and /etc/secret/x.key")
                ),
            )
            check(client.get("/documents/apple"), 404, "<index>/gen-000001/ids.json and x.key")
        # a failed save: 5xx, the add NOT applied, no path
        with monkeypatch.context() as m:

            def no_space(*a, **kw):
                raise OSError(28, "No space left on device", f"{path}/.tmp-gen-000002/v.npy")

            m.setattr(storage, "write_generation", no_space)
            r = client.post("/documents", json={"documents": [{"id": "plum", "text": "plums"}]})
            check(r, 500, "NOT applied")
            assert "No space left on device" in r.json()["error"]
        stats = client.get("/stats")
        _assert_clean(stats, path)
        assert stats.json()["path"] == "ix"
    assert {400, 401, 403, 404, 409, 413, 421, 422, 500} <= set(seen)
    assert storage.current_generation(path).name == gen0  # nothing above changed the index


def storage_unknown(message):
    from retrieval_prune.retrieve.retriever import UnknownIdError

    return UnknownIdError(message)


# -- a failed save rolls back ------------------------------------------------------------------
def test_a_failed_save_rolls_the_change_back(tmp_path, monkeypatch):
    path = build_index(tmp_path / "ix")
    retriever = Retriever.from_index(path)
    gen0 = storage.current_generation(path).name
    files0 = sorted(p.name for p in path.iterdir())

    def no_space(*a, **kw):
        raise OSError(28, "No space left on device", f"{path}/.tmp-gen-000002/vectors.npy")

    with serving(retriever, headers=AUTH, token=TOKEN) as client:
        with monkeypatch.context() as m:
            m.setattr(storage, "write_generation", no_space)
            r = client.post(
                "/documents",
                json={"documents": [{"id": "plum", "text": "purple plums", "metadata": {"a": 1}}]},
            )
            assert 500 <= r.status_code < 600, r.text
            msg = r.json()["error"]
            assert "NOT applied" in msg and "<index>" in msg and str(tmp_path) not in msg
            assert client.get("/documents/plum").status_code == 404
            hits = search(client, ["purple plums"], k=50).json()["results"][0]
            assert "plum" not in [h["id"] for h in hits]
            assert len(hits) == len(DOCS)
            # a delete whose save fails keeps the document
            r = client.delete("/documents/jazz")
            assert 500 <= r.status_code < 600 and "NOT applied" in r.json()["error"], r.text
            assert client.get("/documents/jazz").status_code == 200
            assert client.get("/stats").json()["saved"] is True  # memory equals disk
        assert storage.current_generation(path).name == gen0
        assert sorted(p.name for p in path.iterdir()) == files0
        on_disk = Retriever.from_index(path)
        assert "plum" not in on_disk and "jazz" in on_disk
        # the server goes on: the same add succeeds once saving works again
        r = client.post("/documents", json={"documents": [{"id": "plum", "text": "purple plums"}]})
        assert r.status_code == 201 and r.json()["generation"] > gen0, r.text
        assert "plum" in Retriever.from_index(path)


def test_a_locked_index_answers_503(tmp_path, monkeypatch):
    path = build_index(tmp_path / "ix")
    retriever = Retriever.from_index(path)
    monkeypatch.setenv("RETRIEVAL_PRUNE_LOCK_TIMEOUT", "0.3")
    holding, release = threading.Event(), threading.Event()

    def other_writer():
        with storage.write_lock(path):
            holding.set()
            release.wait(30)

    with serving(retriever, headers=AUTH, token=TOKEN) as client:
        t = threading.Thread(target=other_writer)
        t.start()
        try:
            assert holding.wait(10)
            r = client.post("/documents", json={"documents": [{"id": "kiwi", "text": "kiwis"}]})
            assert r.status_code == 503, r.text
            msg = r.json()["error"]
            assert "write lock" in msg and "NOT applied" in msg and "retry" in msg
            _assert_clean(r, path)
            assert "retry-after" in r.headers
            assert client.delete("/documents/apple").status_code == 503
            assert client.get("/documents/kiwi").status_code == 404
            assert client.get("/documents/apple").status_code == 200
        finally:
            release.set()
            t.join(10)
        r = client.post("/documents", json={"documents": [{"id": "kiwi", "text": "kiwis"}]})
        assert r.status_code == 201, r.text


def test_a_commit_by_another_process_is_merged_not_lost(tmp_path):
    path = build_index(tmp_path / "ix")
    retriever = Retriever.from_index(path)
    with serving(retriever, headers=AUTH, token=TOKEN) as client:
        other = Retriever.from_index(path)  # another writer (a CLI `add`, say)
        with other.transaction():
            other.add(["cli-doc"], ["added by the command line"])
        r = client.post("/documents", json={"documents": [{"id": "web-doc", "text": "via http"}]})
        assert r.status_code == 201, r.text
        on_disk = Retriever.from_index(path)
        assert "cli-doc" in on_disk and "web-doc" in on_disk
        assert client.get("/documents/cli-doc").status_code == 200


# -- strings that cannot be encoded, deep nesting --------------------------------------------
SURROGATES = [
    # (url, raw JSON body, field named in the message)
    ("/search", '{"queries": ["ok", "a\\ud800b"]}', "queries[1]"),
    ("/documents", '{"documents": [{"id": "\\ud800", "text": "t"}]}', "documents[0].id"),
    ("/documents", '{"documents": [{"id": "s1", "text": "x\\udfff"}]}', "documents[0].text"),
    (
        "/documents",
        '{"documents": [{"id": "s2", "text": "t", "metadata": {"k\\udc00": 1}}]}',
        "documents[0].metadata has a key",
    ),
    (
        "/documents",
        '{"documents": [{"id": "s3", "text": "t", "metadata": {"a": [1, {"b": "\\ud834"}]}}]}',
        "documents[0].metadata.a[1].b",
    ),
    ("/documents", '{"documents": [{"id": "\\ud800"}]}', "documents[0].id"),  # also invalid
    ("/search", '{"queries": ["a"], "\\ud800": 1}', "key holding a lone surrogate"),
]


@pytest.mark.parametrize("url,body,field", SURROGATES, ids=[f for _, _, f in SURROGATES])
def test_lone_surrogates_answer_400_naming_the_field(served, url, body, field):
    client, retriever, path = served
    n0, gen0 = len(retriever), storage.current_generation(path).name
    r = client.post(url, content=body.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert field in r.json()["error"] and "lone surrogate" in r.json()["error"]
    assert len(retriever) == n0 and storage.current_generation(path).name == gen0


def test_path_ids_that_are_not_utf8_are_not_a_500(served):
    client, _, _ = served
    for raw in ("%ED%A0%80", "%FF", "%C3"):  # CESU-8 surrogate, invalid UTF-8
        assert client.get(f"/documents/{raw}").status_code == 404
        assert client.delete(f"/documents/{raw}").status_code == 404


def test_deep_nesting_is_400_and_deep_metadata_422(served):
    client, retriever, path = served
    json_h = {"content-type": "application/json"}
    for url in ("/search", "/documents"):
        for body in (b"[" * 100_000, b"{" * 100_000, b'{"a":' * 50_000):
            r = client.post(url, content=body, headers=json_h)
            assert r.status_code == 400, (url, r.text)
            assert "nested too deeply" in r.json()["error"] or "JSON" in r.json()["error"]
    r = client.post(
        "/documents",
        content=b'{"documents": [' + b"[" * 100_000 + b"]}",
        headers=json_h,
    )
    assert r.status_code == 400, r.text

    def nested(levels):
        m: dict = {}
        for _ in range(levels - 1):
            m = {"n": m}
        return m

    r = client.post(
        "/documents", json={"documents": [{"id": "deep", "text": "t", "metadata": nested(33)}]}
    )
    assert r.status_code == 422 and "documents[0].metadata is nested 33 levels" in r.text
    r = client.post(
        "/documents", json={"documents": [{"id": "deep", "text": "t", "metadata": nested(32)}]}
    )
    assert r.status_code == 201, r.text
    assert Retriever.from_index(path).get("deep").metadata == nested(32)
    assert client.delete("/documents/deep").status_code == 200


def test_concurrent_searches_while_adding_and_deleting(served):
    client, retriever, _ = served
    url = str(client.base_url)
    n0 = len(retriever)
    errors: list[str] = []
    done = threading.Event()

    def searcher():
        with httpx.Client(base_url=url, timeout=20, headers=AUTH) as c:
            while not done.is_set():
                r = c.post("/search", json={"queries": ["jazz bass", "electric car"], "k": 2})
                if r.status_code != 200:
                    errors.append(r.text)
                    continue
                res = r.json()["results"]
                if [row[0]["id"] for row in res] != ["jazz", "car"]:
                    errors.append(f"unexpected ranking {res}")

    def writer(tag):
        with httpx.Client(base_url=url, timeout=20, headers=AUTH) as c:
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
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("RETRIEVAL_PRUNE_TOKEN", None)
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
            "--token-file",
            str(token_file),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, 30)
        r = httpx.post(f"{url}/search", json={"queries": ["sailing"], "k": 1})
        assert r.json()["results"][0][0]["id"] == "boat"
        assert httpx.post(f"{url}/search", json={"queries": ["a"] * 5}).status_code == 413
        add = {"documents": [{"id": "z", "text": "zebra"}]}
        assert httpx.post(f"{url}/documents", json=add).status_code == 401  # no token
        assert httpx.post(f"{url}/documents", json=add, headers=AUTH).status_code == 201
        assert json.loads(httpx.get(f"{url}/stats").text)["docs"] == len(DOCS) + 1
        r = httpx.get(f"{url}/health", headers={"Host": "rebound.example.com"})
        assert r.status_code == 421
        assert httpx.get(f"http://localhost:{port}/health").status_code == 200
        assert proc.poll() is None
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert "z" in Retriever.from_index(path)  # the add was persisted by the CLI server
    assert "adds/deletes need the bearer token" in err and TOKEN not in err


def _serve_cli(argv, capsys):
    """``retrieval-prune serve ARGV`` in-process: (exit status, stderr)."""
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", *argv])
    rc = args.func(args)
    return rc, capsys.readouterr().err


def test_cli_serve_refuses_a_bad_token_or_host(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RETRIEVAL_PRUNE_TOKEN", raising=False)
    missing = tmp_path / "no-such-token"
    rc, err = _serve_cli([str(tmp_path / "ix"), "--token-file", str(missing)], capsys)
    assert rc == 2 and "--token-file" in err and "not a readable file" in err
    rc, err = _serve_cli([str(tmp_path / "ix"), "--token-file", str(tmp_path)], capsys)
    assert rc == 2 and "not a readable file" in err  # a folder
    empty = tmp_path / "empty"
    empty.write_text("\n")
    rc, err = _serve_cli([str(tmp_path / "ix"), "--token-file", str(empty)], capsys)
    assert rc == 2 and "is empty" in err
    spaced = tmp_path / "spaced"
    spaced.write_text("two words\n")
    rc, err = _serve_cli([str(tmp_path / "ix"), "--token-file", str(spaced)], capsys)
    assert rc == 2 and "visible ASCII" in err and "two words" not in err
    monkeypatch.setenv("RETRIEVAL_PRUNE_TOKEN", "")
    rc, err = _serve_cli([str(tmp_path / "ix")], capsys)
    assert rc == 2 and "RETRIEVAL_PRUNE_TOKEN is empty" in err
    monkeypatch.delenv("RETRIEVAL_PRUNE_TOKEN")
    rc, err = _serve_cli([str(tmp_path / "ix"), "--allowed-host", "a/b"], capsys)
    assert rc == 2 and "allowed host 'a/b'" in err
    assert not (tmp_path / "ix").exists()  # refused before anything was opened


def test_read_token_sources(tmp_path):
    f = tmp_path / "tok"
    f.write_text("from-file\r\n")
    env = {"RETRIEVAL_PRUNE_TOKEN": "from-env"}
    assert read_token(str(f), env) == "from-file"  # the file wins
    assert read_token(None, env) == "from-env"
    assert read_token(None, {"RETRIEVAL_PRUNE_TOKEN": "abc\n"}) == "abc"
    assert read_token(None, {}) is None


def test_serve_warnings_mention_the_token_and_hosts():
    w = " ".join(startup_warnings("0.0.0.0", None, [], None))
    assert "not loopback" in w and "read-only" in w and "--allowed-host" in w
    w = " ".join(startup_warnings("0.0.0.0", "x" * 32, ["search.internal"], None))
    assert "bearer token" in w and "clear text" in w and "wildcard" not in w
    assert startup_warnings("127.0.0.1", "x" * 32, [], None) == []
    assert "DNS rebinding" in " ".join(startup_warnings("127.0.0.1", None, ["*"], None))
    assert "characters" in " ".join(startup_warnings("127.0.0.1", "short", [], None))
