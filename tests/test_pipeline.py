"""The one build path: spec over every stage, in-memory and streamed builds that agree, the
manifest's record of every stage, the query path from a loaded index alone."""

import re
from pathlib import Path

import numpy as np
import pytest

from retrieval_prune import registry
from retrieval_prune.encode.cache import EmbeddingCache
from retrieval_prune.index.base import load_index
from retrieval_prune.pipeline import Pipeline, make_pipeline
from retrieval_prune.pipeline import build as build_mod
from retrieval_prune.pipeline.build import build
from retrieval_prune.pipeline.executors import get_executor
from retrieval_prune.pipeline.spec import UnsupportedStageError
from retrieval_prune.preprocess.base import DataPreprocessor
from retrieval_prune.retrieve import HashingEncoder, Retriever
from tests.test_ivf import clustered_docs

ROOT = Path(__file__).resolve().parents[1]
SPECS = ["exact", "pool:factor=2 | residual:k=16,nbits=2", "default",
         "pool:factor=2 | residual:k=16,nbits=2,centroid_bits=8 | ivf:nprobe=4",
         "pca:dim=8 | kmeans:k=16 | hnsw:nprobe=4"]


@pytest.mark.parametrize("spec", SPECS)
def test_canonical_spec_round_trips_and_lists_every_stage(spec):
    p = make_pipeline(spec)
    again = make_pipeline(p.spec)
    assert again.spec == p.spec and again.stages() == p.stages()
    st = p.stages()
    assert list(st) == list(registry.STAGES)
    flat = [s for steps in st.values() for s in steps]
    if p.index.name in registry.available("index"):  # registered index types are spelled out
        assert registry.format_spec(registry.parse_spec(" | ".join(flat))) == p.spec


def test_stage_order_is_data_model_table_tokens_codec_index():
    assert registry.STAGES == ("data", "model", "table", "tokens", "codec", "index")
    with pytest.raises(ValueError, match="comes after a later stage"):
        make_pipeline("residual:k=16 | pool:factor=2")


def test_the_spec_grammar_is_split_only_in_the_registry():
    pat = re.compile(r'split\("\|"\)|split\(" \| "\)|rsplit\("\|"')
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in (ROOT / "retrieval_prune").rglob("*.py")
            for n, line in enumerate(p.read_text().splitlines(), 1)
            if pat.search(line) and p.name != "registry.py"]
    assert not hits, hits


@pytest.fixture
def data_step(monkeypatch):
    class Dedup(DataPreprocessor):
        """A stand-in data step (a third-party plug-in)."""

        name = "test_dedup"
        params = {"eps": registry.Param(0.1, float, low=0.0, high=1.0)}

    monkeypatch.setitem(registry._REGISTRY, "test_dedup", Dedup)
    return Dedup


def test_pre_encoding_steps_parse_but_the_builder_points_to_preprocess(data_step, tmp_path):
    p = make_pipeline("test_dedup:eps=0.05 | pool:factor=2 | residual:k=16,nbits=2")
    assert p.stages()["data"] == ["test_dedup:eps=0.05"]
    assert p.spec.startswith("test_dedup:eps=0.05 | pool:factor=2")
    docs = clustered_docs(40, seed=1)
    with pytest.raises(UnsupportedStageError,
                       match=r"test_dedup:eps=0.05 \(data\).*retrieval-prune preprocess"):
        build(p, [f"d{i}" for i in range(40)], docs=docs, out=tmp_path / "ix")
    assert not (tmp_path / "ix").exists()  # refused before any work


def _answers(root, queries):
    ix = load_index(root)
    q = Pipeline.for_index(ix).transform_queries(queries)
    r = ix.search(q, k=10)
    return [list(r.external(i)) for i in range(len(queries))]


