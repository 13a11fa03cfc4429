"""Where training text comes from: the built-in corpus, plain text files or JSON Lines.

Every source yields whole documents; `load_documents` cleans them into the list that
`gptlab.data.prepare.prepare_dataset` tokenizes.
"""

from __future__ import annotations

import codecs
import glob
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import unicodedata
from collections.abc import Iterable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from gptlab.data.errors import DataError

log = logging.getLogger(__name__)

SOURCES = ("builtin", "files", "jsonl")
NORMALIZATIONS = ("NFC", "NFKC", None)
DECODE_ERRORS = ("replace", "strict")

_BINARY_SNIFF_BYTES = 8192


def builtin_corpus(include_site_packages: bool = False) -> list[str]:
    """The download-free corpus: docstrings of the standard library plus pydoc's topic texts.

    Deterministic for a given Python build (and, with `include_site_packages`, for the
    installed versions of `docstring_corpus.SITE_PACKAGES`): modules are visited in sorted
    order, only objects defined in the module being visited count, and repeated docstrings
    are kept once.

    The modules are imported in a fresh interpreter: the walk imports hundreds of them (some
    change interpreter state), and a library the caller imported earlier may have patched
    the standard library, which would change what is found.
    """
    return _run_corpus_script(include_site_packages)


def builtin_docstring_records(include_site_packages: bool = False) -> list[tuple[str, str, str]]:
    """(module, qualified name, docstring) behind every docstring of `builtin_corpus`, in walk
    order, repeats included (the same text can be found in several places). Finetuning tasks
    built from the corpus use it, e.g. "which package does this docstring come from?"."""
    return [tuple(record) for record in _run_corpus_script(include_site_packages, "--records")]


def _run_corpus_script(include_site_packages: bool, *flags: str) -> list:
    script = Path(__file__).with_name("docstring_corpus.py")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "corpus.json"
        # -P keeps the script's and working directories off sys.path, so no local file can
        # shadow a standard module.
        command = [sys.executable, "-P", "-W", "ignore", str(script), str(out), *flags]
        if include_site_packages:
            command.append("--site-packages")
        proc = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"collecting the built-in corpus failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text(encoding="utf-8"))


def iter_text_files(
    patterns: list[str] | str, errors: str = "replace"
) -> Iterator[tuple[str, str]]:
    """Yield (path, text) for every file matching `patterns`, one document per file.

    Patterns are globs (``**`` recurses), each expanded in sorted order; a pattern matching
    no file is an error. Files with a NUL byte in their first 8 KiB are taken to be binary
    and skipped with a warning. `errors` decides what invalid UTF-8 does: "replace" puts
    U+FFFD in its place, "strict" raises a DataError naming the file and byte offset.
    """
    _check_choice("errors", errors, DECODE_ERRORS)
    for path in _expand(patterns):
        data = path.read_bytes()
        if b"\0" in data[:_BINARY_SNIFF_BYTES]:
            log.warning("skipping %s: looks binary (NUL byte in the first 8 KiB)", path)
            continue
        yield str(path), _decode(data, path, errors)


def iter_jsonl(
    patterns: list[str] | str, text_field: str = "text", errors: str = "replace"
) -> Iterator[tuple[str, str]]:
    """Yield ("path:line", text) for each non-blank line of the JSON Lines files in `patterns`.

    Each line must be a JSON object whose `text_field` holds a string. Globs and `errors`
    work as in `iter_text_files`.
    """
    for path, line_number, value in iter_jsonl_values(patterns, errors):
        where = f"{path}, line {line_number}"
        yield f"{path}:{line_number}", json_field(value, text_field, str, where)


def iter_jsonl_values(
    patterns: list[str] | str, errors: str = "replace"
) -> Iterator[tuple[Path, int, Any]]:
    """Yield (path, line number, parsed JSON) for each non-blank line of the JSON Lines files in
    `patterns`; invalid JSON is a DataError naming the file and line."""
    _check_choice("errors", errors, DECODE_ERRORS)
    for path in _expand(patterns):
        offset = 0
        with path.open("rb") as f:
            for line_number, raw in enumerate(f, start=1):
                line = _decode(raw, path, errors, offset)
                offset += len(raw)
                if not line.strip():
                    continue
                try:
                    yield path, line_number, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{path}, line {line_number}: not valid JSON ({e.msg})"
                    ) from None


