"""Turn documents into a training-ready data directory: tokenizer, token shards, manifest.

Layout of a prepared directory::

    tokenizer.json
    train/shard_00000.bin, shard_00001.bin, ...   (see gptlab.data.shards for the format)
    val/shard_00000.bin, ...
    manifest.json

Each document is followed by the end-of-text token, so the shards of a split hold one
continuous token stream. ``manifest.json`` is written last and atomically: a directory
without it is incomplete (for example, an interrupted run) and is refused by the loaders.

Streaming. Documents flow through and are never all in memory::

    documents ─▶ batches ─▶ num_proc workers: clean, hash, encode ─▶ in order: drop duplicates,
    route to train or val ─▶ one shard builder per split ─▶ manifest (last)

At most 2 x num_proc batches of about `batch_chars` characters are in flight, so memory is
bounded by the workers and the batch size, not by the corpus (docs/data.md has the formula).
The output is the same byte for byte whatever `num_proc` and `batch_chars` are.

The split. A document goes to val when its hash says so (with probability `val_fraction`), so
its split never depends on where it sits in the corpus, and tasks (below) agree without talking
to each other. A corpus of fewer than `10 / val_fraction` documents, where a split by hash
would stray far from `val_fraction`, sends every `round(1 / val_fraction)`-th document to val;
with fewer documents than that (one file, say), it is split by position, as nanoGPT does: the
last `val_fraction` of its characters is val.

The tokenizer is trained on a bounded sample: the first `train_bytes` bytes of train text, in
corpus order (the manifest records its size and hash). Exact duplicates (after cleaning) are
dropped, and counted in the manifest.

Resuming. While it works, prepare keeps a journal, ``prepare_progress.json``: a fingerprint of
the job (every setting that changes the output, and the tokenizer sample), the tokenizer's
hash, how many documents were consumed, the shards written and the length of each split's
unfinished shard (``*.partial``). It is rewritten after every shard and every few seconds. Run
again after an interruption (Ctrl-C, a killed process, a dead worker) and the tokenizer and
everything written up to the last journal entry are kept: the documents before that point are
hashed again (not encoded) to check they are the same and to rebuild the duplicate filter,
and encoding continues; the result is identical to an uninterrupted run.

Tasks. With `num_tasks` > 1, task `task_index` prepares only its contiguous part of the corpus
(see `gptlab.data.sources.Source.documents`) into ``task_<i>-of-<n>/``, with a
``task_manifest.json`` instead of a manifest; `gptlab.data.manifest.merge_tasks` then writes one
``manifest.json`` over all of them. Every task trains the same tokenizer, from the sample of
the whole corpus.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from gptlab.data.clean import Cleaning, DigestSet, digest
from gptlab.data.manifest import (
    MANIFEST_NAME,
    SPLITS,
    TASK_MANIFEST_NAME,
    TOKENIZER_NAME,
    complete_manifest,
    task_dir,
)
from gptlab.data.manifest import load_manifest as load_manifest  # where older code finds it
from gptlab.data.shards import ShardBuilder, dtype_for_vocab, read_header
from gptlab.data.sources import Source, task_part
from gptlab.data.tokenizer import (
    eot_id,
    file_sha256,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from gptlab.errors import DataError, ShardError
from gptlab.fileio import atomic_write, atomic_write_text, ensure_writable_dir, remove_temp_files

log = logging.getLogger(__name__)

JOURNAL_NAME = "prepare_progress.json"

DEFAULT_TRAIN_BYTES = 100_000_000
DEFAULT_BATCH_CHARS = 1_000_000
# A corpus with fewer documents than this many times 1 / val_fraction is not split by hash: its
# val split could be far from val_fraction, or empty (with this many, the chance of an empty val
# split is e^-10).
HASH_SPLIT_MIN_DOCUMENTS_PER_VAL = 10
_JOURNAL_EVERY_S = 5.0


def prepare_dataset(
    documents: Sequence[str] | Source,
    out_dir: str | Path,
    vocab_size: int,
    tokenizer_path: str | None = None,
    val_fraction: float = 0.05,
    shard_tokens: int = 10_000_000,
    source_description: str = "",
    progress: bool = True,
    tokenizer_kind: str = "bpe",
    min_frequency: int = 2,
    resume: bool = True,
    cleaning: Cleaning | None = None,
    train_bytes: int = DEFAULT_TRAIN_BYTES,
    num_proc: int = 1,
    batch_chars: int = DEFAULT_BATCH_CHARS,
    max_documents: int | None = None,
    num_tasks: int = 1,
    task_index: int = 0,
) -> dict[str, Any]:
    """Tokenize `documents` into `out_dir` and return the manifest written there.

    `documents` is a `Source` (streamed, and cleaned with `cleaning`) or a list of documents
    (used as they are, unless `cleaning` is given). The tokenizer is trained on a sample of
    the train split (`train_bytes`), so validation text stays unseen; with `tokenizer_path`
    that tokenizer is used (and copied) instead, and `vocab_size`, `tokenizer_kind`,
    `min_frequency` and `train_bytes` do not apply. `max_documents` keeps the first that many
    documents left after cleaning. With `resume`, an interrupted run of the same job
    continues (see the module docstring); otherwise everything is redone. With `num_tasks` >
    1 this prepares task `task_index`'s part into its own folder (see `manifest.merge_tasks`) and
    returns its task manifest.
    """
    job = _Job(
        documents,
        cleaning,
        val_fraction,
        max_documents,
        num_tasks,
        task_index,
        source_description or (documents.describe() if isinstance(documents, Source) else ""),
    )
    for name, value in (("shard_tokens", shard_tokens), ("batch_chars", batch_chars)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if num_proc < 1:
        raise ValueError(f"corpus.num_proc must be >= 1, got {num_proc}")
    plan = job.plan_split()
    out = ensure_writable_dir(task_dir(out_dir, num_tasks, task_index))
    # Loaded (and so checked) before its hash joins the settings below.
    given_tokenizer = _load_given_tokenizer(tokenizer_path, vocab_size) if tokenizer_path else None
    sample = None if given_tokenizer else _Sample(job, plan, train_bytes)
    settings = {
        "source": job.description,
        "cleaning": None if cleaning is None else vars(cleaning),
        "max_documents": max_documents,
        "tasks": [task_index, num_tasks],
        "vocab_size": vocab_size,
        "tokenizer": file_sha256(tokenizer_path) if tokenizer_path else tokenizer_kind,
        "min_frequency": min_frequency,
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
        "split": plan.describe(),
        "sample": sample.summary() if sample else None,  # reads the sample to hash it
    }
    journal = _Journal(
        out, hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    )
    for written in (journal.path, out / TOKENIZER_NAME, _manifest_path(out, num_tasks)):
        remove_temp_files(written)  # left by an earlier run killed mid-write
    if resume and journal.resumable():
        log.info("resuming an interrupted prepare in %s", out)
        tokenizer = load_tokenizer(out / TOKENIZER_NAME)
        _manifest_path(out, num_tasks).unlink(missing_ok=True)
    else:
        if given_tokenizer is None:
            log.info("training a %s tokenizer on %s", tokenizer_kind, sample.describe())
            tokenizer = train_tokenizer(sample.texts(), vocab_size, tokenizer_kind, min_frequency)
        else:
            tokenizer = given_tokenizer
        # From here on the directory is rewritten: until the new manifest lands, it must not
        # look like a finished dataset.
        _manifest_path(out, num_tasks).unlink(missing_ok=True)
        _write_tokenizer(tokenizer, tokenizer_path, out / TOKENIZER_NAME)
        journal.start(file_sha256(out / TOKENIZER_NAME))

    encoder = _Encoder(job, plan, tokenizer, out, shard_tokens, journal)
    try:
        result = encoder.run(num_proc, batch_chars, progress)
    except _DocumentsChanged as e:
        log.warning("%s; starting over", e)
        journal.start(journal.state["tokenizer_sha256"])
        encoder = _Encoder(job, plan, tokenizer, out, shard_tokens, journal)
        result = encoder.run(num_proc, batch_chars, progress)
    if num_tasks == 1 and not result.splits["val"]["documents"]:
        raise DataError(
            f"no document of {job.description or 'the corpus'} was drawn for the val split "
            f"(val_fraction {val_fraction}); raise val_fraction"
        )
    manifest = {
        "source": job.description,
        "tokenizer": {
            "file": TOKENIZER_NAME,
            "sha256": file_sha256(out / TOKENIZER_NAME),
            "kind": None if tokenizer_path else tokenizer_kind,
            "sample": sample.summary() if sample else None,
        },
        "val_fraction": val_fraction,
        "split": plan.describe(),
        "dropped": result.dropped,
        "splits": result.splits,
    }
    if num_tasks > 1:
        manifest["task"] = {"index": task_index, "count": num_tasks}
    manifest = complete_manifest(out, manifest, tokenizer)
    atomic_write_text(_manifest_path(out, num_tasks), json.dumps(manifest, indent=2) + "\n")
    journal.finish()
    _remove_stale_shards(out, manifest)
    return manifest


def prepared_manifest(out_dir: str | Path, num_tasks: int = 1, task_index: int = 0) -> Path:
    """The file whose presence says task `task_index` of `num_tasks` is already prepared."""
    return _manifest_path(task_dir(out_dir, num_tasks, task_index), num_tasks)


def _manifest_path(out: Path, num_tasks: int) -> Path:
    return out / (MANIFEST_NAME if num_tasks == 1 else TASK_MANIFEST_NAME)


# ── the documents and the split ──────────────────────────────────────────────────────────


@dataclass(frozen=True)
class _Job:
    """The documents to prepare and what decides which are kept and where they go."""

    documents: Sequence[str] | Source
    cleaning: Cleaning | None
    val_fraction: float
    max_documents: int | None
    num_tasks: int
    task_index: int
    description: str

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction <= 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5], got {self.val_fraction}")
        if self.max_documents is not None and self.max_documents < 1:
            raise ValueError(f"max_documents must be None or >= 1, got {self.max_documents}")
        if self.max_documents is not None and self.num_tasks > 1:
            raise ValueError(
                "corpus.max_documents keeps the first documents of the whole corpus, which "
                "does not split into tasks; set corpus.max_documents=null with corpus.num_tasks > 1"
            )

    def raw(self, task_index: int = 0, num_tasks: int = 1) -> Iterator[str]:
        """The raw documents of task `task_index` of `num_tasks` (all of them by default)."""
        if isinstance(self.documents, Source):
            return self.documents.documents(task_index, num_tasks)
        part = task_part([len(doc) for doc in self.documents], task_index, num_tasks)
        return (self.documents[i] for i in part)

    def kept(self, dropped: dict[str, int] | None = None) -> Iterator[tuple[str, int]]:
        """(document, digest) of every document of the whole corpus that is kept: cleaned,
        not empty, not a duplicate, within `max_documents` (the others are counted in
        `dropped`). Runs in this process: for the split plan and the tokenizer sample, which
        read a bounded part, and to encode a small corpus."""
        seen: set[int] = set()
        dropped = {"empty": 0, "duplicate": 0} if dropped is None else dropped
        for text in self.raw():
            doc = self.cleaning(text) if self.cleaning else text
            if doc is None:
                dropped["empty"] += 1
                continue
            key = digest(doc.encode("utf-8"))
            if key in seen:
                dropped["duplicate"] += 1
                continue
            seen.add(key)
            yield doc, key
            if len(seen) == self.max_documents:
                return

    def plan_split(self) -> _SplitPlan:
        """Read the corpus until it is clear it has enough documents to split by hash, or to
        its end (then it is small, and split by document count or by position)."""
        enough = math.ceil(HASH_SPLIT_MIN_DOCUMENTS_PER_VAL / self.val_fraction)
        count = chars = 0
        for doc, _ in self.kept():
            count += 1
            chars += len(doc)
            if count == enough:
                return _SplitPlan(self.val_fraction)
        if count == 0:
            if isinstance(self.documents, Source):
                raise self.documents.empty_corpus_error()
            raise DataError("corpus is empty: no non-empty documents were given")
        if chars < 2:
            raise DataError(f"corpus {self.description!r} has {chars} character, need 2")
        if self.num_tasks > 1:
            raise DataError(
                f"corpus {self.description!r} has only {count} documents, too few to prepare "
                "in several tasks; prepare it with corpus.num_tasks=1"
            )
        every = round(1 / self.val_fraction)
        if count >= every:
            return _SplitPlan(self.val_fraction, every=every)
        val_chars = min(chars - 1, max(1, round(self.val_fraction * chars)))
        return _SplitPlan(self.val_fraction, val_from_char=chars - val_chars)

    def items(
        self, plan: _SplitPlan, dropped: dict[str, int] | None = None
    ) -> Iterator[tuple[str, str | None]]:
        """What the encoder reads: (text, split) pairs. Split by hash, the raw documents of this
        task, with no split yet (the workers clean and hash them); else the kept documents
        with their split (by position, the one that holds the boundary is cut in two), and
        the documents dropped on the way counted in `dropped`."""
        if plan.by_hash:
            return ((text, None) for text in self.raw(self.task_index, self.num_tasks))
        if plan.every is not None:
            every = plan.every
            kept = enumerate(self.kept(dropped))
            return ((doc, "val" if i % every == every - 1 else "train") for i, (doc, _) in kept)
        return self._position_items(plan.val_from_char, dropped)

    def _position_items(
        self, val_from: int, dropped: dict[str, int] | None
    ) -> Iterator[tuple[str, str]]:
        at = 0
        for doc, _ in self.kept(dropped):
            if at + len(doc) <= val_from:
                yield doc, "train"
            elif at >= val_from:
                yield doc, "val"
            else:
                yield doc[: val_from - at], "train"
                yield doc[val_from - at :], "val"
            at += len(doc)


@dataclass(frozen=True)
class _SplitPlan:
    """How documents are split: by hash; in a small corpus, every `every`-th document (when
    set), or by position (`val_from_char` set)."""

    val_fraction: float
    every: int | None = None
    val_from_char: int | None = None

    @property
    def by_hash(self) -> bool:
        return self.every is None and self.val_from_char is None

    def is_val(self, digests: np.ndarray | int) -> np.ndarray | bool:
        """Which documents (by digest) the hash split sends to val."""
        return digests < np.uint64(int(self.val_fraction * 2**64))

    def describe(self) -> dict[str, Any]:
        if self.by_hash:
            return {"method": "hash", "val_fraction": self.val_fraction}
        if self.every is not None:
            return {"method": "every_kth_document", "every": self.every}
        return {"method": "position", "val_from_char": self.val_from_char}


class _Sample:
    """The tokenizer's training text: the first `train_bytes` bytes of train text, in corpus
    order (the last document cut to fit)."""

    def __init__(self, job: _Job, plan: _SplitPlan, train_bytes: int) -> None:
        if train_bytes < 1:
            raise ValueError(f"tokenizer.train_bytes must be >= 1, got {train_bytes}")
        self.job, self.plan, self.train_bytes = job, plan, train_bytes
        self._summary: dict[str, Any] | None = None

    def texts(self) -> Iterator[str]:
        budget = self.train_bytes
        for text in self._train_texts():
            data = text.encode("utf-8")
            if len(data) >= budget:
                yield data[:budget].decode("utf-8", errors="ignore")
                return
            budget -= len(data)
            yield text

    def _train_texts(self) -> Iterator[str]:
        if self.plan.by_hash:
            yield from (doc for doc, key in self.job.kept() if not self.plan.is_val(key))
            return
        for text, split in self.job.items(self.plan):
            if split == "train":
                yield text
            elif self.plan.val_from_char is not None:
                return  # by position, the rest is val

    def summary(self) -> dict[str, Any]:
        """What was sampled: documents, UTF-8 bytes, SHA-256 (of the texts, each prefixed by
        its length)."""
        if self._summary is None:
            sha, documents, size = hashlib.sha256(), 0, 0
            for text in self.texts():
                data = text.encode("utf-8")
                sha.update(len(data).to_bytes(8, "little") + data)
                documents, size = documents + 1, size + len(data)
            self._summary = {
                "method": f"first {self.train_bytes:,} bytes of the train split",
                "documents": documents,
                "bytes": size,
                "sha256": sha.hexdigest(),
            }
        return self._summary

    def describe(self) -> str:
        summary = self.summary()
        return f"{summary['bytes'] / 1e6:.1f} MB of {summary['documents']:,} train documents"


# ── encoding ────────────────────────────────────────────────────────────────────────────


@dataclass
class _Processed:
    """What a worker returns for a batch: for each document that was not empty after cleaning
    (`positions` in the batch), its digest, UTF-8 size and, when encoded, its tokens
    (end-of-text included) as `lengths` and one concatenated `tokens` array."""

    positions: np.ndarray
    digests: np.ndarray
    nbytes: np.ndarray
    lengths: np.ndarray | None = None
    tokens: np.ndarray | None = None


class _Worker:
    """Cleans, hashes and encodes batches of documents; one per worker process."""

    def __init__(self, tokenizer_json: str, cleaning: Cleaning | None) -> None:
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        # A document that happens to contain "<|endoftext|>" must not fake a boundary.
        self.tokenizer.encode_special_tokens = True
        self.cleaning = cleaning
        self.eot = eot_id(self.tokenizer)
        self.dtype = dtype_for_vocab(self.tokenizer.get_vocab_size())

    def process(self, texts: list[str], clean: bool, encode: bool) -> _Processed:
        positions, docs = [], []
        for position, text in enumerate(texts):
            doc = self.cleaning(text) if clean and self.cleaning else text
            if doc is not None:
                positions.append(position)
                docs.append(doc)
        encoded = [doc.encode("utf-8") for doc in docs]
        result = _Processed(
            np.array(positions, dtype=np.int64),
            np.array([digest(data) for data in encoded], dtype=np.uint64),
            np.array([len(data) for data in encoded], dtype=np.int64),
        )
        if encode:
            # The fast path of `tokenizers`: ids only, no offsets.
            ids = [e.ids for e in self.tokenizer.encode_batch_fast(docs, add_special_tokens=False)]
            result.lengths = np.array([len(i) + 1 for i in ids], dtype=np.int64)
            stream = itertools.chain.from_iterable(i + [self.eot] for i in ids)
            result.tokens = np.fromiter(stream, self.dtype, int(result.lengths.sum()))
        return result


_worker: _Worker | None = None


def _start_worker(tokenizer_json: str, cleaning: Cleaning | None) -> None:
    global _worker
    # One thread per worker: the parallelism is the worker processes.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker = _Worker(tokenizer_json, cleaning)


def _process_in_worker(texts: list[str], clean: bool, encode: bool) -> _Processed:
    return _worker.process(texts, clean, encode)


class _DocumentsChanged(Exception):
    """The documents before the resume point differ from those of the interrupted run."""


@dataclass
class _Result:
    splits: dict[str, dict[str, Any]]
    dropped: dict[str, int]


@dataclass
class _Batch:
    texts: list[str]
    splits: list[str | None]  # fixed by a position split, else None (decided by hash)
    encode: bool  # False while replaying the documents an interrupted run already wrote


@dataclass
class _Position:
    """How far through the task's documents the writers are, and a hash chain of the digests
    of the documents kept up to there (which proves a replay saw the same documents)."""

    items: int = 0
    kept: int = 0
    chain: str = hashlib.sha256().hexdigest()
    dropped: dict[str, int] = field(default_factory=lambda: {"empty": 0, "duplicate": 0})


class _Encoder:
    """Runs the stream of one task through the workers into the split writers, in order."""

    def __init__(
        self,
        job: _Job,
        plan: _SplitPlan,
        tokenizer: Tokenizer,
        out: Path,
        shard_tokens: int,
        journal: _Journal,
    ) -> None:
        self.job, self.plan, self.journal = job, plan, journal
        self.tokenizer_json = tokenizer.to_str()
        vocab = tokenizer.get_vocab_size()
        saved = journal.state.get("position")
        self.resume_at = _Position(**saved) if saved else _Position()
        self.position = _Position()
        self.seen = DigestSet()
        self.writers = {
            name: _SplitWriter(out, name, shard_tokens, vocab, journal.state["splits"].get(name))
            for name in SPLITS
        }
        self.consistent = True  # writers and position agree: the journal may be saved
        self.saved_at = time.monotonic()

    def run(self, num_proc: int, batch_chars: int, progress: bool) -> _Result:
        if self.resume_at.items:
            log.info("resuming after %d documents", self.resume_at.kept)
        batches = self._batches(batch_chars)
        first = list(itertools.islice(batches, 2))
        if len(first) < 2:
            num_proc = 1  # one batch in all: workers would only add their start-up time
        batches = itertools.chain(first, batches)
        bar = tqdm(desc="preparing", unit="doc", disable=not progress)
        try:
            with bar, _pool(num_proc, self.tokenizer_json, self.job.cleaning) as submit:
                in_flight: deque[tuple[_Batch, Future]] = deque()
                more = True
                for batch in batches:
                    in_flight.append((batch, submit(batch)))
                    if len(in_flight) >= 2 * num_proc:
                        more = self._take(*in_flight.popleft(), bar)
                    if not more:
                        break
                while more and in_flight:
                    more = self._take(*in_flight.popleft(), bar)
        except BrokenProcessPool:
            self._save_journal()
            raise RuntimeError(
                f"an encoding worker died (out of memory, or killed); what was written is kept "
                f"in {self.journal.path}: run the same command again to continue"
            ) from None
        except BaseException:
            self._save_journal()
            raise
        if self.position.items < self.resume_at.items:
            raise _DocumentsChanged("the corpus has fewer documents than the interrupted run")
        for writer in self.writers.values():
            writer.close()
        self._save_journal()
        return _Result(
            {name: w.summary() for name, w in self.writers.items()}, self.position.dropped
        )

    def _batches(self, batch_chars: int) -> Iterator[_Batch]:
        """Batches of about `batch_chars` characters; the documents an interrupted run already
        wrote come first, in batches of their own, marked not to be encoded."""
        items = self.job.items(self.plan, self.position.dropped)
        replay = itertools.islice(items, self.resume_at.items)
        for encode, part in ((False, replay), (True, items)):
            texts: list[str] = []
            splits: list[str | None] = []
            size = 0
            for text, split in part:
                texts.append(text)
                splits.append(split)
                size += len(text)
                if size >= batch_chars:
                    yield _Batch(texts, splits, encode)
                    texts, splits, size = [], [], 0
            if texts:
                yield _Batch(texts, splits, encode)

    def _take(self, batch: _Batch, future: Future, bar: tqdm) -> bool:
        """Write a processed batch; False once `max_documents` documents were kept."""
        done = future.result()
        self.consistent = False
        position = self.position
        new = self.seen.add(done.digests)
        position.dropped["empty"] += len(batch.texts) - len(done.positions)
        position.dropped["duplicate"] += int((~new).sum())
        kept = np.flatnonzero(new)
        # Other splits than by hash have applied max_documents already (before cutting one in
        # two, by position).
        limit = self.job.max_documents if self.plan.by_hash else None
        if limit is not None:
            kept = kept[: limit - position.kept]
        chain = hashlib.sha256(bytes.fromhex(position.chain))
        chain.update(done.digests[kept].tobytes())
        position.chain = chain.hexdigest()
        position.kept += len(kept)
        position.items += len(batch.texts)
        if not batch.encode and position.items == self.resume_at.items:
            self._check_replay()
        finished_a_shard = batch.encode and self._write(batch, done, kept)
        self.consistent = True
        bar.update(len(kept))
        if finished_a_shard or time.monotonic() - self.saved_at > _JOURNAL_EVERY_S:
            self._save_journal()
        return limit is None or position.kept < limit

    def _check_replay(self) -> None:
        """At the resume point: the same documents must have been kept as in the interrupted
        run (its count and hash chain), else what it wrote does not belong to these."""
        if (self.position.kept, self.position.chain) != (self.resume_at.kept, self.resume_at.chain):
            raise _DocumentsChanged("the documents differ from those of the interrupted run")

    def _write(self, batch: _Batch, done: _Processed, kept: np.ndarray) -> bool:
        """Send the kept documents' tokens to their splits; True if a shard was finished."""
        fixed = [batch.splits[p] for p in done.positions[kept]]
        if fixed and fixed[0] is not None:
            to_val = np.array([split == "val" for split in fixed], dtype=bool)
        else:
            to_val = self.plan.is_val(done.digests[kept])
        ends = np.cumsum(done.lengths)
        starts = ends - done.lengths
        finished = False
        for name, mask in (("train", ~to_val), ("val", to_val)):
            chosen = kept[mask]
            if len(chosen):
                tokens = np.concatenate([done.tokens[starts[i] : ends[i]] for i in chosen])
                nbytes = int(done.nbytes[chosen].sum())
                finished |= self.writers[name].add(tokens, len(chosen), nbytes)
        return finished

    def _save_journal(self) -> None:
        if not self.consistent or self.position.items < self.resume_at.items:
            return  # still replaying: the journal on disk is further along than we are
        for writer in self.writers.values():
            writer.flush()
        state = {name: writer.state() for name, writer in self.writers.items()}
        self.journal.record(vars(self.position), state)
        self.saved_at = time.monotonic()


