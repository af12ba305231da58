"""Model and table steps applied to an encoder checkpoint: the ``preprocess`` command's engine.

``preprocess_model(source, spec, out)`` loads the source encoder (a checkpoint folder, a
shipped name such as ``ft128``, or None for the zero-shot MiniLM), applies the spec's model
and table steps in order, and writes a checkpoint that ``eval``/``build``/``search
--checkpoint`` load with nothing more. The checkpoint records its source (name and sha256),
the canonical spec and every step's report; it is a delta checkpoint over the base when the
last weight-changing step says so (``dare``), with bitmask + values for the tensors a step
sparsified (``gmp``).

Data steps select training pairs; they run through :func:`retrieval_prune.train.select`
(``preprocess --data NAME --pipeline "DATA STEPS" --out FILE.json``), not here.

Examples
--------
>>> preprocess_model("ft128", "dare:p=0.99,seed=0", "ckpt/ft128-dare")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval_prune import registry
from retrieval_prune.encode.checkpoint import (
    base_state,
    load_checkpoint,
    read_config,
    resolve_checkpoint,
    save_checkpoint,
)
from retrieval_prune.encode.model import (
    ColBERTModel,
    TextTokenizer,
    TokenizerSpec,
    backbone_identity,
    collate,
    resolve_backbone,
)
from retrieval_prune.preprocess.base import ModelContext

__all__ = ["preprocess_model", "split_stages", "load_source", "calibration_batches"]


def split_stages(spec: str) -> dict[str, list[registry.Component]]:
    """The spec's steps by stage (one parser: the registry's)."""
    steps = registry.build_pipeline(spec) if spec.strip() else []
    out: dict[str, list[registry.Component]] = {s: [] for s in registry.STAGES}
    for st in steps:
        out[st.stage].append(st)
    return out


def load_source(checkpoint: str | os.PathLike | None) -> tuple[ColBERTModel, TokenizerSpec,
                                                               dict[str, Any], Path | None]:
    """Model, tokenization, identity and folder of the source encoder (None: zero-shot)."""
    if checkpoint is None:
        from retrieval_prune.encode.encoder import _ZS_DOC_MAXLEN, _ZS_QUERY_MAXLEN

        path = resolve_backbone(None)
        model = ColBERTModel.from_backbone(path, dim=None)
        spec = TokenizerSpec(doc_maxlen=_ZS_DOC_MAXLEN, query_maxlen=_ZS_QUERY_MAXLEN)
        return model, spec, {"name": "zero-shot", "backbone": backbone_identity(path)}, None
    folder = resolve_checkpoint(checkpoint)
    ck = load_checkpoint(folder)
    return ck.model, ck.spec, {"name": folder.resolve().name, "sha256": ck.sha256}, folder


def calibration_batches(model: ColBERTModel, spec: TokenizerSpec, data: Sequence[str],
                        n: int = 16, seed: int = 0) -> list[Any]:
    """One batch of ``n`` training queries and one of their positive documents per
    collection (train splits only), tokenized as the checkpoint does."""
    from retrieval_prune.train.data import load_pairs

    tt = TextTokenizer(model.tokenizer, spec)
    rng = np.random.default_rng(seed)
    out = []
    for name in data:
        pairs = load_pairs(name, negatives="none", progress=False)
        pick = np.sort(rng.choice(len(pairs), size=min(n, len(pairs)), replace=False))
        q = tt.queries([pairs.query_texts[i] for i in pick])
        d = tt.documents([pairs.doc_texts[int(pairs.positives[i][0])] for i in pick])
        out.append(collate(q, range(len(pick)), tt.pad_id))
        out.append(collate(d, range(len(pick)), tt.pad_id))
    return out


def _check_base(folder: Path | None, model: ColBERTModel, base: dict[str, torch.Tensor],
                ident: dict[str, Any]) -> None:
    """Refuse a base the source was not fine-tuned from: a recorded backbone sha256 must
    match; otherwise tensors the training froze must equal the base's."""
    if folder is None:
        return
    meta = (read_config(folder).get("metadata") or {}).get("training") or {}
    rec = (meta.get("backbone") or {}).get("sha256")
    if rec and rec != ident.get("sha256"):
        raise ValueError(
            f"{folder} was fine-tuned from a base with sha256 {rec[:16]}..., not "
            f"{str(ident.get('sha256'))[:16]}...; pass that base with --base FOLDER"
        )
    if (meta.get("config") or {}).get("freeze_embeddings"):
        name = "backbone.embeddings.word_embeddings.weight"
        w = model.state_dict().get(name)
        if w is not None and name in base and not torch.equal(w, base[name]):
            raise ValueError(
                f"{folder} froze its word embeddings in training, yet they differ from the "
                f"base {ident.get('name')} (sha256 {str(ident.get('sha256'))[:16]}...): it was "
                "not fine-tuned from this base; pass the right one with --base FOLDER"
            )


