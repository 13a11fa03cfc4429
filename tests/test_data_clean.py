"""What a document is: splitting texts read in blocks, duplicates, files matched twice."""

import os
import random
import re

import numpy as np
import pytest

from gptlab.data.clean import DigestSet, DocumentSplit
from gptlab.data.prepare import prepare_dataset
from gptlab.data.sources import Source, task_part
from tests.kit import synthetic_documents

TEXT = "intro line\n\n= One =\nfirst\r\n  \r\nbody\n\n\n= Two =\nsecond\n\n"


def blocks_of(text, size):
    return [text[i : i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize("block", [1, 2, 3, 7, 1000])
def test_splits_do_not_depend_on_how_the_text_is_read(block):
    blocks = blocks_of(TEXT, block)
    # References written with re.split / slicing on the whole text.
    paragraphs = [p for p in re.split(r"\r?\n(?:[ \t]*\r?\n)+", TEXT) if p.strip()]
    assert list(DocumentSplit("paragraph").split(blocks)) == paragraphs
    starts = [0, *(m.start() for m in re.finditer(r"(?m)^= ", TEXT))]
    articles = [TEXT[a:b] for a, b in zip(starts, [*starts[1:], len(TEXT)], strict=True)]
    assert list(DocumentSplit("regex", regex=r"(?m)^= ").split(blocks)) == articles
    chunks = [TEXT[i : i + 5] for i in range(0, len(TEXT), 5)]
    assert list(DocumentSplit("chunk", chunk_chars=5).split(blocks)) == chunks
    assert list(DocumentSplit("file").split(blocks)) == [TEXT]


def test_document_split_settings_are_checked():
    with pytest.raises(ValueError, match=r"unknown corpus.document_split 'page'; choose one of"):
        DocumentSplit("page")
    with pytest.raises(ValueError, match="needs corpus.document_regex"):
        DocumentSplit("regex")
    with pytest.raises(ValueError, match=r"corpus.document_regex '\(' is invalid"):
        DocumentSplit("regex", regex="(")
    with pytest.raises(ValueError, match="corpus.chunk_chars must be >= 1"):
        DocumentSplit("chunk", chunk_chars=0)


def test_a_large_file_is_read_in_blocks(tmp_path, monkeypatch):
    from gptlab.data import sources

    monkeypatch.setattr(sources, "_READ_BLOCK_BYTES", 64)
    text = "\n\n".join(synthetic_documents(50)) + "\n\ncafé ünïcode " * 20
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    source = Source("files", [str(tmp_path / "big.txt")], split=DocumentSplit("paragraph"))
    assert list(source.documents()) == [p for p in text.split("\n\n") if p.strip()]


def test_digest_set_matches_a_python_set():
    rng = np.random.default_rng(0)
    seen, reference = DigestSet(), set()
    for _ in range(200):
        batch = rng.integers(0, 3000, rng.integers(1, 40)).astype(np.uint64)
        expected = []
        for value in batch.tolist():
            expected.append(value not in reference)
            reference.add(value)
        assert seen.add(batch).tolist() == expected
    assert len(seen) == len(reference)
    assert len(seen.levels) <= 2 * np.log2(len(reference))


def test_a_file_matched_twice_is_read_once(tmp_path):
    docs = synthetic_documents(250)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(docs):
        (corpus / f"{i:03d}.txt").write_text(doc)
        os.symlink(corpus / f"{i:03d}.txt", corpus / f"{i:03d}.u8")  # as fortunes ships
    patterns = [str(corpus / "*"), str(corpus / "00*.txt")]
    assert list(Source("files", patterns).documents()) == docs
    manifest = prepare_dataset(Source("files", patterns), tmp_path / "out", 300, progress=False)
    assert manifest["dropped"] == {"empty": 0, "duplicate": 0}
    kept = sum(split["documents"] for split in manifest["splits"].values())
    assert kept == len(docs)


def test_copies_under_other_names_are_dropped_as_duplicates(tmp_path):
    docs = synthetic_documents(250)
    for i, doc in enumerate(docs):
        (tmp_path / f"{i:03d}.txt").write_text(doc)
    for i in range(5):
        (tmp_path / f"copy_{i}.txt").write_text(docs[i * 7] + "\n\n")  # equal once cleaned
    from gptlab.data.clean import Cleaning

    manifest = prepare_dataset(
        Source("files", [str(tmp_path / "*.txt")]),
        tmp_path / "out",
        300,
        cleaning=Cleaning(),
        progress=False,
    )
    assert manifest["dropped"] == {"empty": 0, "duplicate": 5}


def test_task_parts_are_contiguous_balanced_and_cover_everything():
    rng = random.Random(0)
    for _ in range(100):
        sizes = [rng.choice([0, 1, 5, 100]) for _ in range(rng.randint(0, 30))]
        tasks = rng.randint(1, 6)
        parts = [task_part(sizes, i, tasks) for i in range(tasks)]
        assert [i for part in parts for i in part] == list(range(len(sizes)))
        total = sum(sizes)
        for part in parts:  # no task holds more than its share plus one item
            assert sum(sizes[i] for i in part) <= total / tasks + max(sizes, default=0)