@contextlib.contextmanager
def _pool(num_proc: int, tokenizer_json: str, cleaning: Cleaning | None) -> Iterator[Any]:
    """A function that submits a batch for processing: to `num_proc` worker processes, or with
    one, to a worker in this process."""
    if num_proc == 1:
        worker = _Worker(tokenizer_json, cleaning)

        def run_here(batch: _Batch) -> Future:
            future: Future = Future()
            future.set_result(worker.process(batch.texts, batch.splits[0] is None, batch.encode))
            return future

        yield run_here
        return
    # "spawn": workers start clean, whatever threads this process (or tokenizers) runs.
    with ProcessPoolExecutor(
        num_proc,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker,
        initargs=(tokenizer_json, cleaning),
    ) as executor:
        try:
            yield lambda batch: executor.submit(
                _process_in_worker, batch.texts, batch.splits[0] is None, batch.encode
            )
        finally:
            executor.shutdown(wait=True, cancel_futures=True)


class _SplitWriter:
    """Cuts a split's token stream into shards of `shard_tokens` tokens each (the last may be
    shorter); the shard being filled lives in a ``.partial`` file until it is full."""

    def __init__(
        self, out: Path, split: str, shard_tokens: int, vocab_size: int, saved: dict | None
    ) -> None:
        self.out, self.split = out, split
        self.shard_tokens, self.vocab_size = shard_tokens, vocab_size
        (out / split).mkdir(exist_ok=True)
        saved = saved or {"shards": [], "partial_tokens": 0, "documents": 0, "bytes": 0}
        self.shards: list[dict[str, Any]] = saved["shards"]
        self.documents, self.bytes = saved["documents"], saved["bytes"]
        self.builder: ShardBuilder | None = None
        if saved["partial_tokens"]:
            self.builder = ShardBuilder.resume(
                self._next_path(), vocab_size, saved["partial_tokens"]
            )

    def _next_path(self) -> Path:
        return self.out / self.split / f"shard_{len(self.shards):05d}.bin"

    def add(self, tokens: np.ndarray, documents: int, nbytes: int) -> bool:
        """Append `tokens` (of `documents` documents, `nbytes` of text); True if a shard was
        finished."""
        self.documents += documents
        self.bytes += nbytes
        finished = False
        while len(tokens):
            if self.builder is None:
                self.builder = ShardBuilder(self._next_path(), self.vocab_size)
            take = min(self.shard_tokens - self.builder.tokens, len(tokens))
            self.builder.append(tokens[:take])
            tokens = tokens[take:]
            if self.builder.tokens == self.shard_tokens:
                self._finish_shard()
                finished = True
        return finished

    def _finish_shard(self) -> None:
        self.builder.finish()
        name = str(self.builder.path.relative_to(self.out))
        self.shards.append({"file": name, "tokens": self.builder.tokens})
        self.builder = None

    def flush(self) -> None:
        if self.builder is not None:
            self.builder.flush()

    def close(self) -> None:
        if self.builder is not None:
            self._finish_shard()

    def state(self) -> dict[str, Any]:
        return {
            "shards": list(self.shards),
            "partial_tokens": self.builder.tokens if self.builder else 0,
            "documents": self.documents,
            "bytes": self.bytes,
        }

    def summary(self) -> dict[str, Any]:
        return {
            "documents": self.documents,
            "tokens": sum(shard["tokens"] for shard in self.shards),
            "bytes": self.bytes,
            "shards": self.shards,
        }


