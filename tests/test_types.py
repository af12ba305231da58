import numpy as np
import pytest

from retrieval_prune.types import MultiVectors, SearchResult, check_k

from .conftest import random_docs


def test_from_list_and_access():
    mv = random_docs(5, dim=4, empty={2})
    assert len(mv) == 5 and mv.dim == 4
    assert mv.doc(2).shape == (0, 4)
    assert mv.lengths.sum() == mv.n_tokens
    np.testing.assert_array_equal(mv.doc(-1), mv.doc(4))


def test_slicing_and_fancy_selection_agree():
    mv = random_docs(9, dim=3)
    a, b = mv[2:5], mv[[2, 3, 4]]
    assert len(a) == len(b) == 3
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    for i in range(3):
        np.testing.assert_array_equal(a.doc(i), mv.doc(i + 2))
    assert len(mv[5:2]) == 0
    assert len(mv[::2]) == 5


def test_concat_round_trip():
    mv = random_docs(7, dim=3, empty={0, 6})
    back = MultiVectors.concat([mv[0:3], mv[3:7]])
    np.testing.assert_array_equal(back.embeddings, mv.embeddings)
    np.testing.assert_array_equal(back.offsets, mv.offsets)
    with pytest.raises(ValueError, match="dims"):
        MultiVectors.concat([mv, random_docs(2, dim=5)])


@pytest.mark.parametrize(
    "emb, off, err",
    [
        (np.zeros((3, 2), np.float64), np.array([0, 3], np.int64), TypeError),
        (np.zeros((3,), np.float32), np.array([0, 3], np.int64), ValueError),
        (np.zeros((3, 2), np.float32), np.array([0, 2], np.int64), ValueError),
        (np.zeros((3, 2), np.float32), np.array([0, 2, 1, 3], np.int64), ValueError),
        (np.zeros((3, 2), np.float32), np.array([0, 3], np.int32), TypeError),
        (np.zeros((3, 0), np.float32), np.array([0, 3], np.int64), ValueError),
    ],
)
def test_bad_construction(emb, off, err):
    with pytest.raises(err):
        MultiVectors(emb, off)


def test_validate_finite_names_document():
    mv = random_docs(4, dim=3)
    emb = mv.embeddings.copy()
    emb[mv.offsets[2]] = np.nan
    with pytest.raises(ValueError, match="document 2"):
        MultiVectors(emb, mv.offsets).validate_finite()


@pytest.mark.parametrize("k", [0, -3])
def test_check_k_rejects_non_positive(k):
    with pytest.raises(ValueError, match="k="):
        check_k(k)
    with pytest.raises(TypeError):
        check_k(2.5)


def test_search_result_external_and_run():
    res = SearchResult(np.array([[2.0, -np.inf]], np.float32), np.array([[1, -1]]), ["a", "b"])
    assert res.external(0) == [("b", 2.0)]
    assert res.to_run(["q"]) == {"q": {"b": 2.0}}
