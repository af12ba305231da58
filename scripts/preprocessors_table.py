#!/usr/bin/env python
"""Rows of ``eval/results/preprocessors_scifact.{json,md}`` (issue #13): each preprocessed
encoder (a checkpoint written by ``retrieval-prune preprocess`` or ``train --select``) beside
its source encoder, on SciFact and out of domain.

Per row and collection: exact-MaxSim nDCG@10 and R@100 of the row's encoder, its delta to the
source's exact MaxSim, and the top-10 overlap with the source's exact run (no qrels needed).
Per row: checkpoint and weights bytes, delta bytes (delta checkpoints), word-table rows,
non-zero / total parameters, query-encode p50 at one thread measured interleaved with the
source (query by query, ``--latency-queries``), ``query_encode_speedup`` = source p50 / row
p50, document-encode ms per document, and the preprocess / training minutes from the
checkpoint's metadata. Rows are merged into ``--json`` by ``(pipeline, source, label)`` so
the table grows run by run; the .md is rewritten from the JSON each time.

Usage::

    python scripts/preprocessors_table.py --source .cache/checkpoints/ft128 \\
        --row .cache/pre/ft128-dare-p0.99-s0 --data scifact --ood cranfield --ood med --ood cisi
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval_prune.atomic import atomic_write_json  # noqa: E402
from retrieval_prune.encode import Encoder  # noqa: E402
from retrieval_prune.encode.checkpoint import read_config, resolve_checkpoint  # noqa: E402
from retrieval_prune.evaluation.runner import _top10, load_context  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "eval" / "results"


def _load(ckpt: str | None) -> Encoder:
    return Encoder.load(None if ckpt in (None, "zero-shot") else ckpt, num_threads=1)


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _model_facts(enc: Encoder, ckpt: str | None) -> dict[str, Any]:
    sd = enc.model.state_dict()
    total = sum(v.numel() for v in sd.values())
    nonzero = sum(int((v != 0).sum()) for v in sd.values())
    facts: dict[str, Any] = {
        "params_total": int(total),
        "params_nonzero": int(nonzero),
        "table_rows": _table_rows(enc),
        "checkpoint_bytes": None,
        "weights_bytes": None,
        "delta_bytes": None,
    }
    if ckpt not in (None, "zero-shot"):
        folder = resolve_checkpoint(ckpt)
        cfg = read_config(folder)
        w = (folder / "model.safetensors").stat().st_size
        facts["checkpoint_bytes"] = _folder_bytes(folder)
        facts["weights_bytes"] = w
        if (cfg.get("storage") or {}).get("kind") == "delta":
            facts["delta_bytes"] = w
        meta = cfg.get("metadata") or {}
        pre = meta.get("preprocess") or {}
        tr = meta.get("training") or {}
        facts["prepare_minutes"] = round(pre.get("seconds", 0.0) / 60, 3) if pre else None
        facts["train_minutes"] = round(tr.get("seconds", 0.0) / 60, 2) if tr else None
        facts["train_threads"] = tr.get("threads")
        sel = tr.get("selection")
        facts["pairs_kept"] = (sel or {}).get("kept_pairs") if sel else None
        facts["pipeline"] = pre.get("pipeline") or ((sel or {}).get("spec") if sel else None)
        prior, chain = pre.get("after"), []
        while prior:  # preprocess run on a preprocessed checkpoint: the whole chain
            chain.insert(0, prior.get("pipeline", "?"))
            prior = prior.get("after")
        if chain and facts["pipeline"]:
            facts["pipeline"] = " | ".join([*chain, facts["pipeline"]])
        init = (tr.get("config") or {}).get("init")
        if init and not pre:  # a recovery run: the step it recovers, then the recipe
            src_pre = (read_config(resolve_checkpoint(init)).get("metadata") or {}).get(
                "preprocess") or {}
            facts["pipeline"] = (f"{src_pre.get('pipeline', init)} + recovery "
                                 f"({tr.get('steps')} steps)")
            facts["stage"] = "model"
    return facts


def _interleaved_p50(src: Encoder, row: Encoder, texts: list[str]) -> tuple[float, float]:
    import torch

    torch.set_num_threads(1)
    for enc in (src, row):
        enc.num_threads = 1
        enc.encode_queries(texts[:4], progress=False)
    ts: dict[int, list[float]] = {0: [], 1: []}
    for i, t in enumerate(texts):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for j in order:
            enc = src if j == 0 else row
            t0 = time.perf_counter()
            enc.encode_queries([t], progress=False)
            ts[j].append((time.perf_counter() - t0) * 1e3)
    return float(np.median(ts[0])), float(np.median(ts[1]))


def _table_rows(enc: Encoder) -> int:
    return int(enc.model.backbone.embeddings.word_embeddings.weight.shape[0])


def _token_change(src: Encoder, row: Encoder, queries: list[str]) -> float:
    """Share of the test queries whose query-path pieces change under the row's tokenizer
    (a held-out report, not tuning)."""
    from retrieval_prune.preprocess.table import query_token_change_share

    return query_token_change_share(src.model, row.model, row.spec, queries)


def refresh_token_change(doc: dict[str, Any], data: str) -> int:
    """Fill ``test_queries_tokens_changed`` of rows whose vocabulary differs from their
    source's, measured before it was recorded (their checkpoints and sources must still be on
    disk); returns how many rows were filled."""
    from retrieval_prune.data.beir import load_beir, resolve_dataset

    queries = list(load_beir(resolve_dataset(data), split="test").judged_queries()[1])
    n, sources = 0, {}
    for r in doc["rows"]:
        if r.get("test_queries_tokens_changed") is not None or not Path(r["checkpoint"]).is_dir():
            continue
        key = (r["source"], r.get("source_sha256"))
        if key not in sources:
            sources[key] = _source_on_disk(r)
        if sources[key] is None:
            print(f"{r['label']!r}: its source {r['source']} ({str(key[1])[:8]}) is not on "
                  "disk; left without the token-change share")
            continue
        if r["table_rows"] != _table_rows(sources[key]):  # only a new vocabulary can re-split
            r["test_queries_tokens_changed"] = _token_change(
                sources[key], _load(r["checkpoint"]), queries)
            n += 1
    return n


def _weights_sha(folder: Path) -> str:
    """The sha256 of a checkpoint's weights, as its config records it (what rows name)."""
    return str(read_config(folder)["weights_sha256"])


