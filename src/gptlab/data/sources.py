"""Where training text comes from: the built-in corpus, plain text files, JSON Lines, Parquet
files, or a Hugging Face `datasets` dataset (streamed, so a large one needs no full download).

Every source yields whole documents; `load_documents` cleans them into the list that
`gptlab.data.prepare.prepare_dataset` tokenizes. Parquet needs `pyarrow` and Hugging Face
datasets need `datasets` (the optional extras ``gptlab[parquet]`` and ``gptlab[hf]``); both are
imported only when such a source is read.
"""

from __future__ import annotations

import codecs
import glob
import importlib
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from html.parser import HTMLParser
from pathlib import Path
from types import ModuleType
from typing import Any

from gptlab.data.errors import DataError

log = logging.getLogger(__name__)

SOURCES = ("builtin", "files", "jsonl", "parquet", "hf")
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
    if not isinstance(record, Mapping):
        got = _KIND_NAMES.get(type(record), type(record).__name__)
        raise DataError(f"{where}: expected a JSON object with key {key!r}, got {got}")
    if key not in record:
        raise DataError(
            f"{where}: expected a JSON object with key {key!r}; the record has {sorted(record)}"
        )
    value = record[key]
    if not isinstance(value, kind):
        expected = _KIND_NAMES.get(kind, kind.__name__)
        raise DataError(f"{where}: key {key!r} holds {type(value).__name__}, expected {expected}")
    return value


def iter_parquet(patterns: list[str] | str, text_field: str = "text") -> Iterator[tuple[str, str]]:
    """Yield ("path:row", text) for each row of the Parquet files in `patterns` (globs as in
    `iter_text_files`). Only the `text_field` column is read, a record batch at a time, so
    files larger than memory stream. Needs `pyarrow` (``pip install 'gptlab[parquet]'``)."""
    pa = _import_optional("pyarrow", "parquet")
    parquet = _import_optional("pyarrow.parquet", "parquet")
    for path in _expand(patterns):
        try:
            file = parquet.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        schema = file.schema_arrow
        if text_field not in schema.names:
            raise DataError(
                f"{path}: no column {text_field!r}; the columns are {schema.names} "
                "(set data.text_field)"
            )
        column_type = schema.field(text_field).type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
            raise DataError(f"{path}: column {text_field!r} holds {column_type}, expected strings")
        row = 0
        for batch in file.iter_batches(columns=[text_field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if text is None:
                    raise DataError(f"{path}, row {row}: column {text_field!r} is null")
                yield f"{path}:{row}", text
                row += 1


def iter_hf_dataset(
    path: str,
    name: str | None = None,
    split: str = "train",
    text_field: str = "text",
    streaming: bool = True,
    data_files: str | list[str] | None = None,
    revision: str | None = None,
) -> Iterator[tuple[str, str]]:
    """Yield ("path[split]:index", text) for each record of a Hugging Face dataset.

    `path`, `name`, `split`, `data_files` and `revision` are those of `datasets.load_dataset`:
    a Hub dataset ("roneneldan/TinyStories"), or a builder such as "json" or "parquet" with
    local `data_files`. With `streaming` (the default), records arrive as they are downloaded,
    so stopping early (`max_documents`) downloads only what was used. Needs `datasets`
    (``pip install 'gptlab[hf]'``).
    """
    datasets = _import_optional("datasets", "hf")
    dataset = datasets.load_dataset(
        path, name, split=split, streaming=streaming, data_files=data_files, revision=revision
    )
    for index, record in enumerate(dataset):
        where = f"{path}[{split}]:{index}"
        yield where, json_field(record, text_field, str, where)


def _import_optional(module: str, extra: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"this data source needs the {module.split('.')[0]!r} package: "
            f"pip install 'gptlab[{extra}]' ({e})"
        ) from e


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
            "or set data.errors=replace"
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
    hf: Mapping[str, Any] | None = None,
    max_documents: int | None = None,
) -> list[str]:
    """Read and clean the documents of `source` (one of `SOURCES`).

    "builtin" and "hf" take no `paths`; "files", "jsonl" and "parquet" need at least one path
    or glob. "hf" takes the keyword arguments of `iter_hf_dataset` (at least "path") as `hf`.
    `max_documents` keeps only the first that many documents left after cleaning (None: all);
    a streamed source is read no further. A DataError says "corpus is empty" when no
    non-empty document is left.
    """
    _check_choice("source", source, SOURCES)
    _check_choice("normalize", normalize, NORMALIZATIONS)
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"max_documents must be None or >= 1, got {max_documents}")
    raw = _raw_texts(source, paths, text_field, include_site_packages, errors, hf)
    docs = (clean_document(text, normalize, strip_html) for text in raw)
    if drop_empty:
        docs = (doc for doc in docs if doc.strip())
    kept = list(itertools.islice(docs, max_documents))
    if not any(kept):
        where = f" with paths {list(paths)}" if paths else ""
        raise DataError(f"corpus is empty: source {source!r}{where} gave no non-empty documents")
    return kept


def _raw_texts(
    source: str,
    paths: list[str] | None,
    text_field: str,
    include_site_packages: bool,
    errors: str,
    hf: Mapping[str, Any] | None,
) -> Iterable[str]:
    if source in ("builtin", "hf"):
        if paths:
            raise ValueError(
                f"source {source!r} takes no paths, got {list(paths)}; "
                "use source 'files', 'jsonl' or 'parquet' to read them"
            )
        if source == "builtin":
            return builtin_corpus(include_site_packages)
        if not hf or not hf.get("path"):
            raise ValueError(
                "source 'hf' needs hf.path: a Hugging Face Hub dataset such as "
                "'roneneldan/TinyStories', or a builder such as 'json' with hf.data_files"
            )
        return (text for _, text in iter_hf_dataset(**hf, text_field=text_field))
    if not paths:
        raise ValueError(f"source {source!r} needs paths: a list of files or glob patterns")
    if source == "files":
        items = iter_text_files(paths, errors)
    elif source == "jsonl":
        items = iter_jsonl(paths, text_field, errors)
    else:
        items = iter_parquet(paths, text_field)
    return (text for _, text in items)


def _check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {list(choices)}")
