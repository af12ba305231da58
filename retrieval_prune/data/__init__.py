"""Dataset loading: BEIR-layout folders (local or downloaded)."""

from retrieval_prune.data.beir import DEFAULT_DATASET, load_beir, read_jsonl, resolve_dataset

__all__ = ["load_beir", "resolve_dataset", "read_jsonl", "DEFAULT_DATASET"]
