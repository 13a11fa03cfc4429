"""Where documents come from: the built-in corpus, text files, JSON lines, and the cleaning
every document gets; bad input is named with its file and place."""

import json
import logging
import time

import pytest

from gptlab.data.clean import clean_document
from gptlab.data.sources import (
    builtin_corpus,
    iter_jsonl,
    iter_text_files,
    load_documents,
)
from gptlab.errors import DataError


@pytest.fixture(scope="module")
def corpus_and_seconds():
    start = time.perf_counter()
    corpus = builtin_corpus()
    return corpus, time.perf_counter() - start


def test_builtin_corpus_is_substantial_english(corpus_and_seconds):
    corpus, _ = corpus_and_seconds
    assert sum(len(doc.encode("utf-8")) for doc in corpus) > 1_000_000
    assert len(set(corpus)) == len(corpus)
    text = "\n".join(corpus)
    assert sum(ch.isascii() for ch in text) / len(text) > 0.99
    assert all(len(doc.split()) >= 4 for doc in corpus)
    assert any(doc.startswith("Return the square root of x") for doc in corpus)  # math.sqrt


def test_builtin_corpus_is_deterministic(corpus_and_seconds):
    corpus, seconds = corpus_and_seconds
    assert seconds < 10  # otherwise this test belongs under the slow marker
    assert builtin_corpus() == corpus


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def test_text_files_sorted_recursive_and_binary_skipped(tmp_path, caplog):
    _write(tmp_path / "b.txt", "second")
    _write(tmp_path / "a.txt", "\ufefffirst")  # BOM is dropped
    _write(tmp_path / "sub" / "deep" / "c.txt", "third")
    _write(tmp_path / "sub" / "image.txt", b"\x89PNG\x00\x00binary")
    with caplog.at_level(logging.WARNING):
        docs = list(iter_text_files([str(tmp_path / "**" / "*.txt")]))
    assert [text for _, text in docs] == ["first", "second", "third"]
    assert "image.txt" in caplog.text and "binary" in caplog.text


def test_text_files_dedupe_across_patterns(tmp_path):
    _write(tmp_path / "a.txt", "one")
    docs = list(iter_text_files([str(tmp_path / "a.txt"), str(tmp_path / "*.txt")]))
    assert docs == [(str(tmp_path / "a.txt"), "one")]


def test_pattern_without_match_is_named(tmp_path):
    _write(tmp_path / "a.txt", "one")
    pattern = str(tmp_path / "*.md")
    with pytest.raises(FileNotFoundError, match=r"\*\.md"):
        list(iter_text_files([str(tmp_path / "a.txt"), pattern]))


def test_non_utf8_replace_or_strict(tmp_path):
    path = _write(tmp_path / "latin1.txt", "caf\xe9 ok".encode("latin-1"))
    assert list(iter_text_files([str(path)])) == [(str(path), "caf\ufffd ok")]
    with pytest.raises(DataError, match=r"latin1\.txt.*byte offset 3"):
        list(iter_text_files([str(path)], errors="strict"))
    with pytest.raises(ValueError, match="unknown errors 'ignore'"):
        list(iter_text_files([str(path)], errors="ignore"))


def test_jsonl(tmp_path):
    lines = [json.dumps({"text": "first"}), "", json.dumps({"text": "second", "id": 2})]
    path = _write(tmp_path / "data.jsonl", "\n".join(lines) + "\n")
    assert list(iter_jsonl([str(path)])) == [(f"{path}:1", "first"), (f"{path}:3", "second")]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", r"data\.jsonl, line 2: not valid JSON"),
        ('{"body": "x"}', r"data\.jsonl, line 2: expected a JSON object with key 'text'"),
        ('["text"]', r"data\.jsonl, line 2: expected a JSON object with key 'text'"),
        ('{"text": 5}', r"data\.jsonl, line 2: key 'text' holds int, expected a string"),
    ],
)
def test_jsonl_bad_line_is_named(tmp_path, bad_line, message):
    path = _write(tmp_path / "data.jsonl", '{"text": "ok"}\n' + bad_line + "\n")
    with pytest.raises(DataError, match=message):
        list(iter_jsonl([str(path)]))


def test_jsonl_strict_decoding_names_file_offset(tmp_path):
    path = _write(tmp_path / "data.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"data\.jsonl: invalid UTF-8 at byte offset 25"):
        list(iter_jsonl([str(path)], errors="strict"))


def test_clean_document_normalisation():
    decomposed = "cafe\u0301 \ufb01le"  # e + combining acute; "fi" ligature
    assert clean_document(decomposed) == "caf\u00e9 \ufb01le"
    assert clean_document(decomposed, normalize="NFKC") == "caf\u00e9 file"
    assert clean_document(decomposed, normalize=None) == decomposed
    with pytest.raises(ValueError, match="unknown normalize 'NFX'"):
        clean_document("x", normalize="NFX")


def test_clean_document_whitespace():
    text = "\n\nline one   \r\nline two\t\rline three  \n\n"
    assert clean_document(text) == "line one\nline two\nline three"


def test_clean_document_html():
    html = (
        "<html><head><title>t</title><style>p {color: red}</style></head><body>"
        "<h1>Title</h1><p>Fish &amp; chips &lt;3</p><script>alert(1)</script>"
        "<p>second<br>line</p></body></html>"
    )
    assert clean_document(html, strip_html=True) == "Title\n\nFish & chips <3\n\nsecond\nline"
    assert clean_document("a <b>bold</b> move") == "a <b>bold</b> move"


def test_load_documents_files(tmp_path):
    _write(tmp_path / "a.txt", "<p>Hello</p>  ")
    _write(tmp_path / "b.txt", " \n\n ")
    docs = load_documents("files", [str(tmp_path / "*.txt")], strip_html=True)
    assert docs == ["Hello"]
    kept = load_documents("files", [str(tmp_path / "*.txt")], drop_empty=False)
    assert kept == ["<p>Hello</p>", ""]


def test_load_documents_empty_corpus_names_source(tmp_path):
    _write(tmp_path / "empty.txt", "   \n")
    with pytest.raises(DataError, match=r"corpus is empty: source 'files' with paths .*empty"):
        load_documents("files", [str(tmp_path / "empty.txt")])


def test_load_documents_argument_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown source 'web'.*'builtin', 'files', 'jsonl'"):
        load_documents("web", None)
    with pytest.raises(ValueError, match="source 'jsonl' needs paths"):
        load_documents("jsonl", [])
    with pytest.raises(ValueError, match="source 'builtin' takes no paths"):
        load_documents("builtin", ["x.txt"])
