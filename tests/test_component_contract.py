"""One contract suite per kind of component (scikit-learn's ``check_estimator`` idea),
over every registered codec and index type, third-party ones included.

Every component must: round-trip its spec; give identical results after save -> load;
be deterministic under a seed; refuse bad input (NaN, wrong dim, k=0) with a message;
refuse an empty corpus naming it. Small per-component parameters fit the tiny corpus:
a newly registered component without an entry in ``CODECS`` / ``INDEXES`` fails here,
so the suite grows with the registry.

Data: small seeded clustered vectors (tests/test_ivf.py::clustered_docs; labelled
synthetic).
"""

from __future__ import annotations

import numpy as np
import pytest

from retrieval_prune import registry
from retrieval_prune.index.base import load_index
from retrieval_prune.pipeline import make_pipeline
from retrieval_prune.types import MultiVectors
from tests.test_ivf import clustered_docs

DIM = 16

#: codec name -> a spec that fits ~1,500 tokens of dim 16
CODECS = {
    "binary": "binary",
    "f32": "f32",
    "fp16": "fp16",
    "hkmeans": "hkmeans:k=16",
    "kmeans": "kmeans:k=16",
    "pca": "pca:dim=8",
    "residual": "residual:k=16,nbits=2",
}
#: index type -> a pipeline spec building it on the tiny corpus
INDEXES = {
    "flat": "flat",
    "ivf": "residual:k=16,nbits=2 | ivf:nprobe=4",
    "hnsw": "residual:k=16,nbits=2 | hnsw:nprobe=4,ef=16",
}


def _codec_spec(name: str) -> str:
    if name not in CODECS:
        pytest.fail(f"codec {name!r} is registered but has no contract parameters: add it to CODECS")
    return CODECS[name]


def _index_spec(name: str) -> str:
    """Registered index types, and the compressed index built from each codec spec."""
    if name.startswith("compressed:"):
        return _codec_spec(name.split(":", 1)[1])
    if name not in INDEXES:
        pytest.fail(f"index type {name!r} is registered but has no contract parameters: add it to INDEXES")
    return INDEXES[name]


CODEC_NAMES = sorted(registry.available("codec"))
INDEX_NAMES = sorted(registry.available("index")) + [f"compressed:{c}" for c in CODEC_NAMES]


@pytest.fixture(scope="module")
def corpus():
    docs = clustered_docs(120, dim=DIM)  # document 7 is empty
    queries = clustered_docs(6, dim=DIM, seed=9, empty=())
    return docs, [f"d{i}" for i in range(len(docs))], queries


def test_every_registered_component_has_contract_params():
    assert set(registry.available("codec")) <= set(CODECS), "add the new codec to CODECS"
    assert set(registry.available("index")) <= set(INDEXES), "add the new index type to INDEXES"


# -- codecs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CODEC_NAMES)
def test_codec_spec_round_trip(name):
    c = registry.build(_codec_spec(name))
    again = registry.build(c.spec)
    assert again.spec == c.spec and again == c
    assert type(again) is registry.get(name)


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_codec_state_round_trip_and_determinism(name, corpus):
    x = corpus[0].embeddings
    a = registry.build(_codec_spec(name)).fit(x, seed=3)
    b = registry.build(_codec_spec(name)).fit(x, seed=3)
    sa, sb = a.state_arrays(), b.state_arrays()
    assert sa.keys() == sb.keys()
    for key in sa:  # same seed: the same fitted state, bit for bit
        np.testing.assert_array_equal(sa[key], sb[key], err_msg=key)
    codes = a.encode(x)
    np.testing.assert_array_equal(b.encode(x), codes)
    # state saved -> loaded into a fresh codec: the same codes and decoded vectors
    back = registry.build(a.spec).load_state({k: np.array(v) for k, v in sa.items()})
    np.testing.assert_array_equal(back.encode(x), codes)
    np.testing.assert_array_equal(back.decode(codes), a.decode(codes))


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_codec_refuses_bad_and_empty_input(name, corpus):
    x = corpus[0].embeddings
    spec = _codec_spec(name)
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        registry.build(spec).fit(bad)
    with pytest.raises(ValueError, match="empty"):
        registry.build(spec).fit(x[:0])
    c = registry.build(spec).fit(x)
    with pytest.raises(ValueError, match="NaN"):
        c.encode(bad)
    with pytest.raises(ValueError, match="dim=8"):
        c.encode(x[:, :8])


