"""Where one query's encoding time goes: p50 per part over SciFact test queries, one thread.

Each query is encoded alone with ``Encoder.encode_queries([text])`` (the serving path) while
forward hooks and wrappers stamp the clock at every boundary; the parts partition that call:

- ``setup``: the encoder's own bookkeeping before tokenising (thread context, lengths, order)
- ``tokenise``: text -> token ids (``TextTokenizer.queries``)
- ``collate``: ids -> padded int64 tensors
- ``pre_model``: model call up to the embeddings (Hugging Face prologue, token types)
- ``embeddings``: word + position + type embeddings and LayerNorm
- ``mask_prep``: the attention mask the layers get
- ``layer_0`` .. ``layer_5``: each transformer layer
- ``head``: projection (ColBERT), L2 normalisation and the vector mask
- ``output``: tensors -> numpy -> ``MultiVectors``

``python_overhead`` adds the parts that are not model arithmetic (setup, collate,
pre_model, mask_prep, output). A second, uninstrumented ``encode_queries`` of the same query
(interleaved) gives ``e2e`` and shows what the stamps themselves cost.

Example::

    .venv/bin/python scripts/query_encoder_profile.py --n 300 --precision float32 int8
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from retrieval_prune.data import load_beir
from retrieval_prune.encode import Encoder
from retrieval_prune.encode import encoder as encoder_module

PARTS_MODEL = ["pre_model", "embeddings", "mask_prep"]


class Stamps:
    """Ordered (label, time) marks of one call."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float]] = []

    def mark(self, label: str) -> None:
        self.marks.append((label, time.perf_counter()))


def instrument(enc: Encoder, stamps: Stamps) -> list:
    """Hooks and wrappers that stamp the boundaries of one ``encode_queries`` call."""
    model = getattr(enc, "_query_model", enc.model)  # older encoders: no int8 copy
    bb = getattr(model, "backbone", None)
    handles = []

    def pre(label):
        return lambda *_: stamps.mark(label)

    def post(label):
        return lambda *_: stamps.mark(label)

    handles.append(model.register_forward_pre_hook(pre("model_start")))
    if bb is not None:  # an ONNX Runtime session is one opaque call
        handles.append(bb.embeddings.register_forward_pre_hook(pre("emb_start")))
        handles.append(bb.embeddings.register_forward_hook(post("emb_end")))
        for i, layer in enumerate(bb.encoder.layer):
            handles.append(layer.register_forward_pre_hook(pre(f"layer_{i}_start")))
            handles.append(layer.register_forward_hook(post(f"layer_{i}_end")))
    handles.append(model.register_forward_hook(post("model_end")))

    tok = enc._tok
    orig_queries = tok.queries

    def queries(texts):
        stamps.mark("tok_start")
        out = orig_queries(texts)
        stamps.mark("tok_end")
        return out

    tok.queries = queries
    orig_collate = encoder_module.collate

    def collate(*a, **k):
        stamps.mark("collate_start")
        out = orig_collate(*a, **k)
        stamps.mark("collate_end")
        return out

    encoder_module.collate = collate

    def undo() -> None:
        for h in handles:
            h.remove()
        del tok.queries
        encoder_module.collate = orig_collate

    return [undo]


def parts_of(marks: dict[str, float], t0: float, t1: float, n_layers: int) -> dict[str, float]:
    ms = 1e3
    out = {
        "setup": marks["tok_start"] - t0,
        "tokenise": marks["tok_end"] - marks["tok_start"],
        "collate": marks["collate_end"] - marks["collate_start"],
    }
    if "emb_start" in marks:
        out["pre_model"] = marks["emb_start"] - marks["model_start"]
        out["embeddings"] = marks["emb_end"] - marks["emb_start"]
        out["mask_prep"] = marks["layer_0_start"] - marks["emb_end"]
        for i in range(n_layers):
            out[f"layer_{i}"] = marks[f"layer_{i}_end"] - marks[f"layer_{i}_start"]
        out["head"] = marks["model_end"] - marks[f"layer_{n_layers - 1}_end"]
    else:  # ONNX Runtime: the whole model is one session call (inputs to numpy included)
        out["onnx_session"] = marks["model_end"] - marks["model_start"]
    out["output"] = t1 - marks["model_end"]
    # the gaps between the marked regions (tok_end -> collate_start -> model_start) are the
    # encoder's own bookkeeping too
    out["setup"] += (marks["collate_start"] - marks["tok_end"]) + (
        marks["model_start"] - marks["collate_end"]
    )
    out = {k: v * ms for k, v in out.items()}
    out["total"] = (t1 - t0) * ms
    return out


