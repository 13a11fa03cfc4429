"""Where training text comes from: the built-in corpus, plain text files, JSON Lines, Parquet
files, or a Hugging Face `datasets` dataset (streamed, so a large one needs no full download).

A `Source` streams the raw texts of one of them, cut into documents by a
`gptlab.data.clean.DocumentSplit`, optionally only the part that belongs to one task of several
(`Source.documents`); `gptlab.data.prepare.prepare_dataset` cleans and tokenizes that stream.
`load_documents` returns the cleaned documents as a list, for small corpora. Parquet needs
`pyarrow` and Hugging Face datasets need `datasets` (the optional extras ``gptlab[parquet]``
and ``gptlab[hf]``); both are imported only when such a source is read.
"""

from __future__ import annotations

import codecs
import functools
import glob
import importlib
import itertools
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from gptlab.data.clean import Cleaning, DocumentSplit, check_choice
from gptlab.errors import DataError

log = logging.getLogger(__name__)

SOURCES = ("builtin", "files", "jsonl", "parquet", "hf")
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


@functools.cache
def _builtin_texts(include_site_packages: bool) -> tuple[str, ...]:
    """`builtin_corpus`, collected once per process: prepare reads a corpus several times."""
    return tuple(builtin_corpus(include_site_packages))


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
    no file is an error, and a file matched twice (overlapping globs, or a symlink to a file
    already matched) is read once. Files with a NUL byte in their first 8 KiB are taken to be
    binary and skipped with a warning. `errors` decides what invalid UTF-8 does: "replace"
    puts U+FFFD in its place, "strict" raises a DataError naming the file and byte offset.
    """
    check_choice("errors", errors, DECODE_ERRORS)
    for path in _expand(patterns):
        blocks = _text_blocks(path, errors)
        if blocks is not None:
            yield str(path), "".join(blocks)


_READ_BLOCK_BYTES = 8 << 20


def _text_blocks(path: Path, errors: str) -> Iterator[str] | None:
    """The text of `path` in blocks of about 8 MB, or None (and a warning) if it looks binary."""
    with path.open("rb") as f:
        if b"\0" in f.read(_BINARY_SNIFF_BYTES):
            _warn_binary(path)
            return None
    return _decoded_blocks(path, errors)


@functools.cache
def _warn_binary(path: Path) -> None:
    """Once per file, however often the corpus is read."""
    log.warning("skipping %s: looks binary (NUL byte in the first 8 KiB)", path)


def _decoded_blocks(path: Path, errors: str) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    offset = 0
    with path.open("rb") as f:
        while True:
            data = f.read(_READ_BLOCK_BYTES)
            if offset == 0 and data.startswith(codecs.BOM_UTF8):
                data, offset = data[len(codecs.BOM_UTF8) :], len(codecs.BOM_UTF8)
            buffered = len(decoder.getstate()[0])  # bytes of a character cut by the last block
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                raise _invalid_utf8(path, offset - buffered + e.start) from None
            offset += len(data)
            if text:
                yield text
            if not data:
                return


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
    check_choice("errors", errors, DECODE_ERRORS)
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
                "(set corpus.text_field)"
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
    num_shards: int = 1,
    shard_index: int = 0,
) -> Iterator[tuple[str, str]]:
    """Yield ("path[split]:index", text) for each record of a Hugging Face dataset.

    `path`, `name`, `split`, `data_files` and `revision` are those of `datasets.load_dataset`:
    a Hub dataset ("roneneldan/TinyStories"), or a builder such as "json" or "parquet" with
    local `data_files`. With `streaming` (the default), records arrive as they are downloaded,
    so stopping early (`max_documents`) downloads only what was used. With `num_shards` > 1,
    only the records of shard `shard_index` (a contiguous part of the dataset's files; there
    must be at least `num_shards` files) are read. Needs `datasets`
    (``pip install 'gptlab[hf]'``).
    """
    datasets = _import_optional("datasets", "hf")
    dataset = datasets.load_dataset(
        path, name, split=split, streaming=streaming, data_files=data_files, revision=revision
    )
    if num_shards > 1:
        dataset = dataset.shard(num_shards=num_shards, index=shard_index, contiguous=True)
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
    """Files matching `patterns`: each pattern sorted, patterns in order, and a file matched
    twice (by two patterns, or through a symlink) only where it was first matched."""
    if isinstance(patterns, str):  # a bare string would otherwise be read as one pattern per char
        patterns = [patterns]
    files: dict[str, str] = {}  # real path -> the name it was first matched under
    for pattern in patterns:
        matches = glob.glob(os.path.expanduser(pattern), recursive=True)
        matched_files = sorted(m for m in matches if os.path.isfile(m))
        if not matched_files:
            raise FileNotFoundError(f"no files match {pattern!r}")
        for name in matched_files:
            files.setdefault(os.path.realpath(name), name)
    return [Path(name) for name in files.values()]


def _decode(data: bytes, path: Path, errors: str, offset: int = 0) -> str:
    """Decode UTF-8 `data` found at byte `offset` of `path`, dropping a leading byte-order mark."""
    if offset == 0 and data.startswith(codecs.BOM_UTF8):
        data, offset = data[len(codecs.BOM_UTF8) :], len(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise _invalid_utf8(path, offset + e.start) from None


def _invalid_utf8(path: Path, offset: int) -> DataError:
    return DataError(
        f"{path}: invalid UTF-8 at byte offset {offset}; fix the file or set data.errors=replace"
    )


@dataclass(frozen=True)
class Source:
    """A corpus to read: `kind` (one of `SOURCES`) with its settings, and what a document is.

    "builtin" and "hf" take no `paths`; "files", "jsonl" and "parquet" need at least one path
    or glob. "hf" takes the keyword arguments of `iter_hf_dataset` (at least "path") as `hf`.
    """

    kind: str
    paths: Sequence[str] = ()
    text_field: str = "text"
    include_site_packages: bool = False
    errors: str = "replace"
    hf: Mapping[str, Any] | None = None
    split: DocumentSplit = field(default_factory=DocumentSplit)

    def __post_init__(self) -> None:
        check_choice("source", self.kind, SOURCES)
        check_choice("errors", self.errors, DECODE_ERRORS)
        if self.kind in ("builtin", "hf") and self.paths:
            raise ValueError(
                f"source {self.kind!r} takes no paths, got {list(self.paths)}; "
                "use source 'files', 'jsonl' or 'parquet' to read them"
            )
        if self.kind == "hf" and not (self.hf and self.hf.get("path")):
            raise ValueError(
                "source 'hf' needs hf.path: a Hugging Face Hub dataset such as "
                "'roneneldan/TinyStories', or a builder such as 'json' with hf.data_files"
            )
        if self.kind not in ("builtin", "hf") and not self.paths:
            raise ValueError(f"source {self.kind!r} needs paths: a list of files or glob patterns")

    def documents(self, task_index: int = 0, num_tasks: int = 1) -> Iterator[str]:
        """The raw (uncleaned) documents, in order; with `num_tasks` > 1, only those of task
        `task_index`: a contiguous part, so the tasks' documents one after the other are the
        documents of a single task. Files (and the built-in corpus's texts) are dealt out by
        size; a Hugging Face dataset by its data files (`datasets`' ``shard``)."""
        if not 0 <= task_index < num_tasks:
            raise ValueError(f"corpus.task_index must be in [0, {num_tasks}), got {task_index}")
        for blocks in self._texts(task_index, num_tasks):
            yield from self.split.split(blocks)

    def _texts(self, task_index: int, num_tasks: int) -> Iterator[Iterable[str]]:
        """Each text of the source (of this task) as consecutive blocks."""
        if self.kind == "builtin":
            texts = _builtin_texts(self.include_site_packages)
            part = task_part([len(text) for text in texts], task_index, num_tasks)
            yield from ([texts[i]] for i in part)
        elif self.kind == "hf":
            hf = dict(self.hf) | {"num_shards": num_tasks, "shard_index": task_index}
            yield from ([text] for _, text in iter_hf_dataset(**hf, text_field=self.text_field))
        else:
            files = _expand(list(self.paths))
            part = task_part([path.stat().st_size for path in files], task_index, num_tasks)
            yield from self._file_texts([files[i] for i in part])

    def _file_texts(self, files: list[Path]) -> Iterator[Iterable[str]]:
        if self.kind == "files":
            for path in files:
                blocks = _text_blocks(path, self.errors)
                if blocks is not None:
                    yield blocks
            return
        patterns = [glob.escape(str(path)) for path in files]
        if not patterns:
            return
        if self.kind == "jsonl":
            items = iter_jsonl(patterns, self.text_field, self.errors)
        else:
            items = iter_parquet(patterns, self.text_field)
        yield from ([text] for _, text in items)

    def empty_corpus_error(self) -> DataError:
        where = f" with paths {list(self.paths)}" if self.paths else ""
        return DataError(
            f"corpus is empty: source {self.kind!r}{where} gave no non-empty documents"
        )

    def describe(self) -> str:
        if self.kind == "builtin":
            return f"builtin(include_site_packages={self.include_site_packages})"
        if self.kind == "hf":
            hf = {k: v for k, v in (self.hf or {}).items() if v is not None}
            return f"hf({', '.join(f'{k}={v}' for k, v in hf.items())})"
        return f"{self.kind}({', '.join(self.paths)})"


def task_part(sizes: Sequence[int], task_index: int, num_tasks: int) -> range:
    """The items (of `sizes`) that task `task_index` of `num_tasks` takes: a contiguous run,
    each item going to the task whose share of the total size holds the item's middle (by
    count when every size is 0)."""
    total = sum(sizes)
    if total:
        starts = itertools.accumulate(sizes[:-1], initial=0)
        middles = (2 * start + size for start, size in zip(starts, sizes, strict=True))
        owners = [min(num_tasks - 1, middle * num_tasks // (2 * total)) for middle in middles]
    else:
        owners = [i * num_tasks // len(sizes) for i in range(len(sizes))]
    first = sum(owner < task_index for owner in owners)
    return range(first, first + owners.count(task_index))


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
    """Read and clean the documents of `source` (one of `SOURCES`, see `Source`) into a list;
    for corpora that fit in memory (`prepare_dataset` streams a `Source` instead).

    `max_documents` keeps only the first that many documents left after cleaning (None: all);
    a streamed source is read no further. A DataError says "corpus is empty" when no
    non-empty document is left.
    """
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"max_documents must be None or >= 1, got {max_documents}")
    clean = Cleaning(normalize, strip_html, drop_empty)
    corpus = Source(source, paths or (), text_field, include_site_packages, errors, hf)
    docs = (doc for doc in map(clean, corpus.documents()) if doc is not None)
    kept = list(itertools.islice(docs, max_documents))
    if not any(kept):
        raise corpus.empty_corpus_error()
    return kept
