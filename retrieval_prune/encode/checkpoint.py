"""Encoder checkpoints: a folder with ``model.safetensors`` + ``config.json`` + tokenizer files.

All weights (backbone and projection) are in one safetensors file; ``config.json`` records the
format version, the backbone's architecture config, the output dim, the tokenization settings
(:class:`~retrieval_prune.encode.model.TokenizerSpec`), free-form metadata and the sha256 of
the weights, which loading verifies. No pickle anywhere: the folder loads without
``torch.load`` and without network access.

A save writes into a temporary sibling folder, fsyncs, then renames it into place, so a crash
leaves either the old checkpoint or the new one, never a mix.

Format version 2 (version 1 folders still load) adds three ways to store weights, all exact:

* **masked sparse tensors** (``masks=``): a tensor whose entries outside a bool mask are zero
  (magnitude pruning) is stored as ``NAME::mask`` (the mask, ``np.packbits`` order, uint8)
  plus ``NAME::values`` (the entries inside the mask, row-major);
* **pruned shapes**: heads removed per layer (the backbone config's ``pruned_heads``, which
  ``transformers`` applies when it builds the model) and the FFN width per layer
  (``ffn_sizes``); the loader builds those shapes before loading the weights strictly;
* **delta checkpoints** (``delta_base=``): the weights are stored relative to a base model
  named by the sha256 of its weights file (default: the pip-installed MiniLM). A tensor equal
  to the base's is stored as nothing; a tensor the base lacks (the projection) or with another
  shape is stored dense; any other is stored as ``NAME::delta`` (dense) or, under a mask,
  ``NAME::mask`` + ``NAME::values`` of ``model - base``. The few entries where float32
  ``base + delta`` does not round back to the saved weight are stored as
  ``NAME::fix_index`` / ``NAME::fix_value``, so loading rebuilds the saved model bit for bit.
  Loading checks the base's sha256 and refuses another base.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from retrieval_prune.atomic import fsync_dir, fsync_tree
from retrieval_prune.encode.model import (
    ColBERTModel,
    TokenizerSpec,
    backbone_identity,
    resolve_backbone,
    sha256_file,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "Checkpoint",
    "colbert_spec",
    "save_checkpoint",
    "load_checkpoint",
    "read_config",
    "base_state",
    "ffn_sizes",
    "set_ffn_sizes",
    "SHIPPED",
    "resolve_checkpoint",
    "stored_bytes",
    "stored_masks",
]

CHECKPOINT_FORMAT = "retrieval_prune.colbert_checkpoint"
CHECKPOINT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
#: checkpoints committed in the package, loadable by name (``--checkpoint ft128``)
SHIPPED = Path(__file__).resolve().parent / "shipped"
_SEP = "::"
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
    masks: dict[str, torch.Tensor] | None = None,
    delta_base: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
) -> Path:
    """Write ``model`` as a checkpoint folder at ``path`` (standalone, or a delta over a base).

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
    masks : dict, optional
        Parameter name (``model.state_dict()`` key) -> bool tensor of its shape: entries
        outside the mask are zero (dense save) or equal to the base (delta save); those
        tensors are stored as bitmask + values. A mask that does not hold raises ValueError.
    delta_base : (state, identity), optional
        Store the weights relative to ``state`` (a state dict in the model's key space, e.g.
        :func:`base_state`); ``identity`` must carry the base weights' ``sha256``.

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

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"refusing to save: parameter {name} contains NaN or Inf")
    tensors, layout = _encode_state(state, masks or {}, delta_base)
    tokenizer_from_base = False
    if delta_base is not None:
        tokenizer_from_base = _same_tokenizer(model.tokenizer, resolve_backbone(None))

    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        from safetensors.torch import save_file

        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if not tokenizer_from_base:
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
            "storage": layout,
            "ffn_sizes": ffn_sizes(model),
            "tokenizer_from_base": tokenizer_from_base,
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
    if cfg.get("format_version") not in _READABLE_VERSIONS:
        raise ValueError(
            f"{cfg_file} has format_version {cfg.get('format_version')!r}; this version of "
            f"retrieval_prune reads versions {list(_READABLE_VERSIONS)}"
        )
    for key in ("dim", "hidden_size", "tokenizer_spec", "backbone_config", "weights_sha256"):
        if key not in cfg:
            raise ValueError(f"{cfg_file} lacks {key!r}; the checkpoint config is incomplete")
    return cfg