# ── the journal and the files ───────────────────────────────────────────────────────────


class _Journal:
    """``prepare_progress.json``: what an interrupted prepare of the same job may keep.

    Rewritten atomically, and only when the shard files agree with it, so it never lists a
    shard that is not complete, nor more partial tokens than were written.
    """

    def __init__(self, out: Path, job: str) -> None:
        self.path = out / JOURNAL_NAME
        self.out = out
        self.job = job
        self.state: dict[str, Any] = {"job": self.job, "tokenizer_sha256": None, "splits": {}}

    def resumable(self) -> bool:
        """Load the journal if it belongs to this job and its files are intact."""
        try:
            state = json.loads(self.path.read_text(encoding="utf-8"))
        except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
            return False
        tokenizer = self.out / TOKENIZER_NAME
        if state.get("job") != self.job or not tokenizer.is_file():
            return False
        if file_sha256(tokenizer) != state.get("tokenizer_sha256"):
            return False
        vocab = load_tokenizer(tokenizer).get_vocab_size()
        for name, split in state["splits"].items():
            if not _intact(self.out, name, split, vocab):
                log.info("%s: a shard is missing or damaged; starting over", self.out / name)
                return False
        self.state = state
        return True

    def start(self, tokenizer_sha256: str) -> None:
        self.state = {"job": self.job, "tokenizer_sha256": tokenizer_sha256, "splits": {}}
        self._save()

    def record(self, position: dict[str, Any], splits: dict[str, Any]) -> None:
        self.state["position"] = position
        self.state["splits"] = splits
        self._save()

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)

    def _save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.state) + "\n")


