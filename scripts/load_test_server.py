#!/usr/bin/env python
"""Bounded load test of ``retrieval-prune serve`` over a small real index.

What it does (loopback only; stops by itself):

1. builds an index of the first ``--initial`` documents of a BEIR collection (default: adi,
   82 documents) with the zero-shot MiniLM encoder, in a temporary folder;
2. starts ``python -m retrieval_prune.cli serve INDEX`` on 127.0.0.1 (a free port) as a
   subprocess;
3. sends ``--requests`` requests from ``--workers`` threads: searches (1-4 real queries, random
   k), adds (1-3 documents not in the index), deletes (one live document), and on purpose
   invalid ones (malformed JSON, k=0, k over the limit, empty query, oversized batch,
   duplicate id, unknown id, wrong type, unknown path, empty document list). Each response is
   checked: status as expected, one result row per query, at most k hits, scores
   non-increasing, no repeated id, no document that was out of the index for the whole
   request;
4. at the end compares the served results for every query of the collection with (a) a fresh
   index built from the same final documents and (b) the index generation the server left
   on disk, then stops the server;
5. prints the counts and writes ``eval/results/server_load_test.json``.

Run::

    .venv/bin/python scripts/load_test_server.py            # adi, 1,200 requests, 8 threads

The exit status is 0 when there were no unexpected failures and the final comparisons agree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retrieval_prune.data import load_beir  # noqa: E402
from retrieval_prune.retrieve import Retriever  # noqa: E402

# server limits used by the test (the invalid requests go just over them)
MAX_BATCH, MAX_DOCUMENTS, MAX_K = 32, 16, 100
INVALID_KINDS = [
    "malformed_json",
    "k_zero",
    "k_too_large",
    "empty_query",
    "oversized_batch",
    "duplicate_id",
    "unknown_id",
    "wrong_type",
    "unknown_path",
    "empty_documents",
    "oversized_documents",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


class State:
    """Which document ids the client knows to be in the index (under one lock)."""

    def __init__(self, live: list[str], available: list[str], rng: random.Random):
        self.lock = threading.Lock()
        self.live, self.available = set(live), set(available)
        self.reserved: set[str] = set()
        self.uncertain: set[str] = set()  # an unexpected failure left its state unknown
        self.changes: Counter[str] = Counter()  # bumped whenever an id is reserved
        self.rng = rng

    def take(self, pool: set[str], n: int) -> list[str]:
        with self.lock:
            free = sorted(pool - self.reserved - self.uncertain)
            if len(free) < n:
                return []
            ids = self.rng.sample(free, n)
            self.reserved.update(ids)
            self.changes.update(ids)
            return ids

    def release(self, ids: list[str], now_live: bool | None) -> None:
        with self.lock:
            self.reserved.difference_update(ids)
            for i in ids:
                if now_live is None:
                    self.uncertain.add(i)
                elif now_live:
                    self.available.discard(i)
                    self.live.add(i)
                else:
                    self.live.discard(i)
                    self.available.add(i)

    def out_snapshot(self) -> dict[str, int]:
        """Ids surely out of the index now, with their change counters."""
        with self.lock:
            return {i: self.changes[i] for i in self.available - self.reserved - self.uncertain}

    def still_out(self, snap: dict[str, int], ids: list[str]) -> list[str]:
        """Those of ``ids`` that were out of the index for the whole request."""
        with self.lock:
            return [
                i for i in ids if i in snap and self.changes[i] == snap[i] and i in self.available
            ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="adi", help="BEIR folder or name under ../shared/data")
    ap.add_argument("--initial", type=int, default=60, help="documents in the index at start")
    ap.add_argument("--max-docs", type=int, default=None, help="slice of the collection")
    ap.add_argument("--pipeline", default="exact", help="pipeline spec of the index")
    ap.add_argument("--requests", type=int, default=1200)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "eval" / "results" / "server_load_test.json"))
    ap.add_argument("--keep", action="store_true", help="keep the temporary index and log")
    ap.add_argument("--tol", type=float, default=1e-4, help="score tolerance of the comparisons")
    args = ap.parse_args(argv)
    if args.requests < 1000:
        print(
            f"note: --requests {args.requests} is under the 1,000 the test is meant for",
            file=sys.stderr,
        )

    rng = random.Random(args.seed)
    t_start = time.perf_counter()
    corpus = load_beir(args.data, max_docs=args.max_docs)
    texts = dict(zip(corpus.doc_ids, corpus.doc_texts, strict=True))
    all_ids = list(corpus.doc_ids)
    initial = all_ids[: args.initial]
    queries = list(corpus.queries.values())
    if not 0 < args.initial < len(all_ids):
        raise SystemExit(f"--initial {args.initial} must be in 1..{len(all_ids) - 1}")

    from retrieval_prune.encode import Encoder

    encoder = Encoder.load()
    tmp = Path(tempfile.mkdtemp(prefix="rp-load-"))
    index_path = tmp / "index"
    t0 = time.perf_counter()
    Retriever.from_texts(
        initial, [texts[i] for i in initial], encoder, args.pipeline, path=index_path
    )
    build_s = time.perf_counter() - t0

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp / "server.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed in finally
    cmd = [
        sys.executable,
        "-m",
        "retrieval_prune.cli",
        "serve",
        str(index_path),
        "--port",
        str(port),
        "--max-batch",
        str(MAX_BATCH),
        "--max-documents",
        str(MAX_DOCUMENTS),
        "--max-k",
        str(MAX_K),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    report: dict = {}
    try:
        t0 = time.perf_counter()
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}; see {log_path}")
            if time.perf_counter() - t0 > 180:
                raise SystemExit("server did not answer /health within 180 s")
            time.sleep(0.2)
        startup_s = time.perf_counter() - t0
        report = run_load(
            args, url, rng, initial, [i for i in all_ids if i not in set(initial)], texts, queries
        )
        report["startup_s"] = round(startup_s, 2)
        report["build_s"] = round(build_s, 2)
        report["server_alive_at_end"] = proc.poll() is None
        final = report["final_live_ids"]
        report["comparison"] = compare(
            url, index_path, encoder, args.pipeline, final, texts, queries, args.tol
        )
        report["stats_at_end"] = httpx.get(f"{url}/stats", timeout=30).json()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
    report["server_exit_code_after_sigterm"] = proc.returncode
    report["server_log_tail"] = log_path.read_text(errors="replace")[-2000:]
    # uvicorn >= 0.29 re-raises SIGTERM after its graceful shutdown, hence -15
    if args.keep:
        print(f"kept the index and server log under {tmp}", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    report["total_s"] = round(time.perf_counter() - t_start, 1)
    report["config"] = {
        "data": args.data,
        "docs_in_collection": len(all_ids),
        "initial_docs": len(initial),
        "pipeline": args.pipeline,
        "encoder": encoder.settings.get("checkpoint", {}).get("name"),
        "requests": args.requests,
        "workers": args.workers,
        "seed": args.seed,
        "limits": {"max_batch": MAX_BATCH, "max_documents": MAX_DOCUMENTS, "max_k": MAX_K},
        "tolerance": args.tol,
        "command": "python scripts/load_test_server.py " + " ".join(argv or sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }
    del report["final_live_ids"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    ok = print_summary(report)
    print(f"wrote {out}")
    return 0 if ok else 1


def run_load(args, url, rng, initial, others, texts, queries) -> dict:
    state = State(initial, others, rng)
    # a fixed, seeded plan: which kind each request is
    kinds = rng.choices(
        ["search", "add", "delete", "invalid"], weights=[70, 11, 9, 10], k=args.requests
    )
    plan = []
    for n, kind in enumerate(kinds):
        plan.append(
            (
                n,
                kind,
                INVALID_KINDS[n % len(INVALID_KINDS)] if kind == "invalid" else None,
                rng.randrange(1 << 30),
            )
        )
    results: list[dict] = []
    results_lock = threading.Lock()
    local = threading.local()

    def client() -> httpx.Client:
        if not hasattr(local, "c"):
            local.c = httpx.Client(base_url=url, timeout=60)
        return local.c

    def do(item) -> None:
        n, kind, sub, seed = item
        r_rng = random.Random(seed)
        c = client()
        rec = {"n": n, "kind": kind, "sub": sub}
        problems: list[str] = []
        t0 = time.perf_counter()
        try:
            if kind == "search":
                qs = r_rng.sample(queries, r_rng.randint(1, 4))
                k = r_rng.randint(1, 20)
                snap = state.out_snapshot()
                r = c.post(
                    "/search", json={"queries": qs, "k": k, "with_text": r_rng.random() < 0.2}
                )
                rec["status"], expected = r.status_code, 200
                if r.status_code == 200:
                    rows = r.json()["results"]
                    if len(rows) != len(qs):
                        problems.append(f"{len(rows)} result rows for {len(qs)} queries")
                    for row in rows:
                        ids = [h["id"] for h in row]
                        sc = [h["score"] for h in row]
                        if len(row) > k:
                            problems.append(f"{len(row)} hits for k={k}")
                        if len(set(ids)) != len(ids):
                            problems.append(f"repeated ids {ids}")
                        if any(b > a + 1e-6 for a, b in zip(sc, sc[1:], strict=False)):
                            problems.append(f"scores not sorted {sc}")
                        if any(i not in texts for i in ids):
                            problems.append(f"unknown ids {ids}")
                        gone = state.still_out(snap, ids)
                        if gone:
                            problems.append(f"returned documents out of the index: {gone}")
            elif kind in ("add", "delete"):
                # when the pool of one side is empty, do the other mutation instead
                ids = []
                if kind == "add":
                    ids = state.take(state.available, r_rng.randint(1, 3)) or state.take(
                        state.available, 1
                    )
                    kind = "add" if ids else "delete"
                if kind == "delete" and not ids:
                    ids = state.take(state.live, 1)
                    if not ids:
                        kind, ids = "add", state.take(state.available, 1)
                if not ids:
                    rec["skipped"] = True
                    return
                rec["kind"] = kind
                if kind == "add":
                    docs = [{"id": i, "text": texts[i], "metadata": {"req": n}} for i in ids]
                    r = c.post("/documents", json={"documents": docs})
                    rec["status"], expected = r.status_code, 201
                    state.release(ids, True if r.status_code == 201 else None)
                else:
                    r = c.delete(f"/documents/{ids[0]}")
                    rec["status"], expected = r.status_code, 200
                    state.release(ids, False if r.status_code == 200 else None)
            else:
                rec["status"], expected, body = invalid(
                    c, sub, state, texts, queries[n % len(queries)], n
                )
                if rec["status"] is None:
                    rec["skipped"] = True
                    return
            rec["expected"] = expected
            if rec["status"] != expected:
                body = body if kind == "invalid" else r.text
                problems.append(f"status {rec['status']} (expected {expected}): {body[:300]}")
        except Exception as exc:  # noqa: BLE001 - every failure is counted, none stops the run
            rec["status"] = f"exception {type(exc).__name__}"
            problems.append(f"{type(exc).__name__}: {exc}")
        finally:
            rec["ms"] = (time.perf_counter() - t0) * 1e3
            rec["problems"] = problems
            with results_lock:
                results.append(rec)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(do, plan))
    wall = time.perf_counter() - t0

    sent = [r for r in results if not r.get("skipped")]
    by_kind = defaultdict(Counter)
    lat = defaultdict(list)
    for r in sent:
        key = r["kind"] if r["kind"] != "invalid" else f"invalid:{r['sub']}"
        by_kind[key][str(r["status"])] += 1
        lat[r["kind"]].append(r["ms"])
    failures = [r for r in sent if r["problems"]]
    with state.lock:
        final_live = sorted(state.live)
        uncertain = sorted(state.uncertain)
    return {
        "requests_sent": len(sent),
        "skipped_no_candidate": len(results) - len(sent),
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(sent) / wall, 1),
        "by_kind_and_status": {k: dict(v) for k, v in sorted(by_kind.items())},
        "intended_invalid": sum(1 for r in sent if r["kind"] == "invalid"),
        "invalid_answered_as_intended": sum(
            1 for r in sent if r["kind"] == "invalid" and not r["problems"]
        ),
        "unexpected_failures": len(failures),
        "failure_examples": [
            {k: r[k] for k in ("n", "kind", "sub", "status", "problems")} for r in failures[:20]
        ],
        "latency_ms": {
            k: {"p50": pct(v, 50), "p95": pct(v, 95), "p99": pct(v, 99), "n": len(v)}
            for k, v in sorted(lat.items())
        },
        "final_docs_client_view": len(final_live),
        "uncertain_ids": uncertain,
        "final_live_ids": final_live,
    }


def _st(res, expected):
    return res[0], expected, res[1]


def invalid(c, sub, state, texts, q, n):
    """Send one invalid request of kind ``sub``; returns (status, expected status, body)."""

    def post(path, **kw):
        r = c.post(path, **kw)
        return r.status_code, r.text

    if sub == "malformed_json":
        return _st(
            post(
                "/search",
                content=b'{"queries": ["x"], "k": ',
                headers={"content-type": "application/json"},
            ),
            400,
        )
    if sub == "k_zero":
        return _st(post("/search", json={"queries": [q], "k": 0}), 422)
    if sub == "k_too_large":
        return _st(post("/search", json={"queries": [q], "k": MAX_K + 1}), 422)
    if sub == "empty_query":
        return _st(post("/search", json={"queries": [q, "   "], "k": 5}), 422)
    if sub == "oversized_batch":
        return _st(post("/search", json={"queries": [q] * (MAX_BATCH + 1), "k": 5}), 413)
    if sub == "wrong_type":
        return _st(post("/search", json={"queries": q, "k": "ten"}), 422)
    if sub == "unknown_path":
        r = c.get("/no/such/endpoint")
        return r.status_code, 404, r.text
    if sub == "empty_documents":
        return _st(post("/documents", json={"documents": []}), 422)
    if sub == "oversized_documents":
        docs = [{"id": f"big-{n}-{i}", "text": "x"} for i in range(MAX_DOCUMENTS + 1)]
        return _st(post("/documents", json={"documents": docs}), 413)
    if sub == "unknown_id":
        r = c.delete(f"/documents/never-added-{n}")
        return r.status_code, 404, r.text
    if sub == "duplicate_id":
        ids = state.take(state.live, 1)  # held so no one deletes it meanwhile
        if not ids:
            return None, 409, ""
        try:
            return _st(
                post("/documents", json={"documents": [{"id": ids[0], "text": texts[ids[0]]}]}), 409
            )
        finally:
            state.release(ids, True)
    raise ValueError(sub)


def compare(url, index_path, encoder, pipeline, final_ids, texts, queries, tol) -> dict:
    """Served results vs a fresh index of the final documents and vs the on-disk generation."""
    k = 10
    served = []
    for i in range(0, len(queries), MAX_BATCH):
        r = httpx.post(
            f"{url}/search", json={"queries": queries[i : i + MAX_BATCH], "k": k}, timeout=120
        )
        r.raise_for_status()
        served += r.json()["results"]
    served = [[(h["id"], h["score"]) for h in row] for row in served]
    stats = httpx.get(f"{url}/stats", timeout=30).json()
    fresh = Retriever.from_texts(final_ids, [texts[i] for i in final_ids], encoder, pipeline)
    on_disk = Retriever.from_index(index_path, encoder=encoder)
    out = {
        "queries": len(queries),
        "k": k,
        "served_docs": stats["docs"],
        "client_docs": len(final_ids),
        "docs_agree": stats["docs"] == len(final_ids) == len(on_disk),
        "on_disk_docs": len(on_disk),
        "on_disk_generation": stats.get("generation"),
    }
    for name, other in (("fresh_index", fresh), ("on_disk_index", on_disk)):
        rows = [[(h.id, h.score) for h in row] for row in other.retrieve_batch(queries, k)]
        out[name] = agreement(served, rows, tol)
    live_set = set(final_ids)
    out["served_ids_all_live"] = all(i in live_set for row in served for i, _ in row)
    return out


def agreement(a_rows, b_rows, tol) -> dict:
    """Identical rankings, tie-tolerant matches, and the largest score difference."""
    identical = tie_ok = 0
    max_diff = 0.0
    bad = []
    for qi, (a, b) in enumerate(zip(a_rows, b_rows, strict=True)):
        ids_a, ids_b = [i for i, _ in a], [i for i, _ in b]
        sa, sb = np.array([s for _, s in a]), np.array([s for _, s in b])
        if len(sa) == len(sb) and len(sa):
            max_diff = max(max_diff, float(np.abs(sa - sb).max()))
        if ids_a == ids_b:
            identical += 1
            tie_ok += 1
            continue
        # differences allowed only among documents whose scores tie within tol
        same_scores = len(sa) == len(sb) and bool(np.all(np.abs(sa - sb) <= tol))
        sb_map = dict(b)
        sa_map = dict(a)
        swapped = set(ids_a) ^ set(ids_b)
        edge = min(sa[-1], sb[-1]) if len(sa) and len(sb) else 0.0
        only_at_edge = all(abs(sa_map.get(i, sb_map.get(i, np.inf)) - edge) <= tol for i in swapped)
        if same_scores and only_at_edge:
            tie_ok += 1
        else:
            bad.append({"query": qi, "a": a[:5], "b": b[:5]})
    return {
        "identical_rankings": identical,
        "tie_tolerant_matches": tie_ok,
        "queries": len(a_rows),
        "max_abs_score_diff": max_diff,
        "mismatch_examples": bad[:3],
        "agree": tie_ok == len(a_rows),
    }


def print_summary(rep: dict) -> bool:
    cmp_ = rep.get("comparison", {})
    print(
        f"requests sent: {rep['requests_sent']} in {rep['wall_s']} s "
        f"({rep['requests_per_s']} req/s, {rep['config']['workers']} threads); "
        f"server start {rep['startup_s']} s"
    )
    for kind, counts in rep["by_kind_and_status"].items():
        print(f"  {kind:28s} {counts}")
    print(
        f"intended invalid: {rep['intended_invalid']}, answered with the intended 4xx: "
        f"{rep['invalid_answered_as_intended']}"
    )
    print(f"unexpected failures: {rep['unexpected_failures']}")
    for f in rep["failure_examples"][:5]:
        print(f"   {f}")
    for kind, lt in rep["latency_ms"].items():
        print(
            f"  latency {kind:8s} p50 {lt['p50']} ms  p95 {lt['p95']} ms  p99 {lt['p99']} ms  (n={lt['n']})"
        )
    print(
        f"server alive at end: {rep['server_alive_at_end']}; final docs: served "
        f"{cmp_.get('served_docs')}, client {cmp_.get('client_docs')}, on disk {cmp_.get('on_disk_docs')}"
    )
    for name in ("fresh_index", "on_disk_index"):
        c = cmp_.get(name, {})
        print(
            f"served vs {name}: {c.get('identical_rankings')}/{c.get('queries')} identical top-10, "
            f"{c.get('tie_tolerant_matches')} tie-tolerant, max |score diff| "
            f"{c.get('max_abs_score_diff', float('nan')):.2e}"
        )
    ok = (
        rep["unexpected_failures"] == 0
        and rep["server_alive_at_end"]
        and cmp_.get("docs_agree")
        and cmp_.get("served_ids_all_live")
        and cmp_.get("fresh_index", {}).get("agree")
        and cmp_.get("on_disk_index", {}).get("agree")
        and not rep["uncertain_ids"]
    )
    print("RESULT:", "PASS" if ok else "FAIL")
    return bool(ok)


if __name__ == "__main__":
    sys.exit(main())