def load_checkpoint(
    path: str | os.PathLike,
    *,
    verify: bool = True,
    attn_implementation: str = "sdpa",
    base: str | os.PathLike | None = None,
) -> Checkpoint:
    """Load a folder written by :func:`save_checkpoint` (no pickle, no network).

    ``base``: the base model folder of a delta checkpoint (default: the installed MiniLM);
    its weights' sha256 must be the one the checkpoint records.

    Raises ``FileNotFoundError`` for a missing folder or file, ``ValueError`` for a corrupted
    weights file (sha256 mismatch, unreadable safetensors), a delta over another base, or a
    config that does not match the weights (dim, architecture, missing or extra tensors).
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

    layout = cfg.get("storage") or {"kind": "dense", "tensors": {}}
    base_sd = None
    base_path = None
    if layout.get("kind") == "delta":
        base_path, base_sd = _check_base(path, layout, base)
    state = _decode_state(path, state, layout, base_sd)

    spec = TokenizerSpec.from_dict(cfg["tokenizer_spec"])
    bcfg = dict(cfg["backbone_config"])
    # JSON wrote config.pruned_heads' layer keys as strings; transformers prunes those heads
    # while it builds the model (init_weights -> prune_heads) and indexes its layers with them
    heads = bcfg.get("pruned_heads")
    if heads:
        try:
            bcfg["pruned_heads"] = {int(k): sorted(int(h) for h in v) for k, v in heads.items()}
        except (AttributeError, TypeError, ValueError) as exc:
            raise ValueError(
                f"{path / CONFIG_FILE}: backbone_config.pruned_heads is malformed: {heads!r}"
            ) from exc
    model_type = bcfg.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"{path / CONFIG_FILE}: backbone_config lacks model_type")
    hf_config = AutoConfig.for_model(model_type, **bcfg)
    if int(hf_config.hidden_size) != int(cfg["hidden_size"]):
        raise ValueError(
            f"config mismatch in {path}: hidden_size {cfg['hidden_size']} vs backbone "
            f"{hf_config.hidden_size}"
        )
    tok_dir = base_path if cfg.get("tokenizer_from_base") else path
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True, use_fast=True)
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
    sizes = cfg.get("ffn_sizes")
    if sizes is not None:
        set_ffn_sizes(backbone, sizes)
    model = ColBERTModel(backbone, dim, tokenizer=tokenizer)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"config mismatch in {path}: weights do not fit the config ({exc})"
        ) from exc
    model.eval()
    return Checkpoint(model, spec, cfg, sha)


# -- storage layouts ----------------------------------------------------------------------
def _bits(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.reshape(-1).numpy().astype(bool)))


def _unbits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    return torch.from_numpy(
        np.unpackbits(packed.numpy(), count=numel).astype(bool)
    )


def _encode_state(
    state: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    delta_base: tuple[dict[str, torch.Tensor], dict[str, Any]] | None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors to write and the layout record (which tensor is stored how)."""
    unknown = sorted(set(masks) - set(state))
    if unknown:
        raise ValueError(f"masks name tensors the model does not have: {unknown[:5]}")
    out: dict[str, torch.Tensor] = {}
    kinds: dict[str, str] = {}
    shapes: dict[str, list[int]] = {}
    base_sd, ident = (None, None) if delta_base is None else delta_base
    if delta_base is not None and not (isinstance(ident, dict) and ident.get("sha256")):
        raise ValueError("delta_base identity must record the base weights' sha256")
    for name, w in state.items():
        m = masks.get(name)
        if m is not None:
            m = m.detach().cpu().bool()
            if tuple(m.shape) != tuple(w.shape):
                raise ValueError(f"mask of {name} has shape {tuple(m.shape)}, weight {tuple(w.shape)}")
        b = None if base_sd is None else base_sd.get(name)
        if b is not None and (b.shape != w.shape or b.dtype != w.dtype):
            b = None
        if b is None:  # dense (or masked sparse) store of the weight itself
            if m is not None:
                if bool((w[~m] != 0).any()):
                    raise ValueError(f"{name} has non-zero entries outside its mask")
                out[name + _SEP + "mask"] = _bits(m)
                out[name + _SEP + "values"] = w[m].contiguous()
                kinds[name] = "sparse"
                shapes[name] = list(w.shape)
            else:
                out[name] = w
                kinds[name] = "dense"
            continue
        if torch.equal(w, b):
            kinds[name] = "base"  # stored as nothing
            continue
        if not w.is_floating_point():
            out[name] = w
            kinds[name] = "dense"
            continue
        delta = w - b
        if m is not None:
            if bool((w[~m] != b[~m]).any()):
                raise ValueError(f"{name} differs from the base outside its mask")
            out[name + _SEP + "mask"] = _bits(m)
            out[name + _SEP + "values"] = delta[m].contiguous()
            rebuilt = b.clone()
            rebuilt[m] = b[m] + delta[m]
            kinds[name] = "delta-sparse"
        else:
            out[name + _SEP + "delta"] = delta.contiguous()
            rebuilt = b + delta
            kinds[name] = "delta"
        bad = torch.nonzero((rebuilt != w).reshape(-1)).reshape(-1)
        if bad.numel():
            out[name + _SEP + "fix_index"] = bad.to(torch.int64)
            out[name + _SEP + "fix_value"] = w.reshape(-1)[bad].contiguous()
    layout: dict[str, Any] = {
        "kind": "dense" if delta_base is None else "delta",
        "tensors": kinds,
        "shapes": shapes,
    }
    if delta_base is not None:
        layout["base"] = dict(ident)
    return out, layout