def _intact(out: Path, split: str, saved: dict[str, Any], vocab_size: int) -> bool:
    """Whether the shards and partial shard the journal lists for `split` are on disk."""
    for shard in saved["shards"]:
        try:
            header = read_header(out / shard["file"])
        except (FileNotFoundError, ShardError):
            return False
        if (header.num_tokens, header.vocab_size) != (shard["tokens"], vocab_size):
            return False
    partial = out / split / f"shard_{len(saved['shards']):05d}.bin.partial"
    needed = saved["partial_tokens"] * dtype_for_vocab(vocab_size).itemsize
    return not needed or (partial.is_file() and partial.stat().st_size >= 64 + needed)


def _load_given_tokenizer(tokenizer_path: str, vocab_size: int) -> Tokenizer:
    tokenizer = load_tokenizer(tokenizer_path)
    eot_id(tokenizer)  # fail now, not after the old dataset was taken apart
    if tokenizer.get_vocab_size() != vocab_size:
        log.warning(
            "using %s with vocab size %d; the requested vocab_size %d does not apply",
            tokenizer_path,
            tokenizer.get_vocab_size(),
            vocab_size,
        )
    return tokenizer


def _write_tokenizer(tokenizer: Tokenizer, given_path: str | None, target: Path) -> None:
    if given_path is None:
        save_tokenizer(tokenizer, target)
    elif not (target.exists() and os.path.samefile(given_path, target)):
        # Copy the bytes rather than re-serialising, so the sha256 matches the given file.
        with atomic_write(target) as f:
            f.write(Path(given_path).read_bytes())


def _remove_stale_shards(out: Path, manifest: dict[str, Any]) -> None:
    """Delete shards (and partial shards) left by an earlier, larger run into the folder."""
    listed = {shard["file"] for split in manifest["splits"].values() for shard in split["shards"]}
    for split in SPLITS:
        for path in sorted((out / split).glob("shard_*.bin*")):
            if f"{split}/{path.name}" not in listed:
                log.info("removing stale shard %s", path)
                path.unlink()
