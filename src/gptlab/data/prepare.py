"""Turn documents into a training-ready data directory: tokenizer, token shards, manifest.

Layout of a prepared directory::

    tokenizer.json
    train/shard_00000.bin, shard_00001.bin, ...   (see gptlab.data.shards for the format)
    val/shard_00000.bin, ...
    manifest.json

Each document is followed by the end-of-text token, so the shards of a split hold one
continuous token stream. ``manifest.json`` is written last and atomically: a directory
without it is incomplete (for example, an interrupted run) and is refused by the loaders.

Resuming. While it works, prepare keeps a journal, ``prepare_progress.json``: a fingerprint
of the job (the documents and every setting that changes the output), the tokenizer's hash,
and after each shard is written, that shard and where in the documents the next one starts
(document index, token offset). Run again with the same documents and settings after an
interruption, and the trained tokenizer and every shard already written are kept; encoding
continues at the recorded position, and the result is identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from gptlab import __version__
from gptlab.data.errors import DataError
from gptlab.data.fileio import atomic_write, atomic_write_text, ensure_writable_dir
from gptlab.data.shards import ShardError, dtype_for_vocab, read_header, read_shard, write_shard
from gptlab.data.tokenizer import (
    eot_id,
    file_sha256,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
    unk_id,
)

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
JOURNAL_NAME = "prepare_progress.json"
MANIFEST_VERSION = 1
SPLITS = ("train", "val")


def prepare_dataset(
    documents: list[str],
    out_dir: str | Path,
    vocab_size: int,
    tokenizer_path: str | None = None,
    val_fraction: float = 0.05,
    shard_tokens: int = 10_000_000,
    source_description: str = "",
    batch_size: int = 1000,
    progress: bool = True,
    tokenizer_kind: str = "bpe",
    min_frequency: int = 2,
    resume: bool = True,
) -> dict[str, Any]:
    """Tokenize `documents` into `out_dir` and return the manifest written there.

    The tokenizer is trained on the train split only, so validation text stays unseen;
    with `tokenizer_path` that tokenizer is used (and copied) instead, and `vocab_size`,
    `tokenizer_kind` and `min_frequency` do not apply. See `split_documents` for the split.
    With `resume`, an interrupted run of the same job continues (see the module docstring);
    otherwise everything is redone.
    """
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = ensure_writable_dir(out_dir)
    train_docs, val_docs = split_documents(documents, val_fraction)
    # Loaded (and so checked) before its hash joins the settings below.
    given_tokenizer = _load_given_tokenizer(tokenizer_path, vocab_size) if tokenizer_path else None
    settings = {
        "vocab_size": vocab_size,
        "tokenizer": file_sha256(tokenizer_path) if tokenizer_path else tokenizer_kind,
        "min_frequency": min_frequency,
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
    }
    journal = _Journal(out, _fingerprint(documents, settings))
    if resume and journal.resumable():
        log.info("resuming an interrupted prepare in %s", out)
        tokenizer = load_tokenizer(out / TOKENIZER_NAME)
        (out / MANIFEST_NAME).unlink(missing_ok=True)
    else:
        if given_tokenizer is None:
            log.info("training a %s tokenizer on %d documents", tokenizer_kind, len(train_docs))
            tokenizer = train_tokenizer(train_docs, vocab_size, tokenizer_kind, min_frequency)
        else:
            tokenizer = given_tokenizer
        # From here on the directory is rewritten: until the new manifest lands, it must not
        # look like a finished dataset.
        (out / MANIFEST_NAME).unlink(missing_ok=True)
        _write_tokenizer(tokenizer, tokenizer_path, out / TOKENIZER_NAME)
        journal.start(file_sha256(out / TOKENIZER_NAME))
    # A document that happens to contain "<|endoftext|>" must not fake a document boundary.
    tokenizer.encode_special_tokens = True
    encode = _Encoder(tokenizer, out, shard_tokens, batch_size, progress, journal)
    splits = {"train": encode("train", train_docs), "val": encode("val", val_docs)}

    vocab = tokenizer.get_vocab_size()
    counts = {name: _token_counts(out, split["shards"], vocab) for name, split in splits.items()}
    manifest = {
        "format_version": MANIFEST_VERSION,
        "created_with": f"gptlab {__version__}",
        "source": source_description,
        "tokenizer": {
            "file": TOKENIZER_NAME,
            "sha256": file_sha256(out / TOKENIZER_NAME),
            "kind": None if tokenizer_path else tokenizer_kind,
        },
        "vocab_size": vocab,
        "eot_id": eot_id(tokenizer),
        "dtype": dtype_for_vocab(vocab).name,
        "val_fraction": val_fraction,
        "unigram_entropy": unigram_entropy(counts["train"]),  # nats per token, train split
        "tokenizer_stats": tokenizer_stats(splits, counts, unk_id(tokenizer)),
        "splits": splits,
    }
    atomic_write_text(out / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    journal.finish()
    _remove_stale_shards(out, manifest)
    return manifest


def split_documents(documents: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic split: every k-th document (k = round(1 / val_fraction)) goes to val.

    Documents k-1, 2k-1, ... are val; with fewer than k documents the last one is.
    """
    if not 0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5], got {val_fraction}")
    if len(documents) < 2:
        raise DataError(
            f"need at least 2 documents (one for train, one for val), got {len(documents)}"
        )
    every = round(1 / val_fraction)
    val_index = set(range(every - 1, len(documents), every)) or {len(documents) - 1}
    train = [doc for i, doc in enumerate(documents) if i not in val_index]
    val = [doc for i, doc in enumerate(documents) if i in val_index]
    return train, val


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy in nats of the token frequency distribution `counts`: -sum p log p.

    The loss of a model that ignores context entirely; a trained LM should beat it clearly.
    """
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def tokenizer_stats(
    splits: dict[str, dict[str, Any]], counts: dict[str, np.ndarray], unknown_id: int | None
) -> dict[str, Any]:
    """How well the tokenizer fits the data.

    bytes_per_token: UTF-8 bytes of text per token (end-of-text tokens included), per split;
    coverage: the share of tokens that are not the unknown token, per split (1.0 for
    byte-level BPE, which has none); vocab_used: the share of the vocabulary that occurs in
    the train split (low values mean a vocabulary too large for the corpus).
    """
    train_counts = counts["train"]
    return {
        "bytes_per_token": {
            name: split["bytes"] / split["tokens"] for name, split in splits.items()
        },
        "coverage": {
            name: 1.0 if unknown_id is None else 1.0 - counts[name][unknown_id] / split["tokens"]
            for name, split in splits.items()
        },
        "vocab_used": float((train_counts > 0).sum() / len(train_counts)),
    }


def load_manifest(data_dir: str | Path) -> dict[str, Any]:
    """Read and sanity-check ``manifest.json`` of a prepared data directory."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"data directory {data_dir} does not exist; run gptlab-prepare first"
        )
    path = data_dir / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} in {data_dir}; run gptlab-prepare first "
            "(an interrupted prepare leaves none)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); re-run gptlab-prepare") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: expected a JSON object; re-run gptlab-prepare")
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise DataError(
            f"{path}: format_version {manifest.get('format_version')!r}, but this gptlab reads "
            f"version {MANIFEST_VERSION}; re-run gptlab-prepare"
        )
    for key in ("tokenizer", "vocab_size", "eot_id", "dtype", "splits"):
        if key not in manifest:
            raise DataError(f"{path}: missing key {key!r}; re-run gptlab-prepare")
    for split in SPLITS:
        if not manifest["splits"].get(split, {}).get("shards"):
            raise DataError(f"{path}: split {split!r} lists no shards; re-run gptlab-prepare")
    return manifest


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


