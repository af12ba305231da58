"""Input documents as untrusted input: every JSONL record of ``add --data`` and ``build
--data`` is validated before anything is written, and the first bad one is named by file,
line and field in a one-line error; ``build`` needs a corpus alone."""

import json
from pathlib import Path

import pytest

from retrieval_prune.cli import main
from retrieval_prune.data.beir import MAX_METADATA_DEPTH, iter_jsonl, load_beir
from retrieval_prune.data.documents import read_documents
from retrieval_prune.index import storage
from retrieval_prune.index.base import load_index
from retrieval_prune.retrieve import HashingEncoder, Retriever
from retrieval_prune.safejson import value_depth as json_depth

GOOD = [
    {"_id": "d1", "title": "Boats", "text": "boats with red sails", "metadata": {"year": 1999}},
    {"id": "d2", "text": "green pears in a bowl"},
    {"_id": "d3", "title": None, "text": "  a line\u2028break and a\u0085next line  "},
    {"_id": "d4", "title": "  Only title  ", "text": ""},
]


def nested(depth: int) -> dict:
    """``{"a": {"a": ... {}}}`` with ``depth`` levels (the outer object included)."""
    value: dict = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def good_lines() -> list[bytes]:
    return [json.dumps(r, ensure_ascii=False).encode("utf-8") for r in GOOD]


# (name, bad line as bytes, expected words in the message)
BAD = [
    ("int id", b'{"_id": 17, "text": "x"}', ["'_id' is an integer", "string"]),
    ("object id", b'{"_id": {"a": 1}, "text": "x"}', ["'_id' is an object"]),
    ("missing id", b'{"text": "x"}', ["no '_id'"]),
    ("empty id", b'{"_id": "", "text": "x"}', ["'_id' is empty"]),
    ("null id", b'{"_id": null, "id": "x", "text": "x"}', ["'_id' is null"]),
    ("list title", b'{"_id": "b", "title": ["t"], "text": "x"}', ["'title' is a list, expected a string"]),
    ("dict text", b'{"_id": "b", "text": {"t": 1}}', ["'text' is an object, expected a string"]),
    ("missing text", b'{"_id": "b", "title": "t"}', ["'text' is missing"]),
    ("null text", b'{"_id": "b", "text": null}', ["'text' is null"]),
    ("metadata list", b'{"_id": "b", "text": "x", "metadata": [1, 2]}', ["'metadata' is a list", "object"]),
    ("metadata string", b'{"_id": "b", "text": "x", "metadata": "m"}', ["'metadata' is a string"]),
    ("metadata 100 deep", json.dumps({"_id": "b", "text": "x", "metadata": nested(100)}).encode(),
     ["'metadata' nests more than"]),
    ("line 100,000 deep", b"[" * 100_000, ["nests too deeply"]),
    ("object 100,000 deep", b'{"_id": "b", "text": "x", "metadata": ' + b'{"a": ' * 100_000,
     ["nests too deeply"]),
    ("surrogate text", b'{"_id": "b", "text": "ab\\ud800c"}', ["'text'", "surrogate"]),
    ("surrogate title", b'{"_id": "b", "title": "\\udfff", "text": "x"}', ["'title'", "surrogate"]),
    ("surrogate id", b'{"_id": "b\\ud800", "text": "x"}', ["'_id'", "surrogate"]),
    ("surrogate metadata value", b'{"_id": "b", "text": "x", "metadata": {"k": ["ok", "\\ud83d"]}}',
     ["metadata.k[1]", "surrogate"]),
    ("surrogate metadata key", b'{"_id": "b", "text": "x", "metadata": {"a": {"\\udc00": 1}}}',
     ["key of 'metadata.a'", "surrogate"]),
    ("non-UTF-8 bytes", b'{"_id": "b", "text": "caf\xe9"}', ["not valid UTF-8", "0xe9"]),
    ("invalid JSON", b'{"_id": "b", "text": "x"', ["not valid JSON"]),
    ("huge integer", b'{"_id": "b", "text": "x", "n": ' + b"1" * 5000 + b"}", ["not valid JSON"]),
    ("not an object", b'["b", "x"]', ["is a list, expected a JSON object"]),
    ("duplicate id", b'{"_id": "d1", "text": "again"}', ["duplicate document id 'd1'", "line 1"]),
]


@pytest.mark.parametrize("line,words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_record_is_named_by_file_line_and_field(tmp_path, line, words):
    # four good records, a blank line (line numbers are physical lines), the bad one on
    # line 6, and a second bad one that must not be the one reported
    lines = [*good_lines(), b"   ", line, b'{"_id": 5}']
    path = write_lines(tmp_path / "docs.jsonl", lines)
    with pytest.raises(ValueError) as info:
        read_documents(path)
    msg = str(info.value)
    assert "\n" not in msg and "\r" not in msg
    assert msg.startswith(f"{path}:6: "), msg
    for w in words:
        assert w in msg, msg
    assert len(msg) < 400


def test_bad_first_line_and_folder(tmp_path):
    write_lines(tmp_path / "corpus.jsonl", [b'{"_id": "a", "title": 3, "text": "x"}'])
    with pytest.raises(ValueError, match=r"corpus\.jsonl:1: 'title' is an integer"):
        read_documents(tmp_path)


def test_good_file_reads_as_before(tmp_path):
    lines = good_lines()
    path = write_lines(tmp_path / "docs.jsonl", [lines[0], b"", lines[1], lines[2] + b"\r", lines[3]])
    ids, texts, metas = read_documents(path)
    assert ids == ["d1", "d2", "d3", "d4"]
    assert texts == ["Boats boats with red sails", "green pears in a bowl",
                     "a line\u2028break and a\u0085next line", "Only title"]
    assert metas == [{"year": 1999, "title": "Boats"}, {}, {}, {"title": "Only title"}]


def test_bom_and_deep_but_allowed_metadata(tmp_path):
    meta = nested(MAX_METADATA_DEPTH)
    assert json_depth(meta) == MAX_METADATA_DEPTH
    rec = {"_id": "x", "text": "t", "metadata": meta}
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(rec).encode() + b"\n")
    ids, _, metas = read_documents(path)
    assert ids == ["x"] and metas == [meta]