_KIND_NAMES = {str: "a string", list: "a list", dict: "an object"}


def json_field(record: Any, key: str, kind: type, where: str) -> Any:
    """`record[key]` of a JSON object, which must hold a `kind`; else a DataError naming `where`
    (a file and line, say) and what was expected."""
    if not isinstance(record, dict) or key not in record:
        raise DataError(f"{where}: expected a JSON object with key {key!r}")
    value = record[key]
    if not isinstance(value, kind):
        expected = _KIND_NAMES.get(kind, kind.__name__)
        raise DataError(f"{where}: key {key!r} holds {type(value).__name__}, expected {expected}")
    return value


def _expand(patterns: list[str] | str) -> list[Path]:
    """Files matching `patterns`: each pattern sorted, patterns in order, duplicates dropped."""
    if isinstance(patterns, str):  # a bare string would otherwise be read as one pattern per char
        patterns = [patterns]
    files: dict[str, None] = {}
    for pattern in patterns:
        matches = glob.glob(os.path.expanduser(pattern), recursive=True)
        matched_files = sorted(m for m in matches if os.path.isfile(m))
        if not matched_files:
            raise FileNotFoundError(f"no files match {pattern!r}")
        files.update(dict.fromkeys(matched_files))
    return [Path(name) for name in files]


def _decode(data: bytes, path: Path, errors: str, offset: int = 0) -> str:
    """Decode UTF-8 `data` found at byte `offset` of `path`, dropping a leading byte-order mark."""
    if offset == 0 and data.startswith(codecs.BOM_UTF8):
        data, offset = data[len(codecs.BOM_UTF8) :], len(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: invalid UTF-8 at byte offset {offset + e.start}; fix the file "
            "or decode with errors='replace'"
        ) from None


def clean_document(text: str, normalize: str | None = "NFC", strip_html: bool = False) -> str:
    """Normalise one document for training.

    Line endings become ``\\n``; with `strip_html`, tags are removed (script and style
    content too) and entities unescaped; `normalize` applies a Unicode normal form
    ("NFC", "NFKC" or None); trailing whitespace on each line and blank lines at either
    end of the document are removed.
    """
    _check_choice("normalize", normalize, NORMALIZATIONS)
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


def load_documents(
    source: str,
    paths: list[str] | None = None,
    text_field: str = "text",
    include_site_packages: bool = False,
    normalize: str | None = "NFC",
    strip_html: bool = False,
    drop_empty: bool = True,
    errors: str = "replace",
) -> list[str]:
    """Read and clean the documents of `source` ("builtin", "files" or "jsonl").

    "builtin" takes no `paths`; "files" and "jsonl" need at least one path or glob.
    A DataError says "corpus is empty" when no non-empty document is left.
    """
    _check_choice("source", source, SOURCES)
    _check_choice("normalize", normalize, NORMALIZATIONS)
    if source == "builtin":
        if paths:
            raise ValueError(
                f"source 'builtin' takes no paths, got {list(paths)}; "
                "use source 'files' or 'jsonl' to read them"
            )
        raw: Iterable[str] = builtin_corpus(include_site_packages)
    else:
        if not paths:
            raise ValueError(f"source {source!r} needs paths: a list of files or glob patterns")
        items = (
            iter_text_files(paths, errors)
            if source == "files"
            else iter_jsonl(paths, text_field, errors)
        )
        raw = (text for _, text in items)
    docs = [clean_document(text, normalize, strip_html) for text in raw]
    if drop_empty:
        docs = [doc for doc in docs if doc.strip()]
    if not any(docs):
        where = f" with paths {list(paths)}" if paths else ""
        raise DataError(f"corpus is empty: source {source!r}{where} gave no non-empty documents")
    return docs


def _check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {list(choices)}")
