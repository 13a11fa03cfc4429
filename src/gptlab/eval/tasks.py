"""Zero-shot tasks: their schema, and loading them from JSON lines or from the real benchmarks.

Two kinds of task, as in lm-evaluation-harness:

- **choice** (multiple choice): each example has a context, choices and the gold choice's index.
  The model's answer is the choice with the highest log-likelihood of `delimiter + choice`
  given the context (lm-eval's `multiple_choice`, whose default delimiter is one space).
- **target** (cloze, last word): each example has a context and a target; the target, scored as
  given (no delimiter, as lm-eval's `loglikelihood` tasks), is right when greedy decoding would
  produce it token by token.

JSON lines: one object per line, ``{"context", "choices", "label"}`` (choice) or
``{"context", "target"}`` (target); a file holds one kind. The real datasets load through
`datasets` with lm-eval's field mappings and preprocessing; `data_files` points the same mapping
at local files in the dataset's own schema (how the tests run offline).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gptlab.errors import DataError

Kind = Literal["choice", "target"]


@dataclass(frozen=True)
class Example:
    """One question. For a target task `choices` is the one target and `label` is 0."""

    context: str
    choices: tuple[str, ...]
    label: int


@dataclass
class Task:
    name: str
    kind: Kind
    examples: list[Example]
    delimiter: str = " "  # between context and each choice (choice tasks only)

    def continuation(self, choice: str) -> str:
        """The text scored after the context for `choice`."""
        return self.delimiter + choice if self.kind == "choice" else choice


def choice_example(context: str, choices: Iterable[str], label: int, where: str) -> Example:
    choices = tuple(choices)
    if len(choices) < 2:
        raise DataError(f"{where}: a multiple-choice example needs >= 2 choices, got {choices}")
    if not 0 <= label < len(choices):
        raise DataError(f"{where}: label {label} is not an index of its {len(choices)} choices")
    return Example(context, choices, label)


def target_example(context: str, target: str, where: str) -> Example:
    if not target:
        raise DataError(f"{where}: the target is empty")
    return Example(context, (target,), 0)


# --- JSON lines ---------------------------------------------------------------------------------

_SCHEMAS: dict[Kind, set[str]] = {
    "choice": {"context", "choices", "label"},
    "target": {"context", "target"},
}


def read_jsonl_task(path: str | Path, name: str | None = None) -> Task:
    """A task from a JSON-lines file; its kind is read off the first record's keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist")
    examples: list[Example] = []
    kind: Kind | None = None
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg})") from None
            kind = kind or _record_kind(record, where)
            examples.append(_jsonl_example(record, kind, where))
    if not examples:
        raise DataError(f"task file {path} holds no examples")
    return Task(name or path.stem, kind, examples)


def _record_kind(record: Any, where: str) -> Kind:
    keys = set(record) if isinstance(record, dict) else set()
    for kind, schema in _SCHEMAS.items():
        if schema <= keys:
            return kind
    raise DataError(
        f"{where}: expected an object with keys {sorted(_SCHEMAS['choice'])} (multiple choice) "
        f"or {sorted(_SCHEMAS['target'])} (cloze), got {sorted(keys) or type(record).__name__}"
    )


def _jsonl_example(record: Any, kind: Kind, where: str) -> Example:
    missing = _SCHEMAS[kind] - set(record if isinstance(record, dict) else ())
    if missing:
        raise DataError(f"{where}: missing {sorted(missing)} (the file's first record is {kind})")
    context = record["context"]
    if not isinstance(context, str):
        raise DataError(f"{where}: context must be a string")
    if kind == "target":
        if not isinstance(record["target"], str):
            raise DataError(f"{where}: target must be a string")
        return target_example(context, record["target"], where)
    choices, label = record["choices"], record["label"]
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: choices must be a list of strings")
    if not isinstance(label, int) or isinstance(label, bool):
        raise DataError(f"{where}: label must be an integer index into choices")
    return choice_example(context, choices, label, where)


def write_jsonl_task(task: Task, path: str | Path) -> None:
    """Write `task` as JSON lines that `read_jsonl_task` reads back (and lm-eval can load)."""
    from gptlab.fileio import atomic_write_text

    def record(e: Example) -> dict[str, Any]:
        if task.kind == "target":
            return {"context": e.context, "target": e.choices[0]}
        return {"context": e.context, "choices": list(e.choices), "label": e.label}

    lines = [json.dumps(record(e), ensure_ascii=False) for e in task.examples]
    atomic_write_text(path, "\n".join(lines) + "\n")