def test_json_depth_is_iterative():
    assert json_depth(1) == 0 and json_depth({}) == 1 and json_depth({"a": [1, {"b": []}]}) == 4
    deep: list = []
    for _ in range(100_000):  # far past the recursion limit
        deep = [deep]
    assert json_depth(deep) == 100_001
    assert json_depth(deep, limit=32) == 33


def test_iter_jsonl_splits_on_newline_only(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes('{"t": "a\u2028b\u0085c"}\r\n\n{"t": 2}'.encode())
    assert list(iter_jsonl(path)) == [(1, {"t": "a\u2028b\u0085c"}), (3, {"t": 2})]
    path.write_bytes(b'{"t": "a\rb"}\n')  # a raw CR inside a string is not JSON
    with pytest.raises(ValueError, match=r"x\.jsonl:1: not valid JSON \(Invalid control character at column"):
        list(iter_jsonl(path))


# -- the add command leaves the index alone -----------------------------------------------------
@pytest.fixture
def small_index(tmp_path):
    root = tmp_path / "ix"
    ids = ["d1", "d2", "d3"]
    texts = ["red boats on the sea", "green pears in a bowl", "a cat asleep on a mat"]
    Retriever.from_texts(ids, texts, HashingEncoder(dim=32), "exact", path=root)
    return root


@pytest.mark.parametrize("line", [b'{"_id": 7, "text": "x"}', b'{"_id": "n9", "text": "\\ud800"}',
                                  b"[" * 100_000, b'{"_id": "n9", "text": "\xff"}'],
                         ids=["int id", "surrogate", "deep", "bytes"])
def test_cli_add_rejects_bad_file_and_writes_nothing(small_index, tmp_path, capsys, line):
    gen = storage.current_generation(small_index)
    before = sorted(load_index(small_index).doc_ids)
    good = json.dumps({"_id": "n1", "text": "fresh oranges"}).encode()
    bad = write_lines(tmp_path / "bad.jsonl", [good, line])
    assert main(["add", str(small_index), "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("retrieval-prune add: error: ") and f"{bad}:2: " in err
    assert err.count("\n") == 1
    assert storage.current_generation(small_index) == gen
    assert sorted(load_index(small_index).doc_ids) == before


def test_cli_add_good_file_still_works(small_index, tmp_path, capsys):
    rows = [{**r, "_id": "n" + r.get("_id", r.get("id"))} for r in GOOD]
    good = write_lines(tmp_path / "good.jsonl", [json.dumps(r).encode() for r in rows])
    assert main(["add", str(small_index), "--data", str(good), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["documents"] == 7
    assert "nd1" in load_index(small_index).doc_ids


# -- build needs a corpus alone -------------------------------------------------------------------
def test_corpus_only_folder_and_file(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    write_lines(folder / "corpus.jsonl", good_lines())
    with pytest.raises(FileNotFoundError, match="queries.jsonl"):
        load_beir(folder)
    c = load_beir(folder, require_judgements=False)
    assert c.name == "mine" and c.doc_ids == ["d1", "d2", "d3", "d4"]
    assert c.queries == {} and c.qrels == {}
    assert c.doc_texts[0] == "Boats boats with red sails"
    assert c.metadata[0] == {"title": "Boats", "year": 1999}
    c2 = load_beir(folder, require_judgements=False, max_docs=2)
    assert c2.doc_ids == ["d1", "d2"] and c2.name == "mine[:2]"
    c3 = load_beir(folder / "corpus.jsonl", require_judgements=False)
    assert c3.doc_ids == c.doc_ids and c3.name == "corpus"
    with pytest.raises(FileNotFoundError, match="is a file"):
        load_beir(folder / "corpus.jsonl")
    with pytest.raises(FileNotFoundError, match="corpus.jsonl is missing"):
        load_beir(tmp_path, require_judgements=False)


def test_load_beir_validates_corpus_but_allows_missing_text(tmp_path):
    write_lines(tmp_path / "corpus.jsonl", [b'{"_id": "a", "title": "only a title"}',
                                            b'{"_id": "b", "text": ["x"]}'])
    with pytest.raises(ValueError, match=r"corpus\.jsonl:2: 'text' is a list"):
        load_beir(tmp_path, require_judgements=False)
    write_lines(tmp_path / "corpus.jsonl", [b'{"_id": "a", "title": "only a title"}'])
    assert load_beir(tmp_path, require_judgements=False).doc_texts == ["only a title"]


def test_corpus_with_queries_but_no_qrels(tmp_path):
    write_lines(tmp_path / "corpus.jsonl", good_lines())
    (tmp_path / "queries.jsonl").write_text(json.dumps({"_id": "q", "text": "boats"}) + "\n")
    with pytest.raises(FileNotFoundError, match="splits available"):
        load_beir(tmp_path)
    c = load_beir(tmp_path, require_judgements=False)
    assert c.queries == {"q": "boats"} and c.qrels == {}