@pytest.mark.parametrize("spec", ["pool:factor=2 | residual:k=16,nbits=2,centroid_bits=8 | ivf:nprobe=4",
                                  "residual:k=16,nbits=1", "kmeans:k=16 | hnsw:nprobe=4"])
def test_streamed_build_equals_the_in_memory_build(spec, tmp_path, monkeypatch):
    docs = clustered_docs(300, seed=3)
    ids = [f"d{i}" for i in range(len(docs))]
    texts = [f"text {i}" for i in range(len(docs))]
    queries = clustered_docs(8, seed=9, empty=())
    a = build(spec, ids, docs=docs, texts=texts, out=tmp_path / "mem")
    monkeypatch.setattr(build_mod, "_BLOCK_SHARE", 2e-5)  # many small blocks at a 64 MiB cap
    b = build(spec, ids, docs=docs, texts=texts, out=tmp_path / "stream", max_memory_mb=64)
    assert b.streamed and b.index is None and b.stats["blocks"] > 5
    assert _answers(tmp_path / "stream", queries) == _answers(tmp_path / "mem", queries)
    sa, sb = load_index(tmp_path / "mem"), load_index(tmp_path / "stream")
    assert sa.texts == sb.texts and sa.pipeline_spec == sb.pipeline_spec
    assert sa.info["stages"] == sb.info["stages"] == a.pipeline.stages()
    rep = {r["step"]: r["vectors_after"] for r in sb.info["token_steps"]}
    assert rep == {r["step"]: r["vectors_after"] for r in sa.info["token_steps"]}


def test_streaming_needs_a_codec_and_a_folder(tmp_path):
    docs = clustered_docs(20, seed=1)
    ids = [f"d{i}" for i in range(20)]
    with pytest.raises(ValueError, match="stores no codes"):
        build("exact", ids, docs=docs, out=tmp_path / "ix", max_memory_mb=100)
    with pytest.raises(ValueError, match="give out="):
        build("residual:k=16", ids, docs=docs, max_memory_mb=100)
    with pytest.raises(ValueError, match="max_memory_mb"):
        build("residual:k=16", ids, docs=docs, out=tmp_path / "ix", max_memory_mb=1)


def test_texts_and_encoder_through_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_PRUNE_CACHE", str(tmp_path / "cache"))
    enc = HashingEncoder(dim=16)
    ids = [f"d{i}" for i in range(50)]
    texts = [f"word{i % 7} other{i % 5} shared" for i in range(50)]
    r1 = build("residual:k=8,nbits=2", ids, texts=texts, encoder=enc, dataset="toy", out=tmp_path / "a")
    assert load_index(tmp_path / "a").encoder_settings == enc.settings
    cache = EmbeddingCache(tmp_path / "cache" / "embeddings")
    chunked = cache.get_or_encode(enc, "toy-chunked", ids, texts, progress=False, chunk_docs=7)
    whole = enc.encode_documents(texts, progress=False)
    np.testing.assert_array_equal(chunked.embeddings, whole.embeddings)  # per-word vectors: exact
    np.testing.assert_array_equal(chunked.offsets, whole.offsets)
    assert r1.pipeline.spec == load_index(tmp_path / "a").pipeline_spec


def test_query_path_from_the_manifest_alone(tmp_path):
    r = Retriever.from_texts(["a", "b"], ["red apples", "green pears"], HashingEncoder(dim=16),
                             "pool:factor=2 | residual:k=2,nbits=2", path=tmp_path / "ix")
    again = Retriever.from_index(tmp_path / "ix")
    assert again.pipeline.index is again.index  # nothing rebuilt to recover the token steps
    assert [s.spec for s in again.pipeline.token_steps] == [s.spec for s in r.pipeline.token_steps]
    assert again.retrieve("apples", k=1)[0].id == "a"


def test_executors():
    assert list(get_executor().map(str, [1, 2])) == ["1", "2"]
    with pytest.raises(ValueError, match="unknown executor 'dask'"):
        get_executor("dask")
