"""Command line: ``retrieval-prune {build,search,eval,tune,train,preprocess,bench,add,delete,compact,inspect,plugins}``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from retrieval_prune.atomic import atomic_write_json
from retrieval_prune.evaluation.report import format_table

__all__ = ["main"]


def _write_json(path: str, obj: Any) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(p, obj, indent=1)


# -- commands --------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    from retrieval_prune.evaluation.runner import evaluate_grid

    datasets, pipelines = list(args.data or []), list(args.pipeline or [])
    if args.config:
        import tomllib

        with open(args.config, "rb") as f:
            cfg = tomllib.load(f)
        datasets += [d for d in cfg.get("datasets", []) if d not in datasets]
        pipelines += [p for p in cfg.get("pipelines", []) if p not in pipelines]
    if not datasets:
        raise ValueError("no dataset: give --data NAME (repeatable) or a --config file with datasets")
    pipelines = pipelines or ["exact"]
    t0 = time.perf_counter()
    rows = evaluate_grid(
        datasets, pipelines, checkpoint=args.checkpoint, split=args.split,
        max_docs=args.max_docs, progress=not args.quiet,
        on_row=None if args.quiet else lambda r: print(
            f"  {r['dataset']} | {r['pipeline']}: nDCG@10={r['ndcg@10']:.4f} "
            f"(exact {r['exact_ndcg@10']:.4f})", file=sys.stderr),
    )
    table = format_table(rows)
    print(table)
    print(f"\n{len(rows)} rows in {time.perf_counter() - t0:.0f} s; Δ exact = against uncompressed "
          f"MaxSim of the same encoder ({rows[0]['encoder'] if rows else ''}):")
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        r0 = next(r for r in rows if r["dataset"] == ds)
        enc_ms = r0.get("query_encode_ms")
        print(f"  {ds}: exact nDCG@10 {r0['exact_ndcg@10']:.4f}"
              + (f", query encoding p50 {enc_ms:.1f} ms (not in p50/p95)" if enc_ms else ""))
    if args.json:
        _write_json(args.json, rows)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n", encoding="utf-8")
    if args.plot:
        from retrieval_prune.evaluation.plot import frontier_plot

        print(f"frontier plot: {frontier_plot(rows, args.plot)}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from retrieval_prune.evaluation.tune import tune

    cands = None
    if args.candidates:
        cands = [ln.strip() for ln in Path(args.candidates).read_text(encoding="utf-8").splitlines()
                 if ln.strip() and not ln.lstrip().startswith("#")]
    cands = (cands or []) + list(args.pipeline or []) or None
    res = tune(args.data, checkpoint=args.checkpoint, max_bytes_per_doc=args.max_bytes_per_doc,
               max_ms=args.max_ms, max_loss=args.max_loss, candidates=cands,
               queries=args.queries, n_queries=args.queries_n, eta=args.eta,
               min_docs=args.min_docs, seed=args.seed, progress=not args.quiet)
    fp = f"frontier of {res.dataset} ({res.n_docs} docs, {res.n_queries} {res.queries} queries, "
    print(fp + f"{res.encoder}); est. loss = 1 - nDCG@10 against exact MaxSim's ranking:")
    print(f"  {'bytes/doc':>10} {'ratio':>7} {'est.loss':>8} {'top10':>6} {'p50 ms':>7}  pipeline")
    for q in res.frontier:
        mark = "*" if q["pipeline"] == res.chosen else " "
        print(f"{mark} {q['bytes_per_doc']:>10.0f} {q['compression_ratio']:>6.1f}x "
              f"{q['est_loss']:>8.4f} {q['top10_overlap']:>6.3f} {q['p50_ms']:>7.2f}  "
              f"{q['pipeline']}")
    budget = ", ".join(f"{k}={v}" for k, v in res.budget.items() if v is not None)
    verdict = "within" if res.feasible else "NOTHING fits; lowest estimated loss, outside"
    print(f"chosen ({verdict} {budget}; {len(res.tried)} builds in {res.seconds:.0f} s, "
          f"rungs {res.rungs} docs): {res.chosen}")
    if args.json:
        _write_json(args.json, res.to_json())
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from retrieval_prune.data import load_beir
    from retrieval_prune.encode import Encoder
    from retrieval_prune.evaluation.runner import (
        RssSampler,
        current_rss_mb,
        index_bytes,
        peak_rss_mb,
        peak_rss_reset,
    )
    from retrieval_prune.pipeline import make_pipeline
    from retrieval_prune.pipeline.build import build

    pipe = make_pipeline(args.pipeline)  # a bad spec fails before anything is read
    pipe.check_buildable()
    # A corpus alone is enough to index: queries.jsonl and qrels/ are optional here.
    corpus = load_beir(args.data, split=args.split, max_docs=args.max_docs,
                       require_judgements=False)
    if args.shards is not None or args.executor != "local":
        return _build_sharded(args, pipe, corpus)
    encoder = Encoder.load(args.checkpoint, precision=args.encoder_precision)
    rss_encoder = current_rss_mb()  # interpreter, libraries and the encoder's weights
    peak_rss_reset()
    with RssSampler() as mem:
        res = build(pipe, corpus.doc_ids, texts=corpus.doc_texts, encoder=encoder,
                    dataset=corpus.name, out=args.out, max_memory_mb=args.max_memory_mb,
                    info={"dataset": corpus.name}, progress=not args.quiet)
    nbytes = index_bytes(args.out)
    n = len(corpus.doc_ids)
    how = f", streamed under {args.max_memory_mb:,.0f} MiB" if res.streamed else ""
    split = (f"; anonymous peak {mem.peak_anon_mb:,.0f} MiB, file-backed (mapped page cache) peak "
             f"{mem.peak_file_mb:,.0f} MiB" if mem.peak_anon_mb is not None else "")
    print(f"built {args.out}: {n} documents, pipeline {res.pipeline.spec!r}, "
          f"{nbytes / n:,.0f} bytes/doc, {res.seconds:.1f} s{how}; peak RSS {peak_rss_mb():,.0f} MiB "
          f"(of which {rss_encoder:,.0f} MiB before the build: interpreter, libraries, encoder){split}")
    if res.streamed and mem.samples:
        parts = [f"{name} {anon:,.0f}/{file_:,.0f}"
                 for name, (anon, file_) in mem.by_phase(res.stats["phases"]).items()]
        print("memory by phase, anonymous/file-backed peak MiB: " + ", ".join(parts))
    return 0


def _build_sharded(args: argparse.Namespace, pipe, corpus) -> int:
    """``build --shards N [--executor local|ray] [--address ADDR]``: a sharded index."""
    import functools

    from retrieval_prune.encode import Encoder
    from retrieval_prune.evaluation.runner import index_bytes
    from retrieval_prune.pipeline.executors import get_executor
    from retrieval_prune.pipeline.sharded import build_sharded

    if args.max_memory_mb is not None:
        raise ValueError("--max-memory-mb streams a single index; a sharded build is already "
                         "block by block (drop one of the two)")
    shards = args.shards or 1
    kw = {"address": args.address, "workers": args.workers} if args.executor == "ray" else {}
    if args.executor != "ray" and (args.address or args.workers):
        raise ValueError("--address and --workers are for --executor ray")
    try:
        ex = get_executor(args.executor, **kw)
    except ImportError as exc:
        raise ValueError(str(exc)) from None
    factory = functools.partial(Encoder.load, args.checkpoint, precision=args.encoder_precision)
    try:
        res = build_sharded(pipe, corpus.doc_ids, texts=corpus.doc_texts, encoder_factory=factory,
                            shards=shards, out=args.out, executor=ex, block_docs=args.block_docs,
                            info={"dataset": corpus.name}, progress=not args.quiet)
    finally:
        ex.close()
    n = len(corpus.doc_ids)
    st = res.stats
    how = "resumed: already complete" if st.get("resumed") else (
        f"encode {st['encode_seconds']:.1f} s ({st['blocks_reused']} of {st['blocks']} blocks reused), "
        f"fit {st['fit_seconds']:.1f} s, shards {st['shards_seconds']:.1f} s")
    print(f"built {args.out}: {n} documents in {shards} shards ({args.executor} executor), pipeline "
          f"{res.pipeline.spec!r}, {index_bytes(args.out) / n:,.0f} bytes/doc, {res.seconds:.1f} s; {how}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from retrieval_prune.retrieve import Retriever

    retriever = Retriever.from_index(args.index, checkpoint=args.checkpoint,
                                     address=getattr(args, "address", None))
    hits = retriever.retrieve_batch(list(args.query), k=args.k)
    if args.json:
        out = [[{"id": h.id, "score": h.score} for h in row] for row in hits]
        print(json.dumps(out[0] if len(out) == 1 else out))
        return 0
    for q, row in zip(args.query, hits, strict=False):
        print(f"query: {q}")
        for rank, h in enumerate(row, 1):
            text = (h.text or "")[:90].replace("\n", " ")
            print(f"  {rank:3d}. {h.id:<16} {h.score:8.3f}  {text}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "kernels":
        from retrieval_prune.evaluation import bench_kernels

        result = bench_kernels.run(threads=tuple(args.threads), n_docs=args.n_docs,
                                   progress=not args.quiet, timer=args.timer)
        print(json.dumps(result, indent=1))
        if args.json:
            _write_json(args.json, result)
        return 0
    if args.what in ("plaid", "peers"):
        import shlex

        from retrieval_prune.evaluation import bench_plaid

        command = shlex.join(["retrieval-prune", *(args.argv or [])])
        try:
            return bench_plaid.run_from_args(args, command, threads=args.threads,
                                             with_peers=args.what == "peers")
        except ImportError as exc:
            print(f"retrieval-prune bench {args.what}: error: {exc}", file=sys.stderr)
            return 2
    raise ValueError(f"unknown benchmark {args.what!r}")


def cmd_plugins(args: argparse.Namespace) -> int:
    from retrieval_prune import registry

    for name, cls in registry.available(args.stage).items():
        params = ", ".join(f"{k}={p.default!r}" for k, p in cls.params.items())
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{cls.stage:7s} {name:14s} {params}\n        {doc}")
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from retrieval_prune.pipeline.preprocess import preprocess_model, split_stages

    stages = split_stages(args.pipeline)
    if stages["data"]:
        return _preprocess_data(args, stages)
    meta = preprocess_model(
        args.checkpoint, args.pipeline, args.out, data=args.data or [], base=args.base,
        steps=args.steps, seed=args.seed, minutes=args.minutes,
        merge_with=args.merge_with or [], overwrite=args.overwrite,
        progress=not args.quiet,
    )
    info = meta["preprocess"]
    for r in info["reports"]:
        print(f"{r['step']}: kept {r['kept_fraction']:.4f}, {r['bytes_before'] / 1e6:.2f} MB -> "
              f"{r['bytes_after'] / 1e6:.2f} MB, {r['seconds']:.1f} s")
    print(f"wrote {args.out} (source {info['source'].get('name')}); evaluate: retrieval-prune "
          f"eval --data scifact --checkpoint {args.out} --pipeline exact")
    return 0


def _preprocess_data(args: argparse.Namespace, stages: dict[str, list[Any]]) -> int:
    from retrieval_prune.train.data import load_pairs
    from retrieval_prune.train.select import save_selection, select_pairs

    other = [s.spec for st, steps in stages.items() if st != "data" for s in steps]
    if other:
        raise ValueError(f"data steps select training pairs on their own; run {other} in a "
                         "second preprocess call on the trained checkpoint")
    if not args.data:
        raise ValueError("data steps need --data NAME (a collection with a train split)")
    if args.minutes is not None or args.steps:
        raise ValueError("--steps/--minutes budget model steps that train (loraprune); a data "
                         "step's budget is keep=FRACTION")
    if not str(args.out).endswith(".json"):
        raise ValueError(f"--out {args.out}: a data step writes a selection file; name it *.json")
    if Path(args.out).exists() and not args.overwrite:
        raise ValueError(f"--out {args.out} exists; pass --overwrite to replace it")
    pairs = [load_pairs(n, progress=not args.quiet) for n in args.data]
    spec = " | ".join(st.spec for st in stages["data"])  # chained: each on what the last kept
    _, sel = select_pairs(spec, pairs, args.scores_from, progress=not args.quiet)
    save_selection(sel, args.out)
    for name, ids in sel.kept.items():
        n = sel.report.details.get(name, {}).get("queries", len(ids))
        print(f"{name}: kept {len(ids)} of {n} training queries")
    print(f"wrote {args.out}; train on it: retrieval-prune train "
          + " ".join(f"--data {n}" for n in args.data) + f" --select {args.out} --out DIR")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from retrieval_prune.train import TrainConfig, train

    if Path(args.out).exists() and not args.overwrite:
        raise ValueError(f"--out {args.out} exists; pass --overwrite to replace it")
    cfg = TrainConfig(
        data=tuple(args.data), crisp=args.crisp, minutes=args.minutes, max_steps=args.steps,
        seed=args.seed, batch_size=args.batch_size, negatives=args.negatives, lr=args.lr,
        precision=args.precision, threads=args.threads, select=args.select, init=args.init,
    )
    res = train(cfg, args.out, progress=not args.quiet, overwrite=args.overwrite)
    losses = res.losses
    head = sum(losses[:20]) / max(len(losses[:20]), 1)
    tail = sum(losses[-20:]) / max(len(losses[-20:]), 1)
    print(f"{res.path}: {res.steps} steps in {res.seconds / 60:.1f} min (stopped by "
          f"{res.stopped_by}); loss {head:.3f} -> {tail:.3f} (mean of first / last 20 steps)")
    pipe = cfg.crisp_spec.plugin_spec if cfg.crisp_spec else "exact"
    print(f"evaluate: retrieval-prune eval --data scifact --checkpoint {res.path} "
          f"--pipeline exact" + (f" --pipeline '{pipe}'" if pipe != "exact" else ""))
    return 0


# -- index maintenance: add, delete, compact, inspect ---------------------------------
# Each opens the live generation (checksums verified), changes it in memory and writes a new
# generation with the crash-safe protocol of index/storage.py; any error is raised before the
# first byte is written, so a rejected command leaves the index as it was.
def cmd_add(args: argparse.Namespace) -> int:
    from retrieval_prune.data.documents import read_documents
    from retrieval_prune.retrieve import Retriever

    ids, texts, metas = read_documents(args.data)  # every record checked before any write
    retriever = Retriever.from_index(args.index, checkpoint=args.checkpoint, auto_compact=None)
    # the folder's write lock is held from here to the commit; a writer that committed since
    # from_index is merged in first, so neither writer's documents are lost
    with retriever.transaction(lock_timeout=args.lock_timeout) as tx:
        before = len(retriever.index)
        retriever.add(ids, texts, metas)  # duplicates / clashes raise before anything is written
    gen = tx.generation
    drift = getattr(retriever.index, "drift", None)
    report = {
        "index": str(args.index),
        "generation": gen.name,
        "added": len(ids),
        "documents": len(retriever.index),
        "documents_before": before,
        "drift": drift() if callable(drift) else None,
    }
    _print(report, args.json, f"added {len(ids)} documents to {args.index} ({gen.name}); "
           f"{report['documents']} live documents")
    d = report["drift"]
    if d and d.get("ratio") is not None and not args.json:
        from retrieval_prune.index.staged import DRIFT_MIN_TOKENS, DRIFT_WARN

        if d.get("rebuild_recommended"):
            verdict = " -> rebuild recommended"
        elif d["ratio"] > DRIFT_WARN:
            verdict = (f" (above {DRIFT_WARN}, but only {d['added_tokens']} vectors added; judged "
                       f"from {DRIFT_MIN_TOKENS})")
        else:
            verdict = " (ok)"
        print(f"codebook drift: added vectors quantize {d['ratio']:.3f}x as badly as the fit "
              f"data{verdict}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from retrieval_prune.index import storage
    from retrieval_prune.index.base import load_index

    ids = list(dict.fromkeys(str(i) for i in args.ids))
    with storage.write_lock(args.index, args.lock_timeout):  # read-modify-write, one writer
        index = load_index(args.index)
        index.delete(ids)  # unknown ids raise KeyError before anything is written
        meta = index.info.get("doc_metadata")
        if isinstance(meta, dict):
            for i in ids:
                meta.pop(i, None)
        gen = index.save(args.index)
    _print({"index": str(args.index), "generation": gen.name, "deleted": len(ids),
            "documents": len(index), "tombstones": index.n_positions - len(index)}, args.json,
           f"deleted {len(ids)} documents from {args.index} ({gen.name}); {len(index)} live, "
           f"{index.n_positions - len(index)} tombstones (run `retrieval-prune compact`)")
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    from retrieval_prune.index import storage
    from retrieval_prune.index.base import load_index

    with storage.write_lock(args.index, args.lock_timeout):  # read-modify-write, one writer
        index = load_index(args.index)
        dropped = index.n_positions - len(index)
        index.compact()
        gen = index.save(args.index)
    _print({"index": str(args.index), "generation": gen.name, "dropped": dropped,
            "documents": len(index)}, args.json,
           f"compacted {args.index} ({gen.name}): {dropped} tombstones dropped, "
           f"{len(index)} documents")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from retrieval_prune.index.inspect import format_inspect, inspect_index

    d = inspect_index(args.index, verify=not args.no_verify)
    print(json.dumps(d, indent=1) if args.json else format_inspect(d))
    return 0


def _print(obj: dict[str, Any], as_json: bool, text: str) -> None:
    print(json.dumps(obj) if as_json else text)


def _lock_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lock-timeout", type=float, default=None, metavar="SECONDS",
                   help="wait this long for another writer of the index (default "
                        "$RETRIEVAL_PRUNE_LOCK_TIMEOUT or 300)")


def add_index_parsers(sub: Any) -> None:
    """Register ``add``, ``delete``, ``compact`` and ``inspect`` on a subparsers object."""
    a = sub.add_parser("add", help="add documents to an index (encoded like the index)",
                       description="Encode documents with the index's encoder and token steps, "
                                   "code them with its codebook and write a new generation.")
    a.add_argument("index", metavar="INDEX")
    a.add_argument("--data", required=True, metavar="DIR_OR_JSONL",
                   help="BEIR folder (corpus.jsonl) or a .jsonl file of {_id, title, text}")
    a.add_argument("--checkpoint", default=None, metavar="CKPT",
                   help="checkpoint folder, for an index built with a trained checkpoint")
    _lock_arg(a)
    a.add_argument("--json", action="store_true", help="print a JSON report")
    a.set_defaults(func=cmd_add)

    d = sub.add_parser("delete", help="delete documents by id (tombstones)",
                       description="Tombstone documents by external id; `compact` drops them.")
    d.add_argument("index", metavar="INDEX")
    d.add_argument("ids", nargs="+", metavar="ID")
    _lock_arg(d)
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_delete)

    c = sub.add_parser("compact", help="rewrite an index without its tombstones",
                       description="Rewrite the index without deleted documents; ids survive.")
    c.add_argument("index", metavar="INDEX")
    _lock_arg(c)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_compact)

    i = sub.add_parser("inspect", help="print an index's spec, sizes, vectors and documents",
                       description="Describe the live generation of an index (checksums verified).")
    i.add_argument("index", metavar="INDEX")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.add_argument("--no-verify", action="store_true", help="check file sizes only (faster)")
    i.set_defaults(func=cmd_inspect)


# -- parser ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from retrieval_prune import __version__

    p = argparse.ArgumentParser(
        prog="retrieval-prune",
        description="Compressed multi-vector retrieval indexes: build, search, evaluate.",
    )
    p.add_argument("--version", action="version", version=f"retrieval-prune {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def data_args(sp: argparse.ArgumentParser, multiple: bool, required: bool = True) -> None:
        sp.add_argument("--data", action="append" if multiple else "store", required=required,
                        metavar="DIR_OR_NAME",
                        help="BEIR-layout folder, or a name under ../shared/data (or a BEIR "
                             "dataset to download)" + (" (repeatable)" if multiple else ""))
        sp.add_argument("--split", default="test", help="qrels split (default: test)")
        sp.add_argument("--checkpoint", default=None, metavar="CKPT",
                        help="ColBERT-style checkpoint folder, 'ft128' (the shipped fine-tuned "
                             "128-d encoder) or 'untrained-colbert'; default: zero-shot 384-d "
                             "MiniLM tokens")
        sp.add_argument("--max-docs", type=int, default=None,
                        help="keep the first N documents plus every judged one (quick runs)")

    e = sub.add_parser("eval", help="evaluate pipelines on datasets; print a table",
                       description="Evaluate pipelines on datasets against exact MaxSim.")
    data_args(e, multiple=True, required=False)
    e.add_argument("--config", metavar="TOML",
                   help="experiment file with `datasets = [...]` and `pipelines = [...]`")
    e.add_argument("--plot", metavar="PNG", help="write the compression-quality frontier plot")
    e.add_argument("--pipeline", action="append", metavar="SPEC",
                   help="pipeline spec, e.g. 'exact' or 'pool:factor=2' (repeatable; default exact)")
    e.add_argument("--json", metavar="PATH", help="write the rows as a JSON array")
    e.add_argument("--markdown", metavar="PATH", help="write the table as Markdown")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    e.set_defaults(func=cmd_eval)

    tn = sub.add_parser(
        "tune", help="find the pipeline for a size / latency / loss budget (no judgements)",
        description="Successive-halving search of index pipelines for a budget. Loss is "
                    "estimated as disagreement with exact MaxSim of the same encoder on sample "
                    "queries (pseudo-judgements), so no qrels are read; check the answer with "
                    "`retrieval-prune eval`.")
    tn.add_argument("--data", required=True, metavar="DIR_OR_NAME",
                    help="BEIR-layout folder or name, a .jsonl file of documents, or an "
                         "embedding set")
    tn.add_argument("--checkpoint", default=None, metavar="CKPT",
                    help="encoder checkpoint folder or shipped name (default zero-shot)")
    tn.add_argument("--max-loss", type=float, default=None, metavar="L",
                    help="relative nDCG@10 loss against exact MaxSim (0.01 = 1%%): the smallest "
                         "index within it is chosen")
    tn.add_argument("--max-bytes-per-doc", type=float, default=None, metavar="B")
    tn.add_argument("--max-ms", type=float, default=None, metavar="M",
                    help="search p50 at k=100, one query at a time")
    tn.add_argument("--pipeline", action="append", metavar="SPEC",
                    help="a candidate spec (repeatable; default: the built-in grid)")
    tn.add_argument("--candidates", metavar="FILE", help="candidate specs, one per line")
    tn.add_argument("--queries", choices=["corpus", "log"], default="corpus",
                    help="sample queries: pseudo-queries cut from the documents (default) or "
                         "the collection's own query texts (their judgements are never read)")
    tn.add_argument("--queries-n", type=int, default=100, metavar="N",
                    help="sample queries (default 100)")
    tn.add_argument("--eta", type=int, default=3, help="halving factor (default 3)")
    tn.add_argument("--min-docs", type=int, default=300, metavar="N",
                    help="documents in the first rung's sample (default 300)")
    tn.add_argument("--seed", type=int, default=0)
    tn.add_argument("--json", metavar="PATH", help='write {"chosen", "frontier", "tried", ...}')
    tn.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    tn.set_defaults(func=cmd_tune)

    b = sub.add_parser("build", help="encode a collection and write an index",
                       description="Encode a collection and write a compressed index folder.")
    data_args(b, multiple=False)
    b.add_argument("--out", required=True, metavar="INDEX", help="index folder to write")
    b.add_argument("--pipeline", default="exact", metavar="SPEC", help="pipeline spec (default exact)")
    b.add_argument("--max-memory-mb", type=float, default=None, metavar="N",
                   help="stream the build: encode, prune and code the corpus a block at a time so "
                        "that memory stays near N MiB besides the encoder (needs a codec)")
    b.add_argument("--encoder-precision", choices=["float32", "int8", "int8-onnx"],
                   default="float32",
                   help="query encoder: int8-onnx is ONNX Runtime int8 (2.8x faster queries "
                        "on SciFact, -0.003 nDCG@10); recorded in the index, so search and "
                        "serve use it and refuse another; documents stay float32")
    b.add_argument("--shards", type=int, default=None, metavar="N",
                   help="write a sharded index of N shards sharing one codebook (searched exactly, "
                        "as one index); an interrupted build resumes when run again")
    b.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="where a sharded build's encode and shard tasks run (default local: this "
                        "process; ray needs pip install -e '.[ray]')")
    b.add_argument("--address", default=None, metavar="ADDR",
                   help="Ray cluster to use (default: start a local one; 'auto': the running one)")
    b.add_argument("--workers", type=int, default=None, metavar="N",
                   help="Ray encoder actors (default: one per CPU of the cluster)")
    b.add_argument("--block-docs", type=int, default=256, metavar="N",
                   help="documents per encode block of a sharded build (default 256)")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    b.set_defaults(func=cmd_build)

    s = sub.add_parser("search", help="search an index with a text query",
                       description="Search an index with one or more text queries.")
    s.add_argument("index", metavar="INDEX")
    s.add_argument("--query", action="append", required=True, metavar="TEXT")
    s.add_argument("-k", type=int, default=10, help="results per query (default 10)")
    s.add_argument("--json", action="store_true", help='print [{"id": ..., "score": ...}]')
    s.add_argument("--checkpoint", default=None, metavar="CKPT",
                   help="checkpoint folder, for an index built with a trained checkpoint")
    s.add_argument("--address", default=None, metavar="ADDR",
                   help="search a sharded index on Ray, one actor per shard ('local': start a "
                        "local cluster; 'auto': the running one)")
    s.set_defaults(func=cmd_search)

    t = sub.add_parser("train", help="fine-tune the ColBERT-style encoder (optionally CRISP)",
                       description="Contrastive MaxSim fine-tuning (in-batch + hard negatives) "
                                   "of MiniLM + a 128-d projection on train pairs; writes a "
                                   "safetensors checkpoint that carries its training config.")
    t.add_argument("--data", action="append", required=True, metavar="NAME",
                   help="training collection: its qrels/train.tsv (scifact) or 'squad' "
                        "(question -> paragraph); repeatable; never a test split")
    t.add_argument("--out", required=True, metavar="CKPT", help="checkpoint folder to write")
    t.add_argument("--crisp", default=None, metavar="QxD|P%",
                   help="CRISP in the loop: fixed clusters per query x document (8x32, 4x8) "
                        "or a fraction of each sequence's tokens (25%%, 50%%)")
    t.add_argument("--minutes", type=float, default=45.0,
                   help="wall-clock budget for the whole run; stops cleanly and saves (default 45)")
    t.add_argument("--steps", type=int, default=600, help="optimizer steps (default 600)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch-size", type=int, default=16, help="queries per step (default 16)")
    t.add_argument("--negatives", type=int, default=1,
                   help="hard negatives per query, besides in-batch ones (default 1)")
    t.add_argument("--lr", type=float, default=3e-5, help="backbone learning rate (default 3e-5)")
    t.add_argument("--precision", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="autocast precision of forward/backward (weights stay float32); auto: "
                        "bfloat16 on CPUs with native bf16 (AVX512-BF16/AMX), else float32")
    t.add_argument("--threads", type=int, default=None, help="torch threads (default: all usable)")
    t.add_argument("--init", default=None, metavar="CKPT",
                   help="start from this checkpoint (folder or ft128) instead of MiniLM; its "
                        "masked sparse tensors (gmp) stay masked: a masked recovery run")
    t.add_argument("--select", default=None, metavar="FILE.json|STEPS",
                   help="train on a selection of the pairs: a file from 'preprocess --data' "
                        "or a data-step spec (e.g. 'semdedup:eps=0.05')")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    t.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    bn = sub.add_parser("bench", help="benchmarks (kernels; plaid: against colbert-ai PLAID; "
                                      "peers: PLAID, fast-plaid and xtr-warp-rs)",
                        description="Benchmarks: 'kernels' against this machine's own roofs; "
                                    "'plaid' against colbert-ai's PLAID on the same vectors "
                                    "(needs pip install -e '.[plaid]'); 'peers' adds the Rust "
                                    "peers fast-plaid and xtr-warp-rs, each in a worker "
                                    "process of their own environment (make peers).")
    bn.add_argument("what", choices=["kernels", "plaid", "peers"])
    bn.add_argument("--json", metavar="PATH")
    bn.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                    help="thread counts (plaid: latency at each; the first is the headline)")
    bn.add_argument("--n-docs", type=int, default=10_000, help="kernels: synthetic documents")
    bn.add_argument("--data", metavar="NAME", help="plaid: dataset name or folder (scifact)")
    bn.add_argument("--checkpoint", default=None, metavar="CKPT",
                    help="plaid: checkpoint whose cached vectors both engines index")
    bn.add_argument("--split", default="test", help="plaid: qrels split (default test)")
    from retrieval_prune.evaluation.bench_plaid import add_arguments as _plaid_args

    _plaid_args(bn, with_data=False)
    bn.add_argument("--timer", choices=["wall", "cpu"], default="wall",
                    help="wall clock (quiet machine) or process CPU time (busy machine; "
                         "exact for one thread)")
    bn.add_argument("-q", "--quiet", action="store_true")
    bn.set_defaults(func=cmd_bench)

    try:
        from retrieval_prune.retrieve.server import add_serve_parser
    except ImportError:  # the server's optional dependencies are not installed
        add_serve_parser = None
    if add_serve_parser is not None:
        add_serve_parser(sub)

    add_index_parsers(sub)  # add, delete, compact, inspect

    pp = sub.add_parser(
        "preprocess",
        help="apply data/model/table steps: select training pairs, or write a new checkpoint",
        description="Model and table steps (gmp, dare, vocabtrim, ...) turn --checkpoint "
                    "(default: the zero-shot MiniLM) into a new checkpoint folder --out; data "
                    "steps (semdedup, dbp, ccs, ...) select training pairs of --data into a "
                    "JSON file --out that 'train --select FILE' trains on.",
    )
    pp.add_argument("--checkpoint", default=None, metavar="CKPT",
                    help="source encoder: a checkpoint folder or a shipped name (ft128); "
                         "default zero-shot")
    pp.add_argument("--pipeline", required=True, metavar="STEPS",
                    help="data steps, or model/table steps, e.g. 'gmp:sparsity=0.5' or "
                         "'dare:p=0.99'")
    pp.add_argument("--data", action="append", metavar="NAME",
                    help="training collection(s): calibration pairs/texts (repeatable)")
    pp.add_argument("--base", default=None, metavar="FOLDER",
                    help="base model of a fine-tuned checkpoint (dare); default the installed "
                         "MiniLM")
    pp.add_argument("--scores-from", default=None, metavar="CKPT",
                    help="data steps that need difficulty scores (ccs): the full-data checkpoint "
                         "(a folder or a shipped name: ft128)")
    pp.add_argument("--steps", type=int, default=0,
                    help="optimizer steps of steps that train (loraprune), over --data's pairs")
    pp.add_argument("--seed", type=int, default=0, help="batch order of those steps")
    pp.add_argument("--merge-with", action="append", metavar="CKPT",
                    help="further fine-tunes of the same base for dare_merge (repeatable)")
    pp.add_argument("--minutes", type=float, default=None, metavar="M",
                    help="wall-clock budget; a training step that runs out stops early at its "
                         "final widths and reports the steps it took (default: none)")
    pp.add_argument("--out", required=True, metavar="DIR|FILE.json")
    pp.add_argument("--overwrite", action="store_true")
    pp.add_argument("-q", "--quiet", action="store_true")
    pp.set_defaults(func=cmd_preprocess)

    pl = sub.add_parser("plugins", help="list registered components and their parameters")
    pl.add_argument("--stage", default=None, choices=["data", "model", "table", "tokens",
                                                       "codec", "index"])
    pl.set_defaults(func=cmd_plugins)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if getattr(args, "k", 1) is not None and getattr(args, "k", 1) <= 0:
        parser.error(f"-k {args.k}: k must be >= 1")
    try:
        return int(args.func(args) or 0)
    except TimeoutError as exc:  # another writer held the index's lock past --lock-timeout
        print(f"retrieval-prune {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, TypeError,
            ImportError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"retrieval-prune {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