# -- index types ----------------------------------------------------------------------------------
def _build(name, corpus):
    docs, ids, _ = corpus
    return make_pipeline(_index_spec(name)).build(docs, ids)


@pytest.mark.parametrize("name", INDEX_NAMES)
def test_index_spec_round_trip(name):
    index = make_pipeline(_index_spec(name)).index
    again = make_pipeline(index.spec).index
    assert again.spec == index.spec and type(again) is type(index)
    if not name.startswith("compressed:"):
        assert type(index) is registry.get(name)


@pytest.mark.parametrize("name", INDEX_NAMES)
def test_index_save_load_gives_identical_search(name, corpus, tmp_path):
    _, _, queries = corpus
    index = _build(name, corpus)
    before = index.search(queries, k=10)
    index.save(tmp_path / "ix")
    loaded = load_index(tmp_path / "ix")
    assert type(loaded) is type(index) and loaded.spec == index.spec
    after = loaded.search(queries, k=10)
    np.testing.assert_array_equal(after.ids, before.ids)
    np.testing.assert_array_equal(after.scores, before.scores)
    assert after.doc_ids == before.doc_ids


@pytest.mark.parametrize("name", INDEX_NAMES)
def test_index_build_is_deterministic(name, corpus):
    _, _, queries = corpus
    a, b = _build(name, corpus), _build(name, corpus)
    for key, arr in getattr(a, "_parts", {}).items():  # the stored codes themselves
        np.testing.assert_array_equal(np.asarray(b._parts[key]), np.asarray(arr), err_msg=key)
    ra, rb = a.search(queries, k=10), b.search(queries, k=10)
    np.testing.assert_array_equal(ra.ids, rb.ids)
    np.testing.assert_array_equal(ra.scores, rb.scores)
    assert (ra.ids[:, 0] >= 0).all() and 7 not in ra.ids  # results, never the empty document


@pytest.mark.parametrize("name", INDEX_NAMES)
def test_index_refuses_bad_input(name, corpus):
    docs, ids, queries = corpus
    bad_docs = MultiVectors(docs.embeddings.copy(), docs.offsets)
    bad_docs.embeddings[5, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        make_pipeline(_index_spec(name)).build(bad_docs, ids)
    index = _build(name, corpus)
    bad_q = MultiVectors(queries.embeddings.copy(), queries.offsets)
    bad_q.embeddings[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        index.search(bad_q, k=3)
    with pytest.raises(ValueError, match="dim=8"):
        index.search(clustered_docs(2, dim=8, empty=()), k=3)
    with pytest.raises(ValueError, match="k=0"):
        index.search(queries, k=0)
    with pytest.raises(TypeError, match="k=1.5"):
        index.search(queries, k=1.5)


@pytest.mark.parametrize("name", INDEX_NAMES)
def test_index_refuses_an_empty_corpus(name):
    empty = MultiVectors.from_list([], dim=DIM)
    with pytest.raises(ValueError, match="corpus is empty"):
        make_pipeline(_index_spec(name)).build(empty, [])
    index = make_pipeline(_index_spec(name)).index
    if getattr(index, "chain", None) is not None:  # codecs to fit: an empty first batch is refused
        with pytest.raises(ValueError, match="no token vectors to fit"):
            index.add(empty, [])
    else:  # nothing to fit: an empty batch is no error, and finds nothing
        index.add(empty, [])
        res = index.search(clustered_docs(2, dim=DIM, empty=()), k=3)
        assert (res.ids == -1).all() and np.isneginf(res.scores).all()