def _source_on_disk(row: dict[str, Any]) -> Encoder | None:
    """The encoder a row was measured against, if the one on disk is still it."""
    if row["source"] == "zero-shot":
        return _load(None)
    path = Path(".cache/checkpoints") / row["source"]
    if not path.is_dir() or _weights_sha(path) != row.get("source_sha256"):
        return None
    return _load(str(path))


def _doc_ms(enc: Encoder, texts: list[str]) -> float:
    import torch

    torch.set_num_threads(1)
    enc.num_threads = 1
    enc.encode_documents(texts[:8], progress=False)
    t0 = time.perf_counter()
    enc.encode_documents(texts, progress=False)
    return (time.perf_counter() - t0) * 1e3 / len(texts)


def _quality(name: str, src: Encoder, row: Encoder) -> dict[str, float]:
    src.num_threads = row.num_threads = None  # corpus encoding: every usable core
    sctx = load_context(name, lambda: src)
    rctx = load_context(name, lambda: row)
    ov = []
    for q in sctx.qids:
        a = set(_top10(sctx.exact_run.get(q, {})))
        b = set(_top10(rctx.exact_run.get(q, {})))
        ov.append(len(a & b) / max(len(a), 1))
    return {
        "ndcg@10": rctx.exact_metrics["ndcg@10"],
        "recall@100": rctx.exact_metrics["recall@100"],
        "source_ndcg@10": sctx.exact_metrics["ndcg@10"],
        "delta_ndcg@10": rctx.exact_metrics["ndcg@10"] - sctx.exact_metrics["ndcg@10"],
        "top10_overlap": float(np.mean(ov)),
    }


