"""Download-free tasks made from held-out text: the validation split of prepared data.

The validation documents are read back from the val shards (each document ends with
end-of-text), so the tasks hold only text the model never trained on. Two tasks:

- **docstring_cloze** (multiple choice, 4 choices): along each held-out docstring, windows of
  up to `context_words` words of context; the choices are the window's next `choice_words`
  words and the continuations of 3 other windows, drawn from those closest to the true one in
  UTF-8 length (within 25% or 8 bytes; windows without 3 such are left out), so that length
  gives the answer away to neither acc nor acc_norm.
- **last_word** (cloze, LAMBADA-style): each paragraph of a held-out docstring up to its last
  word; the target is that word (letters only, trailing punctuation dropped), right when greedy
  decoding produces it.

Both are deterministic functions of the documents and `seed`.
"""

from __future__ import annotations

import bisect
import random
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from gptlab.data.prepare import load_manifest
from gptlab.data.shards import read_shard
from gptlab.data.tokenizer import load_tokenizer
from gptlab.eval.tasks import Example, Task

BUILTIN_TASKS = ("docstring_cloze", "last_word")
_WORD = re.compile(r"\S+")
_LAST_WORD = re.compile(r"([A-Za-z]{2,})[.!?,;:]?")


def validation_documents(data_dir: str | Path) -> list[str]:
    """The documents of the val split of a prepared data directory, decoded from its shards."""
    return prepared_documents(data_dir, "val")


def prepared_documents(data_dir: str | Path, split: str) -> list[str]:
    """The documents of one split of a prepared data directory, decoded from its shards (each
    document ends with end-of-text)."""
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    tokenizer = load_tokenizer(data_dir / manifest["tokenizer"]["file"])
    shards = [read_shard(data_dir / s["file"]) for s in manifest["splits"][split]["shards"]]
    stream = np.concatenate(shards).astype(np.int64)
    ends = np.flatnonzero(stream == manifest["eot_id"])
    starts = np.concatenate([[0], ends[:-1] + 1])
    pieces = [stream[s:e].tolist() for s, e in zip(starts, ends, strict=True) if e > s]
    return tokenizer.decode_batch(pieces)


def docstring_cloze(
    documents: Sequence[str],
    context_words: int = 24,
    choice_words: int = 6,
    min_context_words: int = 6,
    max_choice_bytes: int = 80,
    num_choices: int = 4,
    seed: int = 0,
) -> Task:
    """The docstring cloze task (see the module docstring) from `documents`."""
    cuts = dict.fromkeys(  # distinct (context, continuation) pairs, in document order
        (context, continuation)
        for doc in documents
        for context, continuation in _cuts(doc, context_words, choice_words, min_context_words)
        if len(continuation.encode("utf-8")) <= max_choice_bytes  # not a run of code or URLs
    )
    rng = random.Random(seed)
    # By length, ties in random order: sorted by text, a tie would favour texts starting with
    # digits and capitals (code), which hold more tokens per byte than prose.
    pool = list(dict.fromkeys(cont for _, cont in cuts))
    rng.shuffle(pool)
    pool.sort(key=lambda c: len(c.encode("utf-8")))
    lengths = [len(c.encode("utf-8")) for c in pool]
    examples = []
    for context, gold in cuts:
        distractors = _nearest_in_length(pool, lengths, gold, 2 * (num_choices - 1))
        if len(distractors) < num_choices - 1:
            continue
        choices = rng.sample(distractors, num_choices - 1)
        label = rng.randrange(num_choices)
        choices.insert(label, gold)
        examples.append(Example(context, tuple(choices), label))
    return Task("docstring_cloze", "choice", examples)


def _cuts(
    doc: str, context_words: int, choice_words: int, min_context_words: int
) -> Iterator[tuple[str, str]]:
    """(context, continuation) pairs along `doc`, in windows that do not overlap: the
    continuation is `choice_words` words after up to `context_words` words of context, cut where
    a single space separates the two (the task's delimiter)."""
    words = list(_WORD.finditer(doc))
    start = 0  # the first word of the window
    while start + min_context_words + choice_words <= len(words):
        last = min(start + context_words, len(words) - choice_words)
        for k in range(last, start + min_context_words - 1, -1):  # k: the continuation's first
            if doc[words[k - 1].end() : words[k].start()] == " ":
                end = words[k + choice_words - 1].end()
                yield doc[words[start].start() : words[k - 1].end()], doc[words[k].start() : end]
                break
        start = last + choice_words


def _nearest_in_length(pool: list[str], lengths: list[int], gold: str, count: int) -> list[str]:
    """Up to `count` texts of `pool` (sorted by byte length, `lengths`) nearest to `gold` in
    byte length, other than `gold`, and none further from it than `length_tolerance`."""
    size = len(gold.encode("utf-8"))
    at = bisect.bisect_left(lengths, size)
    window = [c for c in pool[max(0, at - count - 1) : at + count + 1] if c != gold]
    near = [c for c in window if abs(len(c.encode("utf-8")) - size) <= length_tolerance(size)]
    return sorted(near, key=lambda c: abs(len(c.encode("utf-8")) - size))[:count]


def length_tolerance(size: int) -> float:
    """How far in UTF-8 bytes a distractor's length may be from the true continuation's."""
    return max(8.0, 0.25 * size)


def last_word(documents: Sequence[str], min_context_words: int = 8) -> Task:
    """The last-word task (see the module docstring) from `documents`."""
    examples = []
    for paragraph in (p.strip() for doc in documents for p in doc.split("\n\n")):
        words = list(_WORD.finditer(paragraph))
        if len(words) <= min_context_words:
            continue
        match = _LAST_WORD.fullmatch(words[-1].group())
        if match is None or paragraph[words[-2].end() : words[-1].start()] != " ":
            continue
        context = paragraph[: words[-2].end()]
        examples.append(Example(context, (" " + match.group(1),), 0))
    return Task("last_word", "target", list(dict.fromkeys(examples)))


def builtin_tasks(data_dir: str | Path, seed: int = 0) -> list[Task]:
    """The built-in tasks from the validation split of `data_dir`."""
    documents = validation_documents(data_dir)
    return [docstring_cloze(documents, seed=seed), last_word(documents)]