def _fingerprint(documents: Sequence[str], settings: dict[str, Any]) -> str:
    """A hash of everything that decides prepare's output: the documents and `settings`."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for doc in documents:
        data = doc.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))  # so ["ab", "c"] != ["a", "bc"]
        digest.update(data)
    return digest.hexdigest()


class _Journal:
    """``prepare_progress.json``: what an interrupted prepare of the same job may keep.

    Rewritten atomically after every shard, so it never lists a shard that is not complete.
    """

    def __init__(self, out: Path, job: str) -> None:
        self.path = out / JOURNAL_NAME
        self.out = out
        self.job = job
        self.state: dict[str, Any] = {"job": job, "tokenizer_sha256": None, "splits": {}}

    def resumable(self) -> bool:
        """Load the journal if it belongs to this job and its tokenizer file is intact."""
        try:
            state = json.loads(self.path.read_text(encoding="utf-8"))
        except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
            return False
        tokenizer = self.out / TOKENIZER_NAME
        if state.get("job") != self.job or not tokenizer.is_file():
            return False
        if file_sha256(tokenizer) != state.get("tokenizer_sha256"):
            return False
        self.state = state
        return True

    def start(self, tokenizer_sha256: str) -> None:
        self.state = {"job": self.job, "tokenizer_sha256": tokenizer_sha256, "splits": {}}
        self._save()

    def split(self, name: str) -> dict[str, Any]:
        """The recorded progress of split `name`: its shards and whether it is complete."""
        return self.state["splits"].setdefault(name, {"shards": [], "complete": False})

    def record(self, name: str, shards: list[dict[str, Any]], complete: bool = False) -> None:
        self.state["splits"][name] = {"shards": shards, "complete": complete}
        self._save()

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)

    def _save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.state) + "\n")


class _Encoder:
    """Encodes a split's documents in parallel batches and writes them as shards, continuing
    where the journal says an interrupted run stopped."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        out: Path,
        shard_tokens: int,
        batch_size: int,
        progress: bool,
        journal: _Journal,
    ) -> None:
        self.tokenizer = tokenizer
        self.out = out
        self.shard_tokens = shard_tokens
        self.batch_size = batch_size
        self.progress = progress
        self.journal = journal
        self.vocab_size = tokenizer.get_vocab_size()
        self.dtype = dtype_for_vocab(self.vocab_size)
        self.eot = eot_id(tokenizer)

    def __call__(self, split: str, docs: list[str]) -> dict[str, Any]:
        """Encode `docs` into ``out/split/``; return the split's manifest entry."""
        (self.out / split).mkdir(exist_ok=True)
        done = self.journal.split(split)
        kept = _intact_prefix(self.out, done["shards"], self.vocab_size)
        if not (done["complete"] and len(kept) == len(done["shards"])):
            self._encode(split, docs, kept)
        recorded = self.journal.split(split)["shards"]
        shards = [{"file": shard["file"], "tokens": shard["tokens"]} for shard in recorded]
        return {
            "documents": len(docs),
            "tokens": sum(shard["tokens"] for shard in shards),
            "bytes": sum(len(doc.encode("utf-8")) for doc in docs),
            "shards": shards,
        }

    def _encode(self, split: str, docs: list[str], kept: list[dict[str, Any]]) -> None:
        writer = _ShardWriter(
            self.out, split, self.shard_tokens, self.vocab_size, self.journal, kept
        )
        first_doc, offset = (kept[-1]["next_doc"], kept[-1]["next_offset"]) if kept else (0, 0)
        if kept:
            log.info("%s: kept %d shards, continuing at document %d", split, len(kept), first_doc)
        with tqdm(
            total=len(docs),
            initial=first_doc,
            desc=f"encoding {split}",
            unit="doc",
            disable=not self.progress,
        ) as bar:
            for start in range(first_doc, len(docs), self.batch_size):
                batch = docs[start : start + self.batch_size]
                encodings = self.tokenizer.encode_batch(batch)  # parallel in Rust
                for index, enc in enumerate(encodings, start=start):
                    tokens = np.array([*enc.ids, self.eot], dtype=self.dtype)
                    writer.add(index, tokens, offset if index == first_doc else 0)
                bar.update(len(batch))
        writer.close(len(docs))