def measure(source: str | None, ckpt: str, data: str, ood: list[str], n_lat: int,
            label: str | None) -> dict[str, Any]:
    from retrieval_prune.data.beir import load_beir, resolve_dataset

    src, row = _load(source), _load(ckpt)
    facts = _model_facts(row, ckpt)
    cfg = read_config(resolve_checkpoint(ckpt)) if ckpt not in (None, "zero-shot") else {}
    pre = (cfg.get("metadata") or {}).get("preprocess") or {}
    reports = pre.get("reports") or []
    stage = facts.pop("stage", None) or (
        reports[-1]["stage"] if reports else ("data" if facts.get("pipeline") else "source"))
    out: dict[str, Any] = {
        "label": label or Path(str(ckpt)).name,
        "stage": stage,
        "pipeline": facts.pop("pipeline", None) or "none",
        "source": "zero-shot" if source in (None, "zero-shot") else Path(str(source)).name,
        "source_sha256": None if source in (None, "zero-shot") else _weights_sha(
            resolve_checkpoint(source)),
        "checkpoint": str(ckpt),
        **facts,
        "reports": reports,
    }
    q = _quality(data, src, row)
    out.update(q)
    for name in ood:
        for k, v in _quality(name, src, row).items():
            out[f"{name}:{k}"] = v
    corpus = load_beir(resolve_dataset(data), split="test")
    _, qtexts = corpus.judged_queries()
    texts = (list(qtexts) * (1 + n_lat // max(len(qtexts), 1)))[:n_lat]
    if facts["table_rows"] != _table_rows(src):  # only a new vocabulary can re-split queries
        out["test_queries_tokens_changed"] = _token_change(src, row, list(qtexts))
    s50, r50 = _interleaved_p50(src, row, texts)
    out["source_query_encode_p50_ms"] = s50
    out["query_encode_p50_ms"] = r50
    out["query_encode_speedup"] = s50 / r50
    out["doc_encode_ms_per_doc"] = _doc_ms(row, list(corpus.doc_texts[:96]))
    out["latency_queries"] = len(texts)
    out["threads"] = 1
    return out


def selection_facts(path: str) -> dict[str, Any]:
    """The facts of a selection file (``preprocess --data ... --out FILE.json``) for the
    data-selections table."""
    from retrieval_prune.train.select import INPUTS_KEY

    doc = json.loads(Path(path).read_text())
    rep = doc["report"]
    inputs = (rep.get("details") or {}).get(INPUTS_KEY) or {}
    return {
        "file": str(path),
        "spec": doc["spec"],
        "counts": doc["counts"],
        "aliases": {k: len(v) for k, v in (doc.get("aliases") or {}).items()},
        "seconds": float(rep.get("seconds", 0.0)),
        "embedding_seconds": float(inputs.get("embedding_seconds", 0.0)),
        "scoring_seconds": float(inputs.get("scoring_seconds", 0.0)),
    }


def composition(source: str | None, ckpt: str, data: str, spec: str, n_warm: int = 10
                ) -> dict[str, Any]:
    """The composed encoder under an index pipeline (``default``) beside the source under the
    same pipeline: nDCG@10, bytes per document, search-only p50, and end-to-end p50 at k=10
    (query text in: tokenise + encode + search, one thread), both interleaved query by query
    over every judged query."""
    import shutil

    from retrieval_prune.evaluation.bench_plaid import OurEngine, _interleaved

    scratch = Path(".cache") / "composition"
    engines, out = [], {}
    text_of = dict(zip(*_judged(data), strict=True))
    for name, ck in (("source", source), ("row", ckpt)):
        enc = _load(ck)
        enc.num_threads = None  # corpus encoding (cached after the first run): every core
        ctx = load_context(data, lambda enc=enc: enc)
        e = OurEngine(ctx, spec, scratch / name, checkpoint=ck)
        e.open()
        enc.num_threads = 1
        e.encoder = enc
        e.texts = [text_of[q] for q in ctx.qids]
        engines.append(e)
        out[name] = {k: e.row[k] for k in ("ndcg@10", "recall@100", "bytes_per_doc",
                                           "vectors_per_doc", "p50_ms")}
    n = len(engines[0].texts)

    def search(e: Any, qi: int, k: int) -> list:
        return e.search(qi, k)

    def e2e(e: Any, qi: int, k: int) -> list:
        return e.search_encoded(e.encoder.encode_queries([e.texts[qi]], progress=False), k)

    s_stats, _ = _interleaved(engines, n, search, ks=(10,), threads=1, warmup=n_warm,
                              progress=True, desc="search")
    e_stats, _ = _interleaved(engines, n, e2e, ks=(10,), threads=1, warmup=n_warm,
                              progress=True, desc="end-to-end")
    for i, name in enumerate(("source", "row")):
        out[name]["search_p50_ms_k10"] = s_stats[i]["10"]["p50_ms"]
        out[name]["e2e_p50_ms_k10"] = e_stats[i]["10"]["p50_ms"]
    for e in engines:
        e.close()
    shutil.rmtree(scratch, ignore_errors=True)
    return {
        "pipeline": spec,
        "queries": n,
        "threads": 1,
        "source": out["source"],
        "row": out["row"],
        "e2e_speedup_k10": out["source"]["e2e_p50_ms_k10"] / out["row"]["e2e_p50_ms_k10"],
        "delta_ndcg@10": out["row"]["ndcg@10"] - out["source"]["ndcg@10"],
    }


def _judged(data: str) -> tuple[list[str], list[str]]:
    from retrieval_prune.data.beir import load_beir, resolve_dataset

    return load_beir(resolve_dataset(data), split="test").judged_queries()


def _cell(text: str) -> str:
    """A spec in a Markdown table cell: chained steps' ``|`` escaped."""
    return str(text).replace("|", "\\|")


def write_md(rows: list[dict[str, Any]], path: Path, ood: list[str], commands: list[str],
             notes: list[str] | None = None, selections: list[dict[str, Any]] | None = None,
             near_dups: dict[str, Any] | None = None) -> None:
    head = ["label", "stage", "pipeline", "source", "ndcg@10", "delta_ndcg@10", "recall@100",
            "top10_overlap", *[f"{o}:delta_ndcg@10" for o in ood], "weights MB", "delta MB",
            "nonzero/total", "rows", "q tok changed", "q p50 ms", "speedup", "doc ms", "pairs",
            "minutes"]
    lines = ["# Data, model and table preprocessors (issue #13)", "",
             "Exact MaxSim (no index compression) of each preprocessed encoder beside its "
             "source; deltas are against the source's exact MaxSim on the same collection. "
             "Query-encode p50 at one thread, interleaved query by query with the source "
             "(named with the first 8 hex digits of its weights' sha256). "
             "pairs: training queries kept by a data step; minutes: the preprocess step's "
             "(model/table rows) or the training run's (data rows).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(v, nd=4):
        if v is None:
            return "-"
        return f"{v:.{nd}f}" if isinstance(v, float) else str(v)

    stage_order = {"source": 0, "data": 1, "model": 2, "table": 3}
    for r in sorted(rows, key=lambda r: stage_order.get(r["stage"], len(stage_order))):
        src = r["source"] + (f" ({r['source_sha256'][:8]})" if r.get("source_sha256") else "")
        cells = [r["label"], r["stage"], f"`{_cell(r['pipeline'])}`", src, f(r["ndcg@10"]),
                 f"{r['delta_ndcg@10']:+.4f}", f(r["recall@100"]), f(r["top10_overlap"], 3),
                 *[f"{r[f'{o}:delta_ndcg@10']:+.4f}" if f"{o}:delta_ndcg@10" in r else "-"
                   for o in ood],
                 f((r["weights_bytes"] or 0) / 1e6, 2),
                 f(r["delta_bytes"] / 1e6, 2) if r.get("delta_bytes") else "-",
                 f"{r['params_nonzero'] / r['params_total']:.3f}", str(r["table_rows"]),
                 f(r.get("test_queries_tokens_changed"), 3),
                 f(r["query_encode_p50_ms"], 2), f(r["query_encode_speedup"], 2),
                 f(r["doc_encode_ms_per_doc"], 2), f(r.get("pairs_kept")),
                 f(r.get("prepare_minutes") if r.get("prepare_minutes") is not None
                   else r.get("train_minutes"), 1)]
        lines.append("| " + " | ".join(cells) + " |")
    comp = [r for r in rows if r.get("composition")]
    if comp:
        lines += ["", "## Composition under an index pipeline (end to end, one thread)", "",
                  "The composed encoder and its source, each under the same index pipeline "
                  "over the whole collection; search-only and end-to-end (query text in: "
                  "tokenise, encode, search) p50 at k=10, interleaved query by query.", "",
                  "| label | pipeline | index | encoder | nDCG@10 | delta | B/doc | search p50 ms "
                  "| e2e p50 ms | e2e speedup |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in comp:
            c = r["composition"]
            for who, enc in (("source", r["source"]), ("row", r["label"])):
                x = c[who]
                lines.append(
                    f"| {r['label']} | `{_cell(r['pipeline'])}` | `{_cell(c['pipeline'])}` | "
                    f"{enc} | "
                    f"{x['ndcg@10']:.4f} | "
                    + (f"{c['delta_ndcg@10']:+.4f}" if who == "row" else "-")
                    + f" | {x['bytes_per_doc']:.0f} | {x['search_p50_ms_k10']:.2f} | "
                    f"{x['e2e_p50_ms_k10']:.2f} | "
                    + (f"{c['e2e_speedup_k10']:.2f}" if who == "row" else "1.00") + " |")
    if selections:
        lines += ["", "## Data selections", "",
                  "What each data step kept of the training pairs (per collection), its aliases "
                  "(removed near-duplicates -> the kept one) and the minutes its inputs took: "
                  "zero-shot pair embeddings in that run (near 0 when the embedding cache "
                  "had them), EL2N scoring with the full-data checkpoint (the scoring's own "
                  "minutes, also when cached).", "",
                  "| spec | collection | queries | kept | removed share | aliases | "
                  "select s | embedding min | scoring min |", "|---|---|---|---|---|---|---|---|---|"]
        for sel in selections:
            for name, c in sel["counts"].items():
                lines.append(
                    f"| `{_cell(sel['spec'])}` | {name} | {c['queries']} | {c['kept']} | "
                    f"{1 - c['kept'] / max(c['queries'], 1):.4f} | "
                    f"{sel['aliases'].get(name, 0)} | {sel['seconds']:.1f} | "
                    f"{sel['embedding_seconds'] / 60:.1f} | {sel['scoring_seconds'] / 60:.1f} |")
    if near_dups:
        eps = sorted({k for v in near_dups.values() for k in v if k.startswith("eps=")})
        lines += ["", "## Near-duplicate share of each corpus (diagnostic only)", "",
                  "Share of documents with another document at cosine > 1 - eps (zero-shot "
                  "mean document vectors, exact all pairs); nothing is removed.", "",
                  "| corpus | docs | " + " | ".join(eps) + " |", "|---|---|" + "---|" * len(eps)]
        for name, v in sorted(near_dups.items()):
            lines.append(f"| {name} | {v['docs']} | "
                         + " | ".join(f"{v.get(e, float('nan')):.4f}" for e in eps) + " |")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", "Reproduce (each row):", "", "```", *commands, "```", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default=None, help="source checkpoint (default zero-shot)")
    ap.add_argument("--row", action="append", default=[], metavar="CKPT")
    ap.add_argument("--label", action="append", default=None)
    ap.add_argument("--data", default="scifact")
    ap.add_argument("--ood", action="append", default=[])
    ap.add_argument("--latency-queries", type=int, default=200)
    ap.add_argument("--json", default=str(RESULTS / "preprocessors_scifact.json"))
    ap.add_argument("--md", default=str(RESULTS / "preprocessors_scifact.md"))
    ap.add_argument("--command", action="append", default=[],
                    help="the command that made each row (recorded in the .md)")
    ap.add_argument("--note", action="append", default=[],
                    help="a finding to list under the table (recorded in the JSON)")
    ap.add_argument("--composition", default=None, metavar="PIPELINE",
                    help="also build PIPELINE (e.g. default) over --data with each --row and "
                         "the source, and time them end to end (the composition row)")
    ap.add_argument("--selection", action="append", default=[], metavar="FILE.json",
                    help="record a data step's selection file in the data-selections table")
    ap.add_argument("--near-duplicates", action="append", default=[], metavar="NAME",
                    help="record a corpus's near-duplicate share (eps 0.05/0.10; diagnostic)")
    ap.add_argument("--refresh-token-change", action="store_true",
                    help="fill the test-query token-change share of table rows measured "
                         "before it was recorded (tokenisation only)")
    args = ap.parse_args(argv)
    path = Path(args.json)

    def read() -> dict[str, Any]:  # re-read before each write: several runs may share it
        return json.loads(path.read_text()) if path.is_file() else {"rows": [], "commands": []}

    for i, ckpt in enumerate(args.row):
        label = args.label[i] if args.label and i < len(args.label) else None
        row = measure(args.source, ckpt, args.data, args.ood, args.latency_queries, label)
        if args.composition:
            row["composition"] = composition(args.source, ckpt, args.data, args.composition)
        doc = read()
        key = (row["label"], row["source"])
        same = [i for i, r in enumerate(doc["rows"]) if (r["label"], r["source"]) == key]
        if same:  # a re-measured row keeps its place in the table
            doc["rows"][same[0]] = row
        else:
            doc["rows"].append(row)
        print(json.dumps({k: row[k] for k in ("label", "pipeline", "ndcg@10", "delta_ndcg@10",
                                              "top10_overlap", "weights_bytes",
                                              "query_encode_speedup")}))
        atomic_write_json(path, doc, indent=1)
    doc = read()
    if args.refresh_token_change:
        print(f"token change filled in {refresh_token_change(doc, args.data)} rows")
    for f in args.selection:
        fact = selection_facts(f)
        doc["selections"] = [x for x in doc.get("selections", [])
                             if x["spec"] != fact["spec"]] + [fact]
    for name in args.near_duplicates:
        from retrieval_prune.train.select import corpus_near_duplicates

        doc.setdefault("near_duplicates", {})[name] = corpus_near_duplicates(name)
    doc["commands"] = list(dict.fromkeys(doc.get("commands", []) + args.command))
    doc["notes"] = list(dict.fromkeys(doc.get("notes", []) + args.note))
    atomic_write_json(path, doc, indent=1)
    ood = sorted({k.split(":")[0] for r in doc["rows"] for k in r if k.endswith(":delta_ndcg@10")})
    write_md(doc["rows"], Path(args.md), ood, doc["commands"], doc.get("notes"),
             doc.get("selections"), doc.get("near_duplicates"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