def stored_bytes(
    state: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor] | None = None,
    delta_base: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
) -> int:
    """Bytes of the tensors :func:`save_checkpoint` would write for ``state`` (no header)."""
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    tensors, _ = _encode_state(state, masks or {}, delta_base)
    return int(sum(t.numel() * t.element_size() for t in tensors.values()))


def stored_masks(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The bool masks of a checkpoint's masked sparse tensors (``gmp``), by parameter name;
    empty for a dense checkpoint. Delta masks (``dare``) are not masks of the weights."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    cfg = read_config(path)
    layout = cfg.get("storage") or {}
    kinds = layout.get("tensors") or {}
    shapes = layout.get("shapes") or {}
    out = {}
    names = [n for n, k in kinds.items() if k == "sparse"]
    if names:
        with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
            for n in names:
                shape = tuple(int(x) for x in shapes[n])
                numel = int(np.prod(shape))
                out[n] = _unbits(f.get_tensor(n + _SEP + "mask"), numel).reshape(shape)
    return out


def _decode_state(
    path: Path,
    stored: dict[str, torch.Tensor],
    layout: dict[str, Any],
    base_sd: dict[str, torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    kinds = layout.get("tensors") or {}
    if not kinds:  # version 1 / dense without a record: the file is the state
        return stored
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in stored:
            raise ValueError(f"config mismatch in {path}: the weights file lacks {key!r}")
        used.add(key)
        return stored[key]

    for name, kind in kinds.items():
        b = None if base_sd is None else base_sd.get(name)
        if kind == "dense":
            state[name] = take(name)
        elif kind == "sparse" or kind == "delta-sparse":
            vals = take(name + _SEP + "values")
            if kind == "sparse":
                shape = (layout.get("shapes") or {}).get(name)
                if shape is None:
                    raise ValueError(f"{path}: sparse tensor {name} has no recorded shape")
                w = torch.zeros(tuple(int(x) for x in shape), dtype=vals.dtype)
            else:
                if b is None:
                    raise ValueError(f"{path}: delta tensor {name} has no base tensor")
                w = b.clone()
            m = _unbits(take(name + _SEP + "mask"), w.numel()).reshape(w.shape)
            if int(m.sum()) != vals.numel():
                raise ValueError(f"{path}: {name}'s mask holds {int(m.sum())} entries, values {vals.numel()}")
            if kind == "sparse":
                w[m] = vals
            else:
                w[m] = b[m] + vals
            state[name] = w
        elif kind == "delta":
            if b is None:
                raise ValueError(f"{path}: delta tensor {name} has no base tensor")
            d = take(name + _SEP + "delta")
            if d.shape != b.shape:
                raise ValueError(f"{path}: delta of {name} has shape {tuple(d.shape)}, base {tuple(b.shape)}")
            state[name] = b + d
        elif kind == "base":
            if b is None:
                raise ValueError(f"{path}: {name} is stored as the base's, which lacks it")
            state[name] = b.clone()
        else:
            raise ValueError(f"{path}: unknown storage {kind!r} for {name}")
        fi = name + _SEP + "fix_index"
        if fi in stored:
            idx = take(fi)
            val = take(name + _SEP + "fix_value")
            flat = state[name].reshape(-1)
            if idx.numel() and (int(idx.max()) >= flat.numel() or int(idx.min()) < 0):
                raise ValueError(f"{path}: fix indices of {name} out of range")
            flat[idx] = val
    extra = sorted(set(stored) - used)
    if extra:
        raise ValueError(f"config mismatch in {path}: unexpected tensors {extra[:5]}")
    return state


def _check_base(
    path: Path, layout: dict[str, Any], base: str | os.PathLike | None
) -> tuple[Path, dict[str, torch.Tensor]]:
    want = (layout.get("base") or {}).get("sha256")
    if not want:
        raise ValueError(f"{path}: delta checkpoint without its base's sha256")
    base_path = resolve_backbone(base)
    got = backbone_identity(base_path).get("sha256")
    if got != want:
        raise ValueError(
            f"{path} is a delta over base weights with sha256 {want[:16]}..., but the base "
            f"{base_path} has {str(got)[:16]}...; pass the right base folder (base=... / --base) "
            "or install the base package the checkpoint names: "
            f"{(layout.get('base') or {}).get('name')} {(layout.get('base') or {}).get('version', '')}"
        )
    return base_path, base_state(base_path)


def base_state(backbone: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The base model's weights in :class:`ColBERTModel`'s key space (``backbone.*``)."""
    from safetensors.torch import load_file

    path = resolve_backbone(backbone)
    f = path / "model.safetensors"
    if not f.is_file():
        raise FileNotFoundError(f"base {path} has no model.safetensors")
    raw = load_file(str(f))
    out = {}
    for k, v in raw.items():
        k = k[len("bert."):] if k.startswith("bert.") else k
        out["backbone." + k] = v
    return out


def _same_tokenizer(tokenizer: Any, base_path: Path) -> bool:
    try:
        from transformers import AutoTokenizer

        base_tok = AutoTokenizer.from_pretrained(str(base_path), local_files_only=True, use_fast=True)
    except (OSError, ValueError):
        return False
    def pieces(tok: Any) -> dict[str, Any]:
        # what maps text to ids; truncation/padding are call-time settings (TextTokenizer
        # sets its own) that a save/load round trip does not keep
        d = json.loads(tok.backend_tokenizer.to_str())
        return {k: v for k, v in d.items() if k not in ("truncation", "padding")}

    return (
        type(base_tok) is type(tokenizer)
        and base_tok.get_vocab() == tokenizer.get_vocab()
        and pieces(base_tok) == pieces(tokenizer)
        and base_tok.init_kwargs.get("do_lower_case") == tokenizer.init_kwargs.get("do_lower_case")
    )


def ffn_sizes(model: Any) -> list[int] | None:
    """FFN width per layer when any layer differs from the config's ``intermediate_size``."""
    bb = getattr(model, "backbone", model)
    try:
        layers = bb.encoder.layer
    except AttributeError:
        return None
    sizes = [int(layer.intermediate.dense.out_features) for layer in layers]
    if all(x == int(bb.config.intermediate_size) for x in sizes):
        return None
    return sizes


def set_ffn_sizes(backbone: Any, sizes: list[int]) -> None:
    """Rebuild each layer's FFN Linear layers at the given widths (weights to be loaded)."""
    from torch import nn

    layers = backbone.encoder.layer
    if len(sizes) != len(layers):
        raise ValueError(f"ffn_sizes has {len(sizes)} entries for {len(layers)} layers")
    hidden = int(backbone.config.hidden_size)
    for layer, n in zip(layers, sizes, strict=True):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"ffn_sizes entry {n!r} must be a positive int")
        layer.intermediate.dense = nn.Linear(hidden, n)
        layer.output.dense = nn.Linear(n, hidden)


def resolve_checkpoint(name: str | os.PathLike) -> Path:
    """A checkpoint folder: ``name`` itself when it is a folder, else a shipped checkpoint."""
    p = Path(name).expanduser()
    if p.exists():
        return p
    if isinstance(name, str) and os.sep not in name and (SHIPPED / name).is_dir():
        return SHIPPED / name
    return p