def _intact_prefix(
    out: Path, shards: list[dict[str, Any]], vocab_size: int
) -> list[dict[str, Any]]:
    """The recorded shards up to the first that is missing or not what the journal says."""
    for i, shard in enumerate(shards):
        try:
            header = read_header(out / shard["file"])
        except (FileNotFoundError, ShardError):
            return shards[:i]
        if (header.num_tokens, header.vocab_size) != (shard["tokens"], vocab_size):
            return shards[:i]
    return shards


class _ShardWriter:
    """Cuts a split's token stream into shards of `shard_tokens` tokens each (the last may be
    shorter). After each shard it records in the journal where the next one starts."""

    def __init__(
        self,
        out: Path,
        split: str,
        shard_tokens: int,
        vocab_size: int,
        journal: _Journal,
        written: list[dict[str, Any]],
    ) -> None:
        self.out = out
        self.split = split
        self.shard_tokens = shard_tokens
        self.vocab_size = vocab_size
        self.journal = journal
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards = list(written)  # journal entries of the shards already on disk

    def add(self, doc_index: int, tokens: np.ndarray, start: int = 0) -> None:
        """Append document `doc_index`'s tokens from position `start` on."""
        while start < len(tokens):
            take = min(self.shard_tokens - self.pending_tokens, len(tokens) - start)
            self.pending.append(tokens[start : start + take])
            self.pending_tokens += take
            start += take
            if self.pending_tokens == self.shard_tokens:
                # The next shard begins at token `start` of this document, or with the next one.
                at = (doc_index, start) if start < len(tokens) else (doc_index + 1, 0)
                self._write(*at)

    def close(self, num_docs: int) -> None:
        if self.pending_tokens:
            self._write(num_docs, 0)
        self.journal.record(self.split, self.shards, complete=True)

    def _write(self, next_doc: int, next_offset: int) -> None:
        tokens = np.concatenate(self.pending)
        name = f"{self.split}/shard_{len(self.shards):05d}.bin"
        write_shard(self.out / name, tokens, self.vocab_size)
        self.pending, self.pending_tokens = [], 0
        self.shards.append(
            {"file": name, "tokens": len(tokens), "next_doc": next_doc, "next_offset": next_offset}
        )
        self.journal.record(self.split, self.shards)


def _token_counts(out: Path, shards: list[dict[str, Any]], vocab_size: int) -> np.ndarray:
    """How often each token id occurs in `shards`, read back from the files."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for shard in shards:
        counts += np.bincount(read_shard(out / shard["file"]), minlength=vocab_size)
    return counts


def _remove_stale_shards(out: Path, manifest: dict[str, Any]) -> None:
    """Delete shards left by an earlier, larger run into the same directory."""
    listed = {shard["file"] for split in manifest["splits"].values() for shard in split["shards"]}
    for split in SPLITS:
        for path in sorted((out / split).glob("shard_*.bin")):
            if f"{split}/{path.name}" not in listed:
                log.info("removing stale shard %s", path)
                path.unlink()
