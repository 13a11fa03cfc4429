"""What a document is and how it is cleaned: splitting a text into documents, normalisation,
and exact-duplicate detection.

`split_text` cuts a source's texts into documents (`DOCUMENT_SPLITS`); `Cleaning` turns a raw
document into training text (or nothing, when it is empty); `DigestSet` remembers which
documents were already seen, in 8 bytes per document.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser

import numpy as np

NORMALIZATIONS = ("NFC", "NFKC", None)
DOCUMENT_SPLITS = ("file", "paragraph", "regex", "chunk")

# A blank line (spaces or tabs allowed) between two paragraphs, whatever the line endings.
_PARAGRAPH_BREAK = re.compile(r"\r?\n(?:[^\S\r\n]*\r?\n)+")


def check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {list(choices)}")


@dataclass(frozen=True)
class DocumentSplit:
    """What one document is within a text the source yields (a file, a JSON record, ...).

    file: the whole text; paragraph: the pieces between blank lines; regex: a new document
    starts at every match of `regex` (the match belongs to the document it starts), for
    example ``(?m)^= `` for a heading per article; chunk: `chunk_chars` characters each.
    """

    how: str = "file"
    regex: str | None = None
    chunk_chars: int = 1_000_000

    def __post_init__(self) -> None:
        check_choice("corpus.document_split", self.how, DOCUMENT_SPLITS)
        if self.how == "regex":
            if not self.regex:
                raise ValueError("corpus.document_split=regex needs corpus.document_regex")
            try:
                re.compile(self.regex)
            except re.error as e:
                raise ValueError(f"corpus.document_regex {self.regex!r} is invalid: {e}") from None
        if self.chunk_chars < 1:
            raise ValueError(f"corpus.chunk_chars must be >= 1, got {self.chunk_chars}")

    def split(self, blocks: Iterable[str]) -> Iterator[str]:
        """The documents of one text, given as consecutive `blocks` (so a file larger than
        memory can be read a block at a time). A match of the boundary pattern must fit
        within two consecutive blocks."""
        if self.how == "file":
            yield "".join(blocks)
        elif self.how == "chunk":
            yield from _chunks(blocks, self.chunk_chars)
        elif self.how == "paragraph":
            yield from _split_at(blocks, _PARAGRAPH_BREAK, keep_match=False)
        else:
            yield from _split_at(blocks, re.compile(self.regex), keep_match=True)


def _chunks(blocks: Iterable[str], size: int) -> Iterator[str]:
    pending = ""
    for block in blocks:
        pending += block
        cut = len(pending) - len(pending) % size
        for start in range(0, cut, size):
            yield pending[start : start + size]
        pending = pending[cut:]
    if pending:
        yield pending


def _split_at(blocks: Iterable[str], boundary: re.Pattern, keep_match: bool) -> Iterator[str]:
    """The non-blank pieces between matches of `boundary` (with `keep_match`, each match opens
    the next piece). A match reaching the end of the text read so far may grow with the next
    block, so it waits for more text (or the end)."""
    pending = ""
    for block in itertools.chain(blocks, [None]):
        pending += block or ""
        start = 0
        for match in boundary.finditer(pending):
            if block is not None and match.end() == len(pending):
                break
            if pending[start : match.start()].strip():
                yield pending[start : match.start()]
            start = match.start() if keep_match else match.end()
        pending = pending[start:]
    if pending.strip():
        yield pending


@dataclass(frozen=True)
class Cleaning:
    """How a raw document becomes training text (see `clean_document`); with `drop_empty`, a
    document left empty is dropped (None)."""

    normalize: str | None = "NFC"
    strip_html: bool = False
    drop_empty: bool = True

    def __post_init__(self) -> None:
        check_choice("normalize", self.normalize, NORMALIZATIONS)

    def __call__(self, text: str) -> str | None:
        cleaned = clean_document(text, self.normalize, self.strip_html)
        return None if self.drop_empty and not cleaned.strip() else cleaned


def clean_document(text: str, normalize: str | None = "NFC", strip_html: bool = False) -> str:
    """Normalise one document for training.

    Line endings become ``\\n``; with `strip_html`, tags are removed (script and style
    content too) and entities unescaped; `normalize` applies a Unicode normal form
    ("NFC", "NFKC" or None); trailing whitespace on each line and blank lines at either
    end of the document are removed.
    """
    check_choice("normalize", normalize, NORMALIZATIONS)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if strip_html:
        text = _html_to_text(text)
    if normalize is not None:
        text = unicodedata.normalize(normalize, text)
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


class _HTMLText(HTMLParser):
    """Collects the text of an HTML document, with block elements on their own lines."""

    _HIDDEN = frozenset({"script", "style", "head", "template"})
    _BLOCK = frozenset(
        {"p", "div", "br", "hr", "li", "ul", "ol", "tr", "table", "pre", "blockquote"}
        | {"section", "article", "header", "footer", "h1", "h2", "h3", "h4", "h5", "h6"}
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)  # unescapes &amp; and friends in text
        self.parts: list[str] = []
        self._hidden_depth = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self._HIDDEN:
            self._hidden_depth += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._HIDDEN:
            self._hidden_depth = max(0, self._hidden_depth - 1)
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._hidden_depth:
            self.parts.append(data)


def _html_to_text(text: str) -> str:
    parser = _HTMLText()
    parser.feed(text)
    parser.close()
    return re.sub(r"\n{3,}", "\n\n", "".join(parser.parts))


def digest(data: bytes) -> int:
    """A 64-bit hash of a document's UTF-8 `data` that identifies it (BLAKE2b)."""
    raw = hashlib.blake2b(data, digest_size=8).digest()
    return int.from_bytes(raw, "little")


class DigestSet:
    """The document digests seen so far: 8 bytes each, in a few sorted arrays.

    Memory is 8 bytes per distinct document (80 MB for 10 million), plus as much again for a
    moment while two arrays merge. Arrays double in size as they merge (like a binary
    counter), so there are at most log2(#documents) of them to search. Two different
    documents share a digest with probability about n^2 / 2^65 for n documents (3e-6 for
    10 million): such a document would be dropped as a duplicate.
    """

    def __init__(self) -> None:
        self.levels: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(level) for level in self.levels)

    def add(self, digests: np.ndarray) -> np.ndarray:
        """Add `digests` (uint64, in document order); return a mask of those not seen before
        (of several equal ones in `digests`, the first counts as new)."""
        digests = np.asarray(digests, dtype=np.uint64)
        new = np.zeros(len(digests), dtype=bool)
        new[np.unique(digests, return_index=True)[1]] = True
        for level in self.levels:
            at = np.minimum(np.searchsorted(level, digests), len(level) - 1)
            new &= level[at] != digests
        if new.any():
            self.levels.append(np.sort(digests[new]))
            while len(self.levels) > 1 and len(self.levels[-2]) <= 2 * len(self.levels[-1]):
                last = self.levels.pop()
                self.levels[-1] = np.sort(np.concatenate([self.levels[-1], last]))
        return new
