#!/usr/bin/env python
"""Crafted index folders: an attacker's edits with every checksum recomputed.

Checksums catch accidents; a shared index folder can be crafted. Each case copies a small
saved index (synthetic clustered vectors, labelled synthetic), edits it -- manifest fields
(types, ranges, versions, file names that leave the generation, deep nesting), array
contents (ids past the codebook, NaN/Inf, extreme values, wrong shapes and dtypes, lying
``.npy`` headers), ``CURRENT`` (bare names, other generations, paths), an hnswlib graph file
with a crafted header -- then recomputes the sizes and sha256s in the manifest and the
manifest's sha256 in ``CURRENT``, so only validation stands between the edit and the
kernels. Then it opens the index and searches it, in a worker process, so a native crash
is seen (the worker dies) instead of ending the run.

Outcomes per case:

``error``      a named error (``IndexCorruptedError`` / ``ValueError`` / ``FileNotFoundError``,
               one line) at open or search
``same``       opened, and the answer equals the untouched index's, bit for bit
``changed``    opened, answered, different answer: the edit made another *well-formed*
               index (e.g. another ``nprobe`` in the spec, other residual bits). Only a
               signature detects those: the run is repeated with ``RETRIEVAL_PRUNE_INDEX_KEY``
               set, where every crafted case must be an ``error``
``traceback``  any other exception (a defect)
``crash``      the worker died (signal) or hung (a defect)

Usage::

    python scripts/crafted_folders.py --cases-per-kind 200 --json out.json
    python scripts/crafted_folders.py --cases-per-kind 10            # quick
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: the index kinds a case may target (spec built on synthetic clustered vectors)
KINDS = {
    "ivf_i8": "residual:k=32,nbits=2,centroid_bits=8 | ivf:nprobe=8",
    "hnsw": "residual:k=32,nbits=2 | hnsw:nprobe=8",
    "kmeans": "kmeans:k=32",
    "hkmeans": "hkmeans:k=32",
    "binary": "binary:sign",
    "pca_fp16": "pca:dim=8 | fp16",
    "flat": "exact",
}
NAMED = ("IndexCorruptedError", "ValueError", "FileNotFoundError", "ManifestError",
         "JSONLimitError", "IndexChangedError")


# -- the indexes ------------------------------------------------------------------------------
def make_data(seed: int = 0, n_docs: int = 150, dim: int = 16):
    from retrieval_prune.types import MultiVectors

    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((12, dim)).astype(np.float32)

    def sample(n, lo, hi):
        lens = rng.integers(lo, hi, n)
        vecs = [centers[rng.integers(0, 12, k)] + 0.4 * rng.standard_normal((k, dim)) for k in lens]
        return MultiVectors.from_list([(v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
                                       if len(v) else np.zeros((0, dim), np.float32) for v in vecs])

    return sample(n_docs, 0, 30), sample(6, 3, 9)


def build_bases(workdir: Path) -> dict[str, Path]:
    from retrieval_prune.pipeline import make_pipeline

    docs, queries = make_data()
    np.save(workdir / "q_emb.npy", queries.embeddings)
    np.save(workdir / "q_off.npy", queries.offsets)
    out = {}
    for kind, spec in KINDS.items():
        ix = make_pipeline(spec).build(docs, [f"d{i}" for i in range(len(docs))],
                                       texts=[f"text {i}" for i in range(len(docs))])
        root = workdir / f"base-{kind}"
        ix.save(root)
        ix.delete(["d3", "d7"])
        ix.save(root)  # two generations: an older one a crafted pointer can name
        out[kind] = root
    return out


# -- crafting helpers -------------------------------------------------------------------------
def _gen(root: Path) -> Path:
    return root / (root / "CURRENT").read_text().split("\n")[0]


def _manifest(root: Path) -> dict:
    return json.loads((_gen(root) / "manifest.json").read_text())


def _npy_info(path: Path):
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = reader(f)
    return dtype.str, list(shape)


def recommit(root: Path, man: dict | None = None, raw: bytes | None = None,
             refresh: bool = True) -> None:
    """Write ``man`` (or ``raw`` bytes) as the manifest, refresh every listed file's size and
    sha256 (and an npy file's dtype/shape from its header), and point CURRENT at it with the
    manifest's sha256: what an attacker who knows the format can do."""
    gen = _gen(root)
    if raw is None:
        man = copy.deepcopy(man if man is not None else _manifest(root))
        files = man.get("files") if isinstance(man, dict) else None
        if refresh and isinstance(files, dict):
            for name, entry in files.items():
                p = gen / name if isinstance(name, str) and "/" not in name else None
                if not isinstance(entry, dict) or p is None or not p.is_file():
                    continue
                data = p.read_bytes()
                entry["size"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
                if entry.get("kind") == "npy":
                    try:
                        entry["dtype"], entry["shape"] = _npy_info(p)
                    except Exception:
                        pass
        raw = json.dumps(man).encode()
    (gen / "manifest.json").write_bytes(raw)
    (root / "CURRENT").write_text(f"{gen.name}\n{hashlib.sha256(raw).hexdigest()}\n")


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, arr, allow_pickle=False)


# -- the cases --------------------------------------------------------------------------------
def manifest_edits(rng: random.Random, man: dict) -> list[tuple[str, object]]:
    """(description, edit) pairs; an edit is a function man -> None or ("raw", bytes)."""
    files = list(man["files"])
    meta_keys = ["type", "spec", "pipeline", "dim", "n_positions", "n_docs", "encoder", "info"]
    weird = [None, -5, 0, 1, 2, 10**30, 1.5, True, "1", "", "x" * 300, [], {}, [1, [2]], -1,
             float(2**63), "../../etc/passwd", "\ud800"]
    edits = []
    for v in weird:
        edits.append((f"format_version={v!r:.30}", lambda m, v=v: m.__setitem__("format_version", v)))
        edits.append((f"format={v!r:.30}", lambda m, v=v: m.__setitem__("format", v)))
        k = rng.choice(meta_keys)
        edits.append((f"meta.{k}={v!r:.30}", lambda m, v=v, k=k: m["meta"].__setitem__(k, v)))
        f = rng.choice(files)
        field = rng.choice(["size", "sha256", "kind", "dtype", "shape"])
        edits.append((f"files[{f}].{field}={v!r:.30}",
                      lambda m, v=v, f=f, field=field: m["files"][f].__setitem__(field, v)))
    for name in ["/etc/hostname", "../CURRENT", "..", ".lock", "manifest.json", "a/b.npy",
                 "CON", "x" * 300 + ".npy", ""]:
        f = rng.choice(files)
        edits.append((f"rename entry {f} -> {name!r:.40}",
                      lambda m, f=f, name=name: m["files"].__setitem__(name, m["files"].pop(f))))
        edits.append((f"extra native entry {name!r:.40}",
                      lambda m, name=name: m["files"].__setitem__(
                          name, {"kind": "native", "size": 1, "sha256": "0" * 64})))
    for f in files:
        edits.append((f"drop entry {f}", lambda m, f=f: m["files"].pop(f)))
        for dt in ["|O", "<U4", ">f4", "<c8", "|V8", "<M8[s]", "|b1", "<f8", "<i4", "|u1"]:
            edits.append((f"files[{f}].dtype={dt}", lambda m, f=f, dt=dt: m["files"][f].__setitem__("dtype", dt)))
        for shape in [[-1], [10**12], [], [1, 1, 1, 1, 1, 1, 1, 1, 1], [0], [2, -3]]:
            edits.append((f"files[{f}].shape={shape}", lambda m, f=f, s=shape: m["files"][f].__setitem__("shape", s)))
    for depth in (64, 1000, 100_000):
        edits.append((f"meta.info nested {depth} deep",
                      ("raw", lambda m, d=depth: json.dumps(m).replace(
                          '"info": {', '"info": {"deep": ' + "[" * d + "]" * d + ", ", 1).encode())))
    edits.append(("manifest is a list", ("raw", lambda m: b"[1, 2, 3]")))
    edits.append(("manifest is not JSON", ("raw", lambda m: b"{\"format\": ")))
    edits.append(("manifest not UTF-8", ("raw", lambda m: b"{\"format\": \"\xff\xfe\"}")))
    edits.append(("manifest NaN size", ("raw", lambda m: json.dumps(m).replace('"size": ', '"size": NaN, "x": ', 1).encode())))
    # spec / type swaps that keep the manifest well-formed
    for spec in KINDS.values():
        edits.append((f"meta.spec={spec!r}", lambda m, s=spec: m["meta"].__setitem__("spec", s)))
    for t in ["flat", "compressed", "ivf", "hnsw", "nope"]:
        edits.append((f"meta.type={t}", lambda m, t=t: m["meta"].__setitem__("type", t)))
    for d in [1, 8, 15, 17, 65536, 65537]:
        edits.append((f"meta.dim={d}", lambda m, d=d: m["meta"].__setitem__("dim", d)))
    if "spec" in man["meta"]:
        s = man["meta"]["spec"]
        for a, b in [("nbits=2", "nbits=1"), ("nbits=2", "nbits=4"), ("nprobe=8", "nprobe=0"),
                     ("nprobe=8", "nprobe=100000"), ("centroid_bits=8", "centroid_bits=16"),
                     ("centroid_bits=16", "centroid_bits=8"), ("dim=8", "dim=9"), ("k=32", "k=64"),
                     ("score=table", "score=hamming"), ("score=hamming", "score=table")]:
            if a in s:
                edits.append((f"spec {a}->{b}", lambda m, a=a, b=b: m["meta"].__setitem__("spec", m["meta"]["spec"].replace(a, b))))
    return edits


def array_edits(rng: random.Random, gen: Path, man: dict) -> list[tuple[str, object]]:
    """Edits of array contents (the file rewritten as a valid .npy, manifest refreshed)."""
    edits = []
    for fname, entry in man["files"].items():
        if entry["kind"] != "npy":
            continue
        arr = np.load(gen / fname, allow_pickle=False)
        dt = arr.dtype

        def put(value, where="one"):
            def f(a, value=value, where=where):
                a = np.array(a, copy=True)
                if a.size == 0:
                    return a
                flat = a.reshape(-1)
                if where == "all":
                    flat[:] = value
                elif where == "last":
                    flat[-1] = value
                else:
                    flat[rng.randrange(flat.size)] = value
                return a
            return f

        values = []
        if dt.kind in "iu":
            info = np.iinfo(dt)
            values = [info.max, info.min, -1 if dt.kind == "i" else info.max, 0, 1, info.max // 2]
        elif dt.kind == "f":
            values = [np.nan, np.inf, -np.inf, 1e30, -1e30, 0.0]
        elif dt.kind == "b":
            values = [True, False]
        for v in values:
            for where in ("one", "all", "last"):
                edits.append((f"{fname}: {where} = {v!r}", ("array", fname, put(v, where))))
        edits.append((f"{fname}: reversed", ("array", fname, lambda a: np.ascontiguousarray(a[::-1]))))
        edits.append((f"{fname}: one row dropped", ("array", fname, lambda a: np.ascontiguousarray(a[:-1]))))
        edits.append((f"{fname}: one row added", ("array", fname, lambda a: np.concatenate([a, a[:1]]) if a.size else a)))
        edits.append((f"{fname}: empty", ("array", fname, lambda a: a[:0].copy())))
        edits.append((f"{fname}: flattened", ("array", fname, lambda a: a.reshape(-1).copy())))
        edits.append((f"{fname}: extra axis", ("array", fname, lambda a: a.reshape(*a.shape, 1).copy())))
        for to in (np.int8, np.int32, np.int64, np.uint16, np.float16, np.float64, np.bool_):
            if np.dtype(to) != dt:
                edits.append((f"{fname}: as {np.dtype(to).str}", ("array", fname, lambda a, to=to: a.astype(to))))
        edits.append((f"{fname}: header lies (shape x2)", ("header", fname, "double")))
        edits.append((f"{fname}: header lies (fortran)", ("header", fname, "fortran")))
        edits.append((f"{fname}: header object dtype", ("header", fname, "object")))
    return edits


def pointer_edits(root: Path) -> list[tuple[str, object]]:
    gen = _gen(root)
    num = int(gen.name.split("-")[1])
    sha = (root / "CURRENT").read_text().split("\n")[1]
    older = f"gen-{num - 1:06d}"
    return [
        ("CURRENT: bare name", ("pointer", f"{gen.name}\n")),
        ("CURRENT: older generation, its sha", ("pointer_older", older)),
        ("CURRENT: older generation, new sha", ("pointer", f"{older}\n{sha}\n")),
        ("CURRENT: missing generation", ("pointer", f"gen-999999\n{sha}\n")),
        ("CURRENT: path", ("pointer", f"../{gen.name}\n{sha}\n")),
        ("CURRENT: absolute", ("pointer", f"/etc\n{sha}\n")),
        ("CURRENT: long", ("pointer", "gen-000001\n" + "a" * 100_000)),
        ("CURRENT: binary", ("pointer", "\x00\x01\x02")),
        ("CURRENT: empty", ("pointer", "")),
        ("CURRENT: bad signature line", ("pointer", f"{gen.name}\n{sha}\nhmac-sha256:{'0' * 64}\n")),
        ("generation is a symlink to another", ("symlink_gen", older)),
        ("array file is a symlink", ("symlink_file", None)),
    ]


def graph_edits(rng: random.Random) -> list[tuple[str, object]]:
    """An hnswlib graph file (the format older indexes carried) with crafted header bytes,
    listed in the manifest: it must never reach hnswlib."""
    out = []
    for i in range(12):
        out.append((f"crafted centroids.hnsw #{i}", ("graph", i)))
    for i in range(24):  # the real graph of an hnsw index with bytes changed
        out.append((f"edited real graph #{i}", ("graph", i)))
    return out


def all_cases(bases: dict[str, Path], per_kind: int, seed: int) -> list[dict]:
    cases = []
    for kind, root in bases.items():
        rng = random.Random(f"{seed}-{kind}")
        man = _manifest(root)
        pool = [("manifest", d) for d, _ in manifest_edits(rng, man)]
        pool += [("array", d) for d, _ in array_edits(rng, _gen(root), man)]
        pool += [("pointer", d) for d, _ in pointer_edits(root)]
        graph = [("graph", d) for d, _ in graph_edits(rng)]
        pool += graph if kind == "hnsw" else graph[:4]  # other kinds ignore a graph file
        must = [p for p in pool if p[0] in ("pointer", "graph")]
        rest = [p for p in pool if p[0] not in ("pointer", "graph")]
        rng.shuffle(rest)
        chosen = must + rest[: max(0, per_kind - len(must))]
        for group, desc in chosen:
            cases.append({"kind": kind, "group": group, "desc": desc})
    return cases


def apply_case(case: dict, root: Path, seed: int) -> None:
    """Re-create the edit named by ``case`` (deterministic from its description) on ``root``."""
    kind, desc, group = case["kind"], case["desc"], case["group"]
    rng = random.Random(f"{seed}-{kind}")
    man = _manifest(root)
    gen = _gen(root)
    if group == "manifest":
        edit = dict(manifest_edits(rng, man))[desc]
        if isinstance(edit, tuple):
            recommit(root, raw=edit[1](man))
        else:
            edit(man)
            recommit(root, man, refresh=False)
        return
    if group == "array":
        kind_, fname, how = dict(array_edits(rng, gen, man))[desc]
        path = gen / fname
        if kind_ == "array":
            a = np.load(path, allow_pickle=False)
            _save_npy(path, how(a))
        else:
            data = path.read_bytes()
            a = np.load(path, allow_pickle=False)
            header = {"descr": a.dtype.str, "fortran_order": how == "fortran",
                      "shape": tuple(s * 2 for s in a.shape) if how == "double" else a.shape}
            if how == "object":
                header["descr"] = "|O"
            hdr = repr(header).encode()
            hdr += b" " * (-(len(hdr) + 11) % 64) + b"\n"
            body_at = data.index(b"\n") + 1
            path.write_bytes(b"\x93NUMPY\x01\x00" + len(hdr).to_bytes(2, "little") + hdr + data[body_at:])
        recommit(root, man)
        return
    if group == "pointer":
        what, arg = dict(pointer_edits(root))[desc]
        if what == "pointer":
            (root / "CURRENT").write_bytes(arg.encode("utf-8", "surrogateescape"))
        elif what == "pointer_older":
            raw = (root / arg / "manifest.json").read_bytes()
            (root / "CURRENT").write_text(f"{arg}\n{hashlib.sha256(raw).hexdigest()}\n")
        elif what == "symlink_gen":
            shutil.rmtree(gen)
            os.symlink(root / arg, gen)
        elif what == "symlink_file":
            target = next(p for p in sorted(gen.iterdir()) if p.suffix == ".npy")
            other = root / "elsewhere.npy"
            shutil.copy(target, other)
            target.unlink()
            os.symlink(other, target)
            recommit(root, man)
        return
    if group == "graph" and desc.startswith("edited") and (gen / "centroids.hnsw").is_file():
        i = int(desc.split("#")[1])
        g = random.Random(f"real-graph-{seed}-{i}")
        raw = bytearray((gen / "centroids.hnsw").read_bytes())
        if i % 6 == 5:
            raw = raw[: g.randrange(len(raw))]
        else:
            for _ in range(1 + i % 4):  # header fields, link counts, neighbour ids, vectors
                at = g.randrange(96) if i % 3 == 0 else g.randrange(len(raw))
                raw[at] = g.randrange(256)
        (gen / "centroids.hnsw").write_bytes(bytes(raw))
        recommit(root, man)
        return
    if group == "graph":
        i = int(desc.split("#")[1])
        g = random.Random(f"graph-{seed}-{i}")
        # hnswlib's header: offsetLevel0, max_elements, cur_count, size_per_element,
        # label_offset, offsetData (size_t each), maxlevel, enterpoint (int), maxM, maxM0, M
        # (size_t), mult (double), ef_construction (size_t); then the level-0 block
        fields = [g.choice([0, 1, 2**31, 2**63 - 1, g.randrange(2**32)]) for _ in range(13)]
        blob = b"".join(int(f % 2**64).to_bytes(8, "little") for f in fields)
        blob += bytes(g.randrange(256) for _ in range(g.choice([0, 64, 4096])))
        (gen / "centroids.hnsw").write_bytes(blob)
        man["files"]["centroids.hnsw"] = {"kind": "native"}
        recommit(root, man)
        return
    raise ValueError(f"unknown case group {group!r}")


# -- the worker -------------------------------------------------------------------------------
def answer(root: Path, queries):
    from retrieval_prune.index.base import load_index

    ix = load_index(root)
    res = ix.search(queries, k=10)
    return [[(ix.doc_ids[int(i)], round(float(s), 6)) for i, s in zip(r_i, r_s, strict=True) if i >= 0]
            for r_i, r_s in zip(res.ids, res.scores, strict=True)]


def worker(workdir: Path, seed: int) -> None:
    """Read case JSON lines on stdin; print one result JSON line per case."""
    from retrieval_prune.types import MultiVectors

    queries = MultiVectors(np.load(workdir / "q_emb.npy"), np.load(workdir / "q_off.npy"))
    refs = {}
    for line in sys.stdin:
        case = json.loads(line)
        base = workdir / f"base-{case['kind']}"
        if case["kind"] not in refs:
            refs[case["kind"]] = answer(base, queries)
        root = workdir / "case"
        shutil.rmtree(root, ignore_errors=True)
        if root.is_symlink():
            root.unlink()
        shutil.copytree(base, root, symlinks=True)
        print(json.dumps({"start": case["id"]}), flush=True)
        out = {"id": case["id"]}
        try:
            apply_case(case, root, seed)
        except Exception as exc:  # the crafting itself failed: not a case
            out.update(outcome="skipped", error=f"{type(exc).__name__}: {exc}"[:300])
            print(json.dumps(out), flush=True)
            continue
        try:
            got = answer(root, queries)
            out["outcome"] = "same" if got == refs[case["kind"]] else "changed"
        except Exception as exc:
            name = type(exc).__name__
            msg = str(exc)
            one_line = "\n" not in msg and len(msg) < 2000
            out["outcome"] = "error" if name in NAMED and one_line else "traceback"
            out["error"] = f"{name}: {msg}"[:400]
        print(json.dumps(out), flush=True)


def run_cases(workdir: Path, cases: list[dict], seed: int, env: dict, timeout: float = 60.0) -> list[dict]:
    """Feed cases to worker processes; a worker that dies marks its case a crash and a new
    worker takes the rest."""
    results: list[dict] = []
    todo = list(cases)
    while todo:
        # the cases go through a file: written to a pipe while the worker's answers fill the
        # other pipe unread, they would deadlock both processes
        case_file = workdir / "cases.jsonl"
        case_file.write_text("".join(json.dumps(c) + "\n" for c in todo))
        p = subprocess.Popen([sys.executable, __file__, "--worker", str(workdir), "--seed", str(seed)],
                             stdin=open(case_file), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, env=env)
        current = None
        try:
            deadline = time.monotonic() + timeout * len(todo)
            while True:
                line = p.stdout.readline()
                if not line:
                    break
                msg = json.loads(line)
                if "start" in msg:
                    current = msg["start"]
                    continue
                results.append(msg)
                current = None
                if time.monotonic() > deadline:
                    break
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait()
        done = {r["id"] for r in results}
        if current is not None and current not in done:
            results.append({"id": current, "outcome": "crash", "error": f"worker exit {rc}"})
            done.add(current)
        todo = [c for c in todo if c["id"] not in done]
        if todo and current is None:  # died between cases, or no progress: stop
            for c in todo:
                results.append({"id": c["id"], "outcome": "crash", "error": f"worker exit {rc}"})
            todo = []
    return results


def run(cases_per_kind: int, seed: int = 0, workdir: Path | None = None, progress: bool = True) -> dict:
    """Build the bases, craft the cases, run them unsigned and signed; the report dict."""
    own = workdir is None
    workdir = Path(workdir or tempfile.mkdtemp(prefix="rp-crafted-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "RETRIEVAL_PRUNE_INDEX_KEY"}
    bases = build_bases(workdir)
    cases = all_cases(bases, cases_per_kind, seed)
    for i, c in enumerate(cases):
        c["id"] = i
    report = {"cases": len(cases), "seed": seed, "kinds": KINDS}
    for mode in ("unsigned", "signed"):
        menv = dict(env, PYTHONUNBUFFERED="1")
        if mode == "signed":  # the bases are re-signed with a key; the attacker lacks it
            menv["RETRIEVAL_PRUNE_INDEX_KEY"] = "crafted-folders-test-key"
            os.environ["RETRIEVAL_PRUNE_INDEX_KEY"] = menv["RETRIEVAL_PRUNE_INDEX_KEY"]
            try:
                for root in bases.values():
                    _load_unsigned(root).save(root)
            finally:
                del os.environ["RETRIEVAL_PRUNE_INDEX_KEY"]
        res = run_cases(workdir, cases, seed, menv)
        by_id = {r["id"]: r for r in res}
        counts: dict[str, int] = {}
        by_group: dict[str, dict[str, int]] = {}
        defects = []
        for c in cases:
            r = by_id.get(c["id"], {"outcome": "crash", "error": "no result"})
            o = r["outcome"]
            counts[o] = counts.get(o, 0) + 1
            g = by_group.setdefault(c["group"], {})
            g[o] = g.get(o, 0) + 1
            if o in ("traceback", "crash"):
                defects.append({**c, **r})
        report[mode] = {"outcomes": counts, "by_group": by_group, "defects": defects[:50],
                        "changed_examples": [f"{c['kind']}: {c['desc']}" for c in cases
                                             if by_id.get(c["id"], {}).get("outcome") == "changed"][:40],
                        "same_examples": sorted({f"{c['group']}: {c['desc']}" for c in cases
                                                 if by_id.get(c["id"], {}).get("outcome") == "same"
                                                 and c["group"] != "graph"})[:60],
                        "error_examples": [f"{c['kind']}: {c['desc']} -> {by_id[c['id']].get('error', '')[:160]}"
                                           for c in cases[:: max(1, len(cases) // 25)]
                                           if by_id.get(c["id"], {}).get("outcome") == "error"]}
        if progress:
            print(f"{mode}: {len(cases)} cases -> {counts}", flush=True)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    if own:
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def _load_unsigned(root: Path):
    """Open a base index ignoring the signing key (it was written before the key was set)."""
    key = os.environ.pop("RETRIEVAL_PRUNE_INDEX_KEY", None)
    try:
        from retrieval_prune.index.base import load_index

        return load_index(root)
    finally:
        if key is not None:
            os.environ["RETRIEVAL_PRUNE_INDEX_KEY"] = key


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--cases-per-kind", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    if args.worker:
        worker(Path(args.worker), args.seed)
        return 0
    report = run(args.cases_per_kind, args.seed)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    bad = sum(report[m]["outcomes"].get(o, 0) for m in ("unsigned", "signed") for o in ("traceback", "crash"))
    bad += sum(v for o, v in report["signed"]["outcomes"].items() if o in ("same", "changed"))
    for m in ("unsigned", "signed"):
        for d in report[m]["defects"][:15]:
            print(f"DEFECT {m} {d['kind']} {d['desc']}: {d['outcome']} {d.get('error', '')[:200]}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
