"""Encoder checkpoints: a folder with ``model.safetensors`` + ``config.json`` + tokenizer files.

All weights (backbone and projection) are in one safetensors file; ``config.json`` records the
format version, the backbone's architecture config, the output dim, the tokenization settings
(:class:`~retrieval_prune.encode.model.TokenizerSpec`), free-form metadata and the sha256 of
the weights, which loading verifies. No pickle anywhere: the folder loads without
``torch.load`` and without network access.

A save writes into a temporary sibling folder, fsyncs, then renames it into place, so a crash
leaves either the old checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, NamedTuple

from retrieval_prune.atomic import fsync_dir, fsync_tree
from retrieval_prune.encode.model import ColBERTModel, TokenizerSpec, sha256_file

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "Checkpoint",
    "colbert_spec",
    "save_checkpoint",
    "load_checkpoint",
]

CHECKPOINT_FORMAT = "retrieval_prune.colbert_checkpoint"
CHECKPOINT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def colbert_spec(doc_maxlen: int = 256, query_maxlen: int = 32) -> TokenizerSpec:
    """The ColBERT tokenization: [unused0]/[unused1] markers, [MASK] augmentation, punctuation
    dropped from documents. ``query_maxlen=32`` is ColBERT's default."""
    return TokenizerSpec(
        doc_maxlen=doc_maxlen,
        query_maxlen=query_maxlen,
        query_marker="[unused0]",
        doc_marker="[unused1]",
        query_augmentation=True,
        attend_to_mask_tokens=False,
        skip_punctuation=True,
        keep_special_tokens=True,
    )


class Checkpoint(NamedTuple):
    """A loaded checkpoint: the model (eval mode), its tokenization, the whole config.json,
    and the verified sha256 of ``model.safetensors``."""

    model: ColBERTModel
    spec: TokenizerSpec
    config: dict[str, Any]
    sha256: str


def save_checkpoint(
    model: ColBERTModel,
    path: str | os.PathLike,
    config: dict[str, Any] | None = None,
    *,
    spec: TokenizerSpec | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a standalone checkpoint folder at ``path``.

    Parameters
    ----------
    model : ColBERTModel
        Must carry its tokenizer (``model.tokenizer``), as models from
        :meth:`ColBERTModel.from_backbone` and :func:`load_checkpoint` do.
    path : folder to create.
    config : dict, optional
        JSON-able metadata (training settings, data, scores) stored under ``"metadata"``.
    spec : TokenizerSpec, optional
        How the checkpoint tokenizes; default :func:`colbert_spec` (ColBERT conventions).
    overwrite : bool
        Replace an existing folder at ``path`` (atomically); otherwise raise FileExistsError.

    Returns
    -------
    Path of the written folder.
    """
    if not isinstance(model, ColBERTModel):
        raise TypeError(f"model is {type(model).__name__}, expected ColBERTModel")
    if model.tokenizer is None:
        raise ValueError("model.tokenizer is None; a checkpoint must carry its tokenizer")
    spec = colbert_spec() if spec is None else spec
    if not isinstance(spec, TokenizerSpec):
        raise TypeError(f"spec is {type(spec).__name__}, expected TokenizerSpec")
    metadata = {} if config is None else dict(config)
    try:
        json.dumps(metadata)
    except TypeError as exc:
        raise TypeError(f"config must be JSON-serialisable: {exc}") from exc

    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        model.tokenizer.save_pretrained(str(tmp))
        full = {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "dim": None if model.projection is None else model.dim,
            "hidden_size": model.hidden_size,
            "tokenizer_spec": spec.to_dict(),
            "backbone_config": model.backbone.config.to_dict(),
            "weights_sha256": sha256_file(tmp / WEIGHTS_FILE),
            "metadata": metadata,
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(full, indent=2, sort_keys=True), encoding="utf-8")
        fsync_tree(tmp)
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a checkpoint folder's ``config.json`` (no weights loaded)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} has no {CONFIG_FILE}; it is not a retrieval_prune checkpoint "
            "(or its save was interrupted); re-save it with save_checkpoint"
        )
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"{cfg_file} is not valid JSON ({exc}); the checkpoint is corrupted"
        ) from exc
    if not isinstance(cfg, dict) or cfg.get("format") != CHECKPOINT_FORMAT:
        got = cfg.get("format") if isinstance(cfg, dict) else type(cfg).__name__
        raise ValueError(f"{cfg_file} has format {got!r}, expected {CHECKPOINT_FORMAT!r}")
    if cfg.get("format_version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"{cfg_file} has format_version {cfg.get('format_version')!r}; this version of "
            f"retrieval_prune reads version {CHECKPOINT_VERSION}"
        )
    for key in ("dim", "hidden_size", "tokenizer_spec", "backbone_config", "weights_sha256"):
        if key not in cfg:
            raise ValueError(f"{cfg_file} lacks {key!r}; the checkpoint config is incomplete")
    return cfg


def load_checkpoint(
    path: str | os.PathLike, *, verify: bool = True, attn_implementation: str = "sdpa"
) -> Checkpoint:
    """Load a folder written by :func:`save_checkpoint` (no pickle, no network).

    Raises ``FileNotFoundError`` for a missing folder or file, ``ValueError`` for a corrupted
    weights file (sha256 mismatch, unreadable safetensors) or a config that does not match the
    weights (dim, architecture, missing or extra tensors).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = Path(path).expanduser()
    cfg = read_config(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint {path} has no {WEIGHTS_FILE}")
    sha = sha256_file(weights)
    if verify and sha != cfg["weights_sha256"]:
        raise ValueError(
            f"{weights} is corrupted: sha256 {sha[:16]}... does not match the "
            f"{cfg['weights_sha256'][:16]}... recorded in {CONFIG_FILE}; re-save or re-copy it"
        )
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"cannot read {weights} ({exc}); the file is corrupted") from exc

    spec = TokenizerSpec.from_dict(cfg["tokenizer_spec"])
    bcfg = dict(cfg["backbone_config"])
    model_type = bcfg.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"{path / CONFIG_FILE}: backbone_config lacks model_type")
    hf_config = AutoConfig.for_model(model_type, **bcfg)
    if int(hf_config.hidden_size) != int(cfg["hidden_size"]):
        raise ValueError(
            f"config mismatch in {path}: hidden_size {cfg['hidden_size']} vs backbone "
            f"{hf_config.hidden_size}"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"checkpoint {path} has no usable tokenizer files ({exc})") from exc
    dim = cfg["dim"]
    proj = state.get("projection.weight")
    if dim is None and proj is not None:
        raise ValueError(
            f"config mismatch in {path}: dim is null but the weights hold a projection"
        )
    if dim is not None:
        if proj is None:
            raise ValueError(f"config mismatch in {path}: dim={dim} but no projection.weight")
        if tuple(proj.shape) != (dim, hf_config.hidden_size):
            raise ValueError(
                f"config mismatch in {path}: config says dim={dim}, hidden_size="
                f"{hf_config.hidden_size} but projection.weight has shape {tuple(proj.shape)}"
            )
    backbone = AutoModel.from_config(hf_config, attn_implementation=attn_implementation)
    model = ColBERTModel(backbone, dim, tokenizer=tokenizer)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"config mismatch in {path}: weights do not fit the config ({exc})"
        ) from exc
    model.eval()
    return Checkpoint(model, spec, cfg, sha)