def preprocess_model(
    checkpoint: str | os.PathLike | None,
    spec: str,
    out: str | os.PathLike,
    *,
    data: Sequence[str] = (),
    base: str | os.PathLike | None = None,
    steps: int = 0,
    seed: int = 0,
    minutes: float | None = None,
    merge_with: Sequence[str | os.PathLike] = (),
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Apply the model and table steps of ``spec`` to the source encoder; write ``out``.

    ``steps``: optimizer steps of the training recipe (over ``data``'s training pairs) for
    steps that train (``loraprune``); ``seed``: their batch order; ``minutes``: wall-clock
    budget of the whole command (None: none) -- a training step that runs out of it stops
    early at its final widths and reports the steps it took; ``merge_with``: further
    fine-tunes of the same base (checkpoint folders or shipped names) for ``dare_merge``.

    Returns the metadata written into the checkpoint (source, pipeline, reports).
    """
    steps_ = steps
    stages = split_stages(spec)
    other = [s.spec for st in ("data", "tokens", "codec", "index") for s in stages[st]]
    if other:
        raise ValueError(
            f"preprocess applies model and table steps; {other} belong elsewhere (data steps: "
            "preprocess --data NAME --out FILE.json; token/codec/index steps: build/eval "
            "--pipeline)"
        )
    steps = stages["model"] + stages["table"]
    if not steps:
        raise ValueError(f"{spec!r} has no model or table step; see retrieval-prune plugins")
    if minutes is not None and not (isinstance(minutes, (int, float)) and minutes > 0):
        raise ValueError(f"minutes={minutes!r} must be > 0 (or omitted: no budget)")
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out {out} exists; pass --overwrite to replace it")
    t0 = time.perf_counter()
    model, tok_spec, source, folder = load_source(checkpoint)
    deadline = None if minutes is None else time.monotonic() + 60.0 * float(minutes)
    merged_sources: list[dict[str, Any]] = []
    ctx = ModelContext(progress=progress, deadline=deadline)
    if any(getattr(s, "needs_base", False) for s in steps):
        bpath = resolve_backbone(base)
        ctx.base = base_state(bpath)
        ctx.base_identity = backbone_identity(bpath)
        _check_base(folder, model, ctx.base, ctx.base_identity)
    if merge_with and not any(getattr(s, "needs_others", False) for s in steps):
        raise ValueError("--merge-with names fine-tunes for a merge step; add one to "
                         "--pipeline (e.g. 'dare_merge:p=0.9')")
    if any(getattr(s, "needs_others", False) for s in steps):
        ctx.others = []
        for other in merge_with:
            o_model, o_spec, o_source, o_folder = load_source(other)
            if o_spec != tok_spec:
                raise ValueError(f"--merge-with {other} tokenizes differently from "
                                 f"{checkpoint} ({o_spec} vs {tok_spec}); merge fine-tunes of "
                                 "one recipe")
            _check_base(o_folder, o_model, ctx.base, ctx.base_identity)
            ctx.others.append(o_model.state_dict())
            merged_sources.append(o_source)
    if any(getattr(s, "mode", None) == "darex-q" for s in steps):
        if not data:
            raise ValueError("dare mode=darex-q needs a calibration batch: pass --data NAME")
        ctx.calibration = calibration_batches(model, tok_spec, data)
    if any(getattr(s, "needs_training", False) for s in steps):
        from retrieval_prune.train.recipe import training_context

        if not data:
            names = [s.spec for s in steps if getattr(s, "needs_training", False)]
            raise ValueError(f"{names} train: pass --data NAME (training pairs) and --steps N")
        ctx.steps = int(steps_)
        ctx.loss_fn, ctx.batches = training_context(
            model, list(data), steps=int(steps_), seed=seed, spec=tok_spec, progress=progress
        )
    masks: dict[str, torch.Tensor] = {}
    delta_of = None
    reports = []
    for step in steps:
        if step.stage == "model":
            res = step.apply(model, ctx)
            masks.update(res.masks)
            delta_of = res.delta_of
        else:
            texts = _table_texts(data)
            res = step.apply(model, texts, tok_spec)
            masks, delta_of = {}, None  # a new table invalidates masks and the base
        model = res.model
        reports.append(res.report.to_dict())
    canonical = " | ".join(s.spec for s in steps)
    src_meta = {} if folder is None else (read_config(folder).get("metadata") or {})
    meta = {
        **src_meta,
        "preprocess": {
            "source": source,
            "pipeline": canonical,
            # a source made by preprocess: its record, so chained calls keep their history
            **({"after": src_meta["preprocess"]} if src_meta.get("preprocess") else {}),
            "reports": reports,
            "data": list(data),
            "steps": int(steps_),
            "minutes": minutes,
            **({"merged_with": merged_sources} if merged_sources else {}),
            "seconds": round(time.perf_counter() - t0, 2),
        },
    }
    delta = None
    if delta_of is not None:
        delta = (ctx.base, delta_of)
    save_checkpoint(model, out, meta, spec=tok_spec,
                    overwrite=overwrite, masks=masks, delta_base=delta)
    return meta


def _table_texts(data: Sequence[str]) -> list[str]:
    """Calibration texts of a table step: each collection's corpus and training queries."""
    from retrieval_prune.train.data import load_pairs

    if not data:
        raise ValueError("table steps need calibration texts: pass --data NAME (corpus and "
                         "training queries of each collection)")
    texts: list[str] = []
    for name in data:
        pairs = load_pairs(name, negatives="none", progress=False)
        texts.extend(pairs.doc_texts)
        texts.extend(pairs.query_texts)
    return texts