def _cell(v: float | None, width: int = 0) -> str:
    return ("-" if v is None else f"{v:.3f}").rjust(width)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="scifact")
    ap.add_argument("--n", type=int, default=300, help="queries (first N judged test queries)")
    ap.add_argument("--checkpoint", default=None, help="checkpoint folder (default zero-shot)")
    ap.add_argument("--precision", nargs="+", default=["float32", "int8", "int8-onnx"])
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--json", default=None, help="write the table as JSON here")
    ap.add_argument("--md", default=None, help="write the table as Markdown here")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    corpus = load_beir(args.data)
    _, qtexts = corpus.judged_queries()
    qtexts = list(qtexts[: args.n])
    encs = {
        p: Encoder.load(args.checkpoint, precision=p, num_threads=1) for p in args.precision
    }
    n_layers = len(next(iter(encs.values())).model.backbone.encoder.layer)
    # (ONNX Runtime: intra-op threads come from num_threads=1 above)
    for enc in encs.values():
        for t in qtexts[: args.warmup]:
            enc.encode_queries([t])

    rows: dict[str, dict[str, list[float]]] = {p: {} for p in encs}
    n_tokens = []
    for t in qtexts:
        n_tokens.append(int(next(iter(encs.values())).encode_queries([t]).n_tokens))
        for p, enc in encs.items():  # interleaved query by query
            stamps = Stamps()
            undo = instrument(enc, stamps)
            try:
                t0 = time.perf_counter()
                enc.encode_queries([t])
                t1 = time.perf_counter()
            finally:
                undo[0]()
            parts = parts_of(dict(stamps.marks), t0, t1, n_layers)
            t2 = time.perf_counter()
            enc.encode_queries([t])
            parts["e2e"] = (time.perf_counter() - t2) * 1e3
            for k, v in parts.items():
                rows[p].setdefault(k, []).append(v)

    out = {
        "data": args.data,
        "checkpoint": args.checkpoint,
        "n_queries": len(qtexts),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "quantized_engine": torch.backends.quantized.engine,
        "cpu": platform.processor() or platform.machine(),
        "query_tokens_p50": float(np.median(n_tokens)),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "p50_ms": {},
    }
    overhead = ["setup", "collate", "pre_model", "mask_prep", "output"]
    for p, r in rows.items():
        med = {k: float(np.median(v)) for k, v in r.items()}
        if "layer_0" in med:
            med["layers_sum"] = sum(med[f"layer_{i}"] for i in range(n_layers))
        med["python_overhead"] = sum(med.get(k, 0.0) for k in overhead)
        med["e2e_p95"] = float(np.percentile(r["e2e"], 95))
        out["p50_ms"][p] = med

    keys = list(dict.fromkeys(k for m in out["p50_ms"].values() for k in m))
    print(f"# {out['command']}")
    print(f"{len(qtexts)} queries, p50 {out['query_tokens_p50']:.0f} tokens, 1 thread, "
          f"torch {torch.__version__}, engine {out['quantized_engine']}")
    print("part".ljust(16) + "".join(p.rjust(12) for p in out["p50_ms"]))
    for k in keys:
        print(k.ljust(16) + "".join(_cell(out["p50_ms"][p].get(k), 12) for p in out["p50_ms"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    if args.md:
        cols = list(out["p50_ms"])
        lines = [
            f"# Where one query's encoding time goes ({args.data}, "
            f"{args.checkpoint or 'zero-shot MiniLM'})",
            "",
            f"Command: `{out['command']}`",
            "",
            f"{len(qtexts)} judged test queries, each encoded alone (`encode_queries([text])`), "
            f"p50 {out['query_tokens_p50']:.0f} tokens, one thread, torch {torch.__version__}, "
            f"quantized engine `{out['quantized_engine']}`. p50 ms per part (the parts are "
            "stamped inside one call; `total` is that call, `e2e` the same query again "
            "without stamps; `python_overhead` = setup + collate + pre_model + mask_prep + "
            "output).",
            "",
            "| part | " + " | ".join(cols) + " |",
            "|---|" + "---:|" * len(cols),
        ]
        for k in keys:
            lines.append(f"| {k} | " + " | ".join(_cell(out["p50_ms"][p].get(k)) for p in cols)
                         + " |")
        Path(args.md).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
