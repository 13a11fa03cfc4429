"""What a prepared data folder holds, read and checked: ``manifest.json``, and the merge of
the folders of several tasks into one manifest (see `gptlab.data.prepare`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from gptlab import __version__
from gptlab.data.shards import dtype_for_vocab, read_shard
from gptlab.data.tokenizer import eot_id, load_tokenizer, unk_id
from gptlab.errors import DataError
from gptlab.fileio import atomic_write, atomic_write_text

MANIFEST_NAME = "manifest.json"
TASK_MANIFEST_NAME = "task_manifest.json"
TOKENIZER_NAME = "tokenizer.json"
MANIFEST_VERSION = 1
SPLITS = ("train", "val")


def task_dir(out_dir: str | Path, num_tasks: int, task_index: int) -> Path:
    """Where task `task_index` of `num_tasks` writes: `out_dir` itself for a single task."""
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise ValueError(
            f"need corpus.num_tasks >= 1 and corpus.task_index in [0, num_tasks), "
            f"got num_tasks={num_tasks}, task_index={task_index}"
        )
    out = Path(out_dir)
    return out if num_tasks == 1 else out / f"task_{task_index:05d}-of-{num_tasks:05d}"


def merge_tasks(out_dir: str | Path, num_tasks: int) -> dict[str, Any]:
    """Write one ``manifest.json`` in `out_dir` over the shards of its `num_tasks` prepared
    tasks (in task order, so the token streams are those of a single task), and return it."""
    if num_tasks < 2:
        raise ValueError(f"merging needs corpus.num_tasks >= 2, got {num_tasks}")
    out = Path(out_dir)
    parts = []
    for index in range(num_tasks):
        folder = task_dir(out, num_tasks, index)
        path = folder / TASK_MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist: task {index} of {num_tasks} has not finished; run "
                f"gptlab-prepare corpus.num_tasks={num_tasks} corpus.task_index={index} first"
            )
        parts.append((folder, json.loads(path.read_text(encoding="utf-8"))))
    first_folder, first = parts[0]
    for folder, part in parts[1:]:
        if part["tokenizer"]["sha256"] != first["tokenizer"]["sha256"]:
            raise DataError(
                f"{folder / TOKENIZER_NAME} differs from {first_folder / TOKENIZER_NAME}: the "
                "tasks were prepared with different tokenizers or settings; rerun them alike"
            )
    splits = {
        name: {
            key: sum(part["splits"][name][key] for _, part in parts)
            for key in ("documents", "tokens", "bytes")
        }
        | {
            "shards": [
                shard | {"file": f"{folder.name}/{shard['file']}"}
                for folder, part in parts
                for shard in part["splits"][name]["shards"]
            ]
        }
        for name in SPLITS
    }
    if not splits["val"]["shards"]:
        raise DataError(
            f"no document of the {num_tasks} tasks in {out} went to the val split; "
            "raise val_fraction, or prepare this small corpus in one task"
        )
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    with atomic_write(out / TOKENIZER_NAME) as f:
        f.write((first_folder / TOKENIZER_NAME).read_bytes())
    manifest = {key: first[key] for key in ("source", "tokenizer", "val_fraction", "split")}
    manifest["dropped"] = {
        key: sum(part["dropped"][key] for _, part in parts) for key in first["dropped"]
    }
    manifest["tasks"] = num_tasks
    manifest["splits"] = splits
    manifest = complete_manifest(out, manifest, load_tokenizer(out / TOKENIZER_NAME))
    atomic_write_text(out / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    return manifest


def complete_manifest(out: Path, manifest: dict[str, Any], tokenizer: Tokenizer) -> dict:
    """`manifest` with the fields every manifest has: version, vocabulary, token statistics."""
    vocab = tokenizer.get_vocab_size()
    splits = manifest["splits"]
    counts = {name: token_counts(out, splits[name]["shards"], vocab) for name in SPLITS}
    return {
        "format_version": MANIFEST_VERSION,
        "created_with": f"gptlab {__version__}",
        **manifest,
        "vocab_size": vocab,
        "eot_id": eot_id(tokenizer),
        "dtype": dtype_for_vocab(vocab).name,
        "unigram_entropy": unigram_entropy(counts["train"]),  # nats per token, train split
        "tokenizer_stats": tokenizer_stats(splits, counts, unk_id(tokenizer)),
    }


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
    the train split (low values mean a vocabulary too large for the corpus). A split without
    tokens (possible in one task's part of a corpus) has None for both.
    """

    def share(name: str, count: float) -> float | None:
        tokens = splits[name]["tokens"]
        return count / tokens if tokens else None

    train_counts = counts["train"]
    return {
        "bytes_per_token": {name: share(name, split["bytes"]) for name, split in splits.items()},
        "coverage": {
            name: 1.0
            if unknown_id is None
            else share(name, split["tokens"] - counts[name][unknown_id])
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


def token_counts(out: Path, shards: list[dict[str, Any]], vocab_size: int) -> np.ndarray:
    """How often each token id occurs in `shards`, read back from the files."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for shard in shards:
        counts += np.bincount(read_shard(out / shard["file"]), minlength=vocab_size)
    return counts