# --- the real benchmarks, through `datasets` ---------------------------------------------------


def _hellaswag_text(text: str) -> str:
    """HellaSwag's cleanup in lm-eval: WikiHow's "[title]" becomes a sentence break, other
    bracketed artifacts go, double spaces become one."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(record: Mapping[str, Any], where: str) -> Example:
    context = record["ctx_a"] + " " + record["ctx_b"].capitalize()
    return choice_example(
        _hellaswag_text(record["activity_label"] + ": " + context),
        [_hellaswag_text(ending) for ending in record["endings"]],
        int(record["label"]),
        where,
    )


def _arc(record: Mapping[str, Any], where: str) -> Example:
    labels = list(record["choices"]["label"])
    if record["answerKey"] not in labels:
        raise DataError(f"{where}: answerKey {record['answerKey']!r} is not one of {labels}")
    return choice_example(
        f"Question: {record['question']}\nAnswer:",
        record["choices"]["text"],
        labels.index(record["answerKey"]),
        where,
    )


def _piqa(record: Mapping[str, Any], where: str) -> Example:
    return choice_example(
        f"Question: {record['goal']}\nAnswer:",
        [record["sol1"], record["sol2"]],
        int(record["label"]),
        where,
    )


def _lambada(record: Mapping[str, Any], where: str) -> Example:
    # The last space-separated word is the target, with its space (lm-eval's lambada_openai).
    words = record["text"].split(" ")
    return target_example(" ".join(words[:-1]), " " + words[-1], where)


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark lives on the Hugging Face Hub and how lm-eval reads its records."""

    path: str
    config: str | None
    split: str
    kind: Kind
    to_example: Callable[[Mapping[str, Any], str], Example]


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "hellaswag": BenchmarkSpec("Rowan/hellaswag", None, "validation", "choice", _hellaswag),
    "arc_easy": BenchmarkSpec("allenai/ai2_arc", "ARC-Easy", "test", "choice", _arc),
    "piqa": BenchmarkSpec("baber/piqa", None, "validation", "choice", _piqa),
    "lambada_openai": BenchmarkSpec(
        "EleutherAI/lambada_openai", "default", "test", "target", _lambada
    ),
}


def load_benchmark(name: str, data_files: str | list[str] | None = None) -> Task:
    """A benchmark of `BENCHMARKS` through `datasets`: from the Hub, or from local JSON-lines or
    Parquet `data_files` holding records in the dataset's own schema."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}")
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"the {name} task loads through `datasets`: pip install -e '.[hf]'"
        ) from err
    spec = BENCHMARKS[name]
    if data_files is None:
        records = datasets.load_dataset(spec.path, spec.config, split=spec.split)
        source = f"{spec.path} ({spec.split})"
    else:
        files = [data_files] if isinstance(data_files, str) else list(data_files)
        builder = "parquet" if all(f.endswith(".parquet") for f in files) else "json"
        records = datasets.load_dataset(builder, data_files=files, split="train")
        source = ", ".join(files)
    examples = []
    for i, record in enumerate(records):
        where = f"{name} record {i} of {source}"
        try:
            examples.append(spec.to_example(record, where))
        except (KeyError, TypeError) as err:
            raise DataError(f"{where}: not in the {spec.path} schema ({err!r})") from None
    return Task(name, spec.kind, examples)


def resolve_task(name: str) -> Task:
    """A benchmark name of `BENCHMARKS`, or a JSON-lines file."""
    if name in BENCHMARKS:
        return load_benchmark(name)
    if name.endswith((".jsonl", ".json")) or Path(name).is_file():
        return read_jsonl_task(name)
    raise ValueError(
        f"unknown task {name!r}; choose 'builtin', one of {sorted(BENCHMARKS)}, "
        "or a .jsonl file of {context, choices, label} or {context, target} records"
    )


def subsample(task: Task, max_examples: int | None, seed: int = 0) -> Task:
    """At most `max_examples` of the task's examples, a fixed random subset in their order."""
    if max_examples is None or len(task.examples) <= max_examples:
        return task
    keep = sorted(random.Random(seed).sample(range(len(task.examples)), max_examples))
    return Task(task.name, task.kind, [task.examples[i] for i in keep], task.delimiter)
