import os
import time
from pathlib import Path

import numpy as np
import pytest

from retrieval_prune.types import MultiVectors

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def random_docs(n_docs=20, dim=16, max_len=12, seed=0, empty=(), normalise=True):
    """Seeded synthetic documents (labelled synthetic), with chosen empty documents."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n_docs):
        n = 0 if i in empty else int(rng.integers(1, max_len + 1))
        x = rng.standard_normal((n, dim)).astype(np.float32)
        if normalise and n:
            x /= np.linalg.norm(x, axis=1, keepdims=True)
        docs.append(x)
    return MultiVectors.from_list(docs, dim=dim)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # every test writes caches under a temp folder unless it sets its own
    if "RETRIEVAL_PRUNE_CACHE" not in os.environ:
        monkeypatch.setenv("RETRIEVAL_PRUNE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def data_dir():
    if not (DATA / "adi").is_dir():
        pytest.skip("../shared/data is not present")
    return DATA


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster (2 CPUs) for the whole session; skipped without Ray."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a loopback-only test cluster
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def wait_healthy(url, proc, seconds, what="server", interval=0.1):
    """Poll ``url/health`` until it answers 200; fail if ``proc`` exits or ``seconds`` pass."""
    import httpx

    deadline = time.time() + seconds
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{what} did not come up"
        time.sleep(interval)


def tiny_colbert(seed=0, dim=32, layers=2, heads=2, hidden=64, ffn=128):
    """MiniLM's tokenizer over a small random BERT (synthetic weights): model mechanics in
    seconds on any machine. The real backbone runs in the ``slow`` tests."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from retrieval_prune.encode.model import ColBERTModel, resolve_backbone

    path = resolve_backbone(None)
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    cfg.update({"num_hidden_layers": layers, "hidden_size": hidden,
                "num_attention_heads": heads, "intermediate_size": ffn})
    torch.manual_seed(seed)
    bb = AutoModel.from_config(cfg, attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True, use_fast=True)
    return ColBERTModel(bb, dim, tokenizer=tok, seed=seed).eval()
