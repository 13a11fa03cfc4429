"""Turn documents into a training-ready data directory: tokenizer, token shards, manifest.

Layout of a prepared directory::

    tokenizer.json
    train/shard_00000.bin, shard_00001.bin, ...   (see gptlab.data.shards for the format)
    val/shard_00000.bin, ...
    manifest.json

Each document is followed by the end-of-text token, so the shards of a split hold one
continuous token stream. ``manifest.json`` is written last and atomically: a directory
without it is incomplete (for example, an interrupted run) and is refused by the loaders.
"""

from __future__ import annotations

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
from gptlab.data.shards import dtype_for_vocab, write_shard
from gptlab.data.tokenizer import (
    eot_id,
    file_sha256,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
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
) -> dict[str, Any]:
    """Tokenize `documents` into `out_dir` and return the manifest written there.

    The tokenizer is trained on the train split only, so validation text stays unseen;
    with `tokenizer_path` that tokenizer is used (and copied) instead, and `vocab_size`,
    `tokenizer_kind` and `min_frequency` do not apply. See `split_documents` for the split.
    """
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = ensure_writable_dir(out_dir)
    train_docs, val_docs = split_documents(documents, val_fraction)
    if tokenizer_path is None:
        log.info("training a %s tokenizer on %d documents", tokenizer_kind, len(train_docs))
        tokenizer = train_tokenizer(train_docs, vocab_size, tokenizer_kind, min_frequency)
    else:
        tokenizer = _load_given_tokenizer(tokenizer_path, vocab_size)

    # From here on the directory is rewritten: until the new manifest lands, it must not
    # look like a finished dataset.
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    _write_tokenizer(tokenizer, tokenizer_path, out / TOKENIZER_NAME)
    vocab = tokenizer.get_vocab_size()
    # A document that happens to contain "<|endoftext|>" must not fake a document boundary.
    tokenizer.encode_special_tokens = True
    encode = _Encoder(tokenizer, out, shard_tokens, batch_size, progress)
    train, train_counts = encode("train", train_docs)
    val, _ = encode("val", val_docs)

    manifest = {
        "format_version": MANIFEST_VERSION,
        "created_with": f"gptlab {__version__}",
        "source": source_description,
        "tokenizer": {"file": TOKENIZER_NAME, "sha256": file_sha256(out / TOKENIZER_NAME)},
        "vocab_size": vocab,
        "eot_id": eot_id(tokenizer),
        "dtype": dtype_for_vocab(vocab).name,
        "val_fraction": val_fraction,
        "unigram_entropy": unigram_entropy(train_counts),  # nats per token, train split
        "splits": {"train": train, "val": val},
    }
    atomic_write_text(out / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
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


class _Encoder:
    """Encodes a split's documents in parallel batches and writes them as shards."""

    def __init__(
        self, tokenizer: Tokenizer, out: Path, shard_tokens: int, batch_size: int, progress: bool
    ) -> None:
        self.tokenizer = tokenizer
        self.out = out
        self.shard_tokens = shard_tokens
        self.batch_size = batch_size
        self.progress = progress
        self.vocab_size = tokenizer.get_vocab_size()
        self.dtype = dtype_for_vocab(self.vocab_size)
        self.eot = eot_id(tokenizer)

    def __call__(self, split: str, docs: list[str]) -> tuple[dict[str, Any], np.ndarray]:
        """Encode `docs` into ``out/split/``; return the split's manifest entry and token counts."""
        (self.out / split).mkdir(exist_ok=True)
        writer = _ShardWriter(self.out, split, self.shard_tokens, self.vocab_size)
        counts = np.zeros(self.vocab_size, dtype=np.int64)
        with tqdm(
            total=len(docs), desc=f"encoding {split}", unit="doc", disable=not self.progress
        ) as bar:
            for start in range(0, len(docs), self.batch_size):
                batch = docs[start : start + self.batch_size]
                encodings = self.tokenizer.encode_batch(batch)  # parallel in Rust
                tokens = np.concatenate(
                    [np.array([*enc.ids, self.eot], dtype=self.dtype) for enc in encodings]
                )
                counts += np.bincount(tokens, minlength=self.vocab_size)
                writer.add(tokens)
                bar.update(len(batch))
        shards = writer.close()
        entry = {
            "documents": len(docs),
            "tokens": sum(shard["tokens"] for shard in shards),
            "bytes": sum(len(doc.encode("utf-8")) for doc in docs),
            "shards": shards,
        }
        return entry, counts


class _ShardWriter:
    """Cuts a token stream into shards of `shard_tokens` tokens each (the last may be shorter)."""

    def __init__(self, out: Path, split: str, shard_tokens: int, vocab_size: int) -> None:
        self.out = out
        self.split = split
        self.shard_tokens = shard_tokens
        self.vocab_size = vocab_size
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, tokens: np.ndarray) -> None:
        self.pending.append(tokens)
        self.pending_tokens += len(tokens)
        if self.pending_tokens < self.shard_tokens:
            return
        stream = np.concatenate(self.pending)
        full = len(stream) - len(stream) % self.shard_tokens
        for start in range(0, full, self.shard_tokens):
            self._write(stream[start : start + self.shard_tokens])
        self.pending = [stream[full:]]
        self.pending_tokens = len(stream) - full

    def close(self) -> list[dict[str, Any]]:
        if self.pending_tokens:
            self._write(np.concatenate(self.pending))
        return self.shards

    def _write(self, tokens: np.ndarray) -> None:
        name = f"{self.split}/shard_{len(self.shards):05d}.bin"
        write_shard(self.out / name, tokens, self.vocab_size)
        self.shards.append({"file": name, "tokens": len(tokens)})


def _remove_stale_shards(out: Path, manifest: dict[str, Any]) -> None:
    """Delete shards left by an earlier, larger run into the same directory."""
    listed = {shard["file"] for split in manifest["splits"].values() for shard in split["shards"]}
    for split in SPLITS:
        for path in sorted((out / split).glob("shard_*.bin")):
            if f"{split}/{path.name}" not in listed:
                log.info("removing stale shard %s", path)
                path.unlink()
