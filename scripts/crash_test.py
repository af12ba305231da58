#!/usr/bin/env python
"""Crash and corruption test of the index format (issue #5, item 5).

Crash phase: a child process opens an index and runs one mutation -- ``build`` (rebuild
into the same folder), ``build_fresh`` (build into a new folder), ``add``, ``delete`` or
``compact`` -- and saves; the parent kills it with SIGKILL at a random moment of the
operation (the child signals when it is ready, so the kill lands inside the operation,
not in the interpreter's start-up). Afterwards the index must open as the old or the new
generation: its live ids must be the old or the new set, its search results must equal
those the parent computed in memory for that state (ids and scores, exactly), and they
must equal a brute-force search of the same codes. Anything else is a violation.

Corruption phase: every file of the live generation (and ``CURRENT``) is truncated at
several lengths and has single bits flipped at random positions; opening the index must
then fail with a clear error that names the damaged file (or, for a harmless change,
give results identical to the undamaged index) -- never a crash or silently different
results.

Usage::

    python scripts/crash_test.py --iterations 200 --json eval/results/crash_test.json
    python scripts/crash_test.py --iterations 5 --flips 4       # quick (CI)

The run prints one line per iteration and a summary; the exit status is 1 when any
violation was seen.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPECS = {
    "ivf": "residual:k=64,nbits=2 | ivf:nprobe=64,n_candidates=100000,n_rerank=100000",
    "hnsw": "residual:k=64,nbits=2 | hnsw:nprobe=64,n_candidates=100000,n_rerank=100000,ef=64",
}
OPS = ("build", "build_fresh", "add", "delete", "compact")
#: the operations --per-op counts landed kills for
PER_OP_OPS = ("build", "add", "delete", "compact")


# -- data ---------------------------------------------------------------------------------------
def make_corpus(folder: Path, n_docs: int, dim: int, seed: int) -> None:
    """Seeded synthetic corpus (clustered token vectors, labelled synthetic) + queries."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((48, dim)).astype(np.float32)
    lens = rng.integers(3, 40, n_docs)
    lens[rng.choice(n_docs, 3, replace=False)] = 0  # a few empty documents
    off = np.zeros(n_docs + 1, np.int64)
    np.cumsum(lens, out=off[1:])
    topic = rng.integers(0, 48, off[-1])
    emb = centers[topic] + 0.6 * rng.standard_normal((off[-1], dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    q_lens = rng.integers(4, 12, 12)
    q_off = np.zeros(13, np.int64)
    np.cumsum(q_lens, out=q_off[1:])
    q = centers[rng.integers(0, 48, q_off[-1])] + 0.6 * rng.standard_normal((q_off[-1], dim))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    np.save(folder / "emb.npy", emb.astype(np.float32))
    np.save(folder / "off.npy", off)
    np.save(folder / "q_emb.npy", q)
    np.save(folder / "q_off.npy", q_off)


def load_corpus(folder: Path):
    from retrieval_prune.types import MultiVectors

    docs = MultiVectors(np.load(folder / "emb.npy", mmap_mode="r"), np.load(folder / "off.npy"))
    queries = MultiVectors(np.load(folder / "q_emb.npy"), np.load(folder / "q_off.npy"))
    return docs, queries


def doc_id(i: int) -> str:
    return f"doc-{i:05d}"


# -- operations (run by the child, and in memory by the parent) -------------------------------
def apply_op(job: dict, docs, index=None):
    """Run ``job`` on ``index`` (loaded) and return the resulting in-memory index."""
    from retrieval_prune.pipeline import make_pipeline

    op = job["op"]
    if op in ("build", "build_fresh"):
        sel = np.asarray(job["docs"], np.int64)
        pipe = make_pipeline(job["spec"])
        return pipe.build(docs[sel], [doc_id(i) for i in sel])
    if op == "add":
        sel = np.asarray(job["docs"], np.int64)
        index.add(docs[sel], [doc_id(i) for i in sel])
    elif op == "delete":
        index.delete(job["ids"])
    elif op == "compact":
        index.compact()
    return index


def child_main(job_path: str) -> None:
    import faiss

    from retrieval_prune.index.base import load_index

    faiss.omp_set_num_threads(1)
    job = json.loads(Path(job_path).read_text())
    docs, _ = load_corpus(Path(job["corpus"]))
    index = None if job["op"] in ("build", "build_fresh") else load_index(job["index"])
    docs[np.arange(min(len(docs), 4))]  # touch the data
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    t0 = time.perf_counter()
    index = apply_op(job, docs, index)
    t_save = time.perf_counter() - t0
    index.save(job["index"])
    print(f"done save_at={t_save:.4f} {time.perf_counter() - t0:.4f}", flush=True)


# -- checks ---------------------------------------------------------------------------------------
def snapshot(index, queries) -> dict:
    """Live ids and the staged search results (external ids + scores) of an index."""
    res = index.search(queries, k=10)
    rows = [[(index.doc_ids[int(i)], float(s)) for i, s in zip(r_i, r_s, strict=True) if i >= 0]
            for r_i, r_s in zip(res.ids, res.scores, strict=True)]
    live = sorted(index.doc_ids[i] for i in np.flatnonzero(np.asarray(index.alive)))
    return {"live": live, "rows": rows}


def bruteforce_ok(index, queries) -> bool:
    a = index.search(queries, k=10)
    b = index.search_bruteforce(queries, k=10)
    return bool(np.array_equal(a.ids, b.ids) and np.allclose(a.scores, b.scores, atol=1e-4))


def try_open(path: Path):
    from retrieval_prune.index.base import load_index
    from retrieval_prune.index.storage import IndexCorruptedError

    try:
        return load_index(path), None
    except (FileNotFoundError, IndexCorruptedError) as exc:
        return None, exc


# -- crash phase ----------------------------------------------------------------------------------
def run_child(job: dict, workdir: Path, kill_after: float | None, timeout: float = 120.0):
    """Start the child, wait for ready, say go, kill after ``kill_after`` s (None: let it
    finish). Returns (finished_before_kill, (op_seconds, save_start_seconds) or None)."""
    job_path = workdir / "job.json"
    job_path.write_text(json.dumps(job))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen(
        [sys.executable, __file__, "--child", str(job_path)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        line = p.stdout.readline()
        if line.strip() != "ready":
            err = p.stderr.read()
            raise RuntimeError(f"child failed before the operation: {line!r} {err[-2000:]}")
        p.stdin.write("go\n")
        p.stdin.flush()
        if kill_after is None:
            out, err = p.communicate(timeout=timeout)
            if p.returncode != 0:
                raise RuntimeError(f"child failed: {err[-2000:]}")
            words = out.split()
            return True, (float(words[-1]), float(words[-2].split("=")[1]))
        time.sleep(kill_after)
        os.kill(p.pid, signal.SIGKILL)
        out, _ = p.communicate(timeout=timeout)
        return "done" in out, None
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()


def crash_phase(args, workdir: Path, corpus: Path) -> dict:
    import faiss

    from retrieval_prune.index.base import load_index

    faiss.omp_set_num_threads(1)
    rng = random.Random(args.seed)
    docs, queries = load_corpus(corpus)
    n = len(docs)
    base = list(range(int(n * 0.6)))
    counts = {"iterations": 0, "violations": 0, "old": 0, "new": 0, "finished_before_kill": 0,
              "kills_in_save_window": 0, "by_op": {}, "leftover_temp": 0}
    events = []
    durations: dict[tuple, tuple[float, float, int]] = {}
    roots = {kind: workdir / f"index-{kind}" for kind in SPECS}
    for kind, root in roots.items():  # initial generations
        apply_op({"op": "build", "spec": SPECS[kind], "docs": base}, docs).save(root)

    def calibrate(key: tuple, job: dict, it: int) -> tuple[float, float]:
        """(operation seconds, second at which its save starts), from an unkilled run of
        the same job on a copy (redone every 25 iterations: the machine's load drifts)."""
        if key not in durations or it - durations[key][2] >= 25:
            scratch = workdir / "calib"
            shutil.rmtree(scratch, ignore_errors=True)
            if key[1] not in ("build_fresh",):
                shutil.copytree(job["index"], scratch)
            _, (t_op, t_save) = run_child({**job, "index": str(scratch)}, workdir, None)
            durations[key] = (t_op, t_save, it)
            shutil.rmtree(scratch, ignore_errors=True)
        return durations[key][:2]

    per_op = getattr(args, "per_op", 0) or 0
    landed = {op: 0 for op in OPS}
    counts["landed_by_op"] = landed
    counts["leftover_after_kill"] = 0
    counts["leftover_after_next_writer"] = 0
    n_iter = args.iterations if not per_op else 4 * per_op * len(OPS)
    for it in range(n_iter):
        if per_op and all(landed[o] >= per_op for o in PER_OP_OPS):
            break
        kind = "ivf" if it % 2 == 0 else "hnsw"
        root = roots[kind]
        old_index = load_index(root)
        live = [old_index.doc_ids[i] for i in np.flatnonzero(np.asarray(old_index.alive))]
        live_num = {int(x.split("-")[1]) for x in live}
        unused = [i for i in range(n) if i not in live_num]
        if per_op:  # the op furthest from its target of landed kills
            op = min(PER_OP_OPS, key=lambda o: (landed[o], rng.random()))
        else:
            op = rng.choice(OPS)
        if op == "add" and not unused:
            op = "delete"
        if op == "delete" and len(live) <= 50:
            op = "add"
        if op == "compact" and old_index.n_positions == len(old_index):
            # give the compaction something to drop: tombstones written without a crash
            old_index.delete(rng.sample(live, min(len(live) - 10, rng.randint(5, 40))))
            old_index.save(root)
            old_index = load_index(root)
            live = [old_index.doc_ids[i] for i in np.flatnonzero(np.asarray(old_index.alive))]
        job = {"op": op, "spec": SPECS[kind], "corpus": str(corpus), "index": str(root)}
        if op in ("build", "build_fresh"):
            job["docs"] = sorted(rng.sample(range(n), int(n * rng.uniform(0.4, 0.8))))
        elif op == "add":
            job["docs"] = sorted(rng.sample(unused, min(len(unused), rng.randint(5, 60))))
        elif op == "delete":
            job["ids"] = rng.sample(live, rng.randint(1, 40))
        if op == "build_fresh":
            root = workdir / f"fresh-{it}"
            job["index"] = str(root)
            old = None
        else:
            old = snapshot(old_index, queries)
        expected_new = snapshot(apply_op(job, docs, old_index if op not in ("build", "build_fresh")
                                         else None), queries)
        t_op, t_save = calibrate((kind, op), job, it)
        # half the kills anywhere in the operation, half inside its save (the writes, fsyncs
        # and the pointer swap), where a crash can tear files
        if rng.random() < args.save_bias:
            kill_after = rng.uniform(t_save, 1.02 * t_op)
        else:
            kill_after = rng.uniform(0.0, 1.15 * t_op)
        counts["kills_in_save_window"] += int(t_save <= kill_after <= t_op)
        finished, _ = run_child(job, workdir, kill_after)
        index, err = try_open(root)
        verdict, detail = "violation", ""
        if index is None:
            if old is None:  # a fresh build killed before its first commit: no index yet
                verdict = "old"
            else:
                detail = f"cannot open after the crash: {err}"
        else:
            got = snapshot(index, queries)
            if not bruteforce_ok(index, queries):
                detail = "staged search differs from brute force of the same codes"
            elif got == expected_new:
                verdict = "new"
            elif old is not None and got == old:
                verdict = "old"
            else:
                detail = "results match neither the old nor the new generation"
        if finished and verdict == "old" and old is not None:
            verdict, detail = "violation", "the child finished but the old generation is live"
        counts["iterations"] += 1
        counts["finished_before_kill"] += int(finished)
        by = counts["by_op"].setdefault(op, {"n": 0, "old": 0, "new": 0, "violations": 0})
        by["n"] += 1
        if verdict == "violation":
            counts["violations"] += 1
            by["violations"] += 1
        else:
            counts[verdict] += 1
            by[verdict] += 1
        landed[op] += int(not finished)
        if root.exists():
            left = sum(p.name.startswith((".tmp", ".CURRENT.")) for p in root.iterdir())
            counts["leftover_temp"] += left
            counts["leftover_after_kill"] += left
            if index is not None and left:
                index.save(root)  # the next writer must clean what the killed one left
                after = sum(p.name.startswith((".tmp", ".CURRENT.")) for p in root.iterdir())
                counts["leftover_after_next_writer"] += after
                if after:
                    counts["violations"] += 1
                    detail += f" {after} temporary entries survived the next writer"
        events.append({"it": it, "kind": kind, "op": op, "kill_after_s": round(kill_after, 4),
                       "op_s": round(t_op, 4), "save_start_s": round(t_save, 4),
                       "finished": finished, "verdict": verdict, "detail": detail})
        print(f"[{it + 1:4d}/{args.iterations}] {kind:4s} {op:11s} kill at {kill_after * 1e3:7.1f} ms "
              f"(op ~{t_op * 1e3:6.1f} ms) -> {verdict}{' ' + detail if detail else ''}", flush=True)
        if op == "build_fresh":
            shutil.rmtree(root, ignore_errors=True)
    counts["events"] = events
    return counts


# -- corruption phase -----------------------------------------------------------------------------
def corruption_phase(args, workdir: Path, corpus: Path) -> dict:
    from retrieval_prune.index.base import load_index
    from retrieval_prune.index.storage import current_generation

    rng = random.Random(args.seed + 1)
    docs, queries = load_corpus(corpus)
    counts = {"trials": 0, "errors_named": 0, "benign": 0, "violations": 0, "files": 0,
              "details": []}
    for kind, spec in SPECS.items():
        root = workdir / f"corrupt-{kind}"
        shutil.rmtree(root, ignore_errors=True)
        apply_op({"op": "build", "spec": spec, "docs": list(range(len(docs)))}, docs).save(root)
        index = load_index(root)
        index.delete([index.doc_ids[0]])
        index.save(root)  # two generations on disk: an older one a flipped pointer could name
        ref = snapshot(load_index(root), queries)
        gen = current_generation(root)
        targets = [root / "CURRENT"] + sorted(p for p in gen.iterdir() if p.is_file())
        for path in targets:
            counts["files"] += 1
            original = path.read_bytes()
            size = len(original)
            damages = [("truncate", t) for t in sorted({0, 1, size // 2, max(size - 1, 0), 11} if path.name == "CURRENT" else {0, 1, size // 2, max(size - 1, 0)}) if t < size]
            damages += [("flip", rng.randrange(size * 8)) for _ in range(args.flips)]
            damages += [("flip", rng.randrange(min(size, 128) * 8)) for _ in range(max(1, args.flips // 2))]
            for how, where in damages:
                if how == "truncate":
                    path.write_bytes(original[:where])
                else:
                    raw = bytearray(original)
                    raw[where // 8] ^= 1 << (where % 8)
                    path.write_bytes(bytes(raw))
                counts["trials"] += 1
                verdict = "violation"
                msg = ""
                try:
                    damaged = load_index(root)
                    got = snapshot(damaged, queries)
                    if got == ref:
                        verdict = "benign"
                    else:
                        msg = "opened and returned different results"
                except (ValueError, FileNotFoundError) as exc:  # IndexCorruptedError is a ValueError
                    msg = str(exc)
                    names = {path.name} | ({"CURRENT", "manifest.json"} if path.name in ("CURRENT", "manifest.json") else set())
                    verdict = "errors_named" if any(nm in msg for nm in names) else "violation"
                except Exception as exc:  # anything else is a crash of the reader
                    msg = f"{type(exc).__name__}: {exc}"
                finally:
                    path.write_bytes(original)
                counts[verdict] += 1
                if verdict == "violation":
                    counts["details"].append({"file": path.name, "damage": how, "at": where, "error": msg[:300]})
                    print(f"VIOLATION {kind} {path.name} {how}@{where}: {msg[:200]}", flush=True)
        print(f"corruption {kind}: {len(targets)} files checked", flush=True)
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", metavar="JOB", help=argparse.SUPPRESS)
    ap.add_argument("--iterations", type=int, default=200, help="kill -9 iterations (default 200)")
    ap.add_argument("--flips", type=int, default=16, help="random bit flips per file (default 16)")
    ap.add_argument("--docs", type=int, default=1200, help="synthetic documents (default 1200)")
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-op", type=int, default=0, metavar="N",
                    help="run until each of build/add/delete/compact has N kills that landed "
                         "before the operation finished (overrides --iterations)")
    ap.add_argument("--save-bias", type=float, default=0.5,
                    help="fraction of kills aimed inside the save (default 0.5)")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temp folder)")
    ap.add_argument("--skip-corruption", action="store_true")
    ap.add_argument("--json", metavar="PATH", help="write the report here")
    args = ap.parse_args()
    if args.child:
        child_main(args.child)
        return 0
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="rp-crash-"))
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = workdir / "corpus"
    corpus.mkdir(exist_ok=True)
    make_corpus(corpus, args.docs, args.dim, args.seed)
    t0 = time.perf_counter()
    report = {"iterations_requested": args.iterations, "seed": args.seed, "docs": args.docs,
              "specs": SPECS}
    report["crash"] = crash_phase(args, workdir, corpus) if args.iterations or args.per_op else None
    report["corruption"] = None if args.skip_corruption else corruption_phase(args, workdir, corpus)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    c, k = report["crash"], report["corruption"]
    violations = (c["violations"] if c else 0) + (k["violations"] if k else 0)
    report["violations"] = violations
    if c:
        print(f"crash: {c['iterations']} kill -9 iterations, {c['violations']} violations "
              f"(old generation {c['old']}, new {c['new']}, child finished first "
              f"{c['finished_before_kill']}, killed inside the save {c['kills_in_save_window']}); "
              f"by op: " + ", ".join(f"{op} {v['n']}" for op, v in sorted(c["by_op"].items())))
    if k:
        print(f"corruption: {k['trials']} damaged opens over {k['files']} files, "
              f"{k['errors_named']} named errors, {k['benign']} harmless, {k['violations']} violations")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
