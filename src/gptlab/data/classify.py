"""Text classification data: (text, label) examples for `LitClassifier`.

- ``source="jsonl"``: one ``{"text": ..., "label": ...}`` object per line (the field names are
  configurable); labels are strings or integers, and class ids follow the sorted label names.
- ``source="builtin"``: which standard-library package does a docstring come from? The
  `num_classes` packages (top-level modules) with the most distinct docstrings in the built-in
  corpus, every distinct docstring of theirs an example. Download-free and real.

An example is encoded as end-of-text, the text's tokens (cut to fit), end-of-text; the classifier
reads the hidden state of that final token, which has attended to the whole text. Batches are
right-padded with PAD_ID, a value no token has, so that `LitClassifier` can find each example's
last real token; it embeds token 0 at padded positions, which causal attention keeps from
affecting the real ones.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from functools import cached_property

import torch

from gptlab.data.errors import DataError
from gptlab.data.finetune import ExampleDataModule, distinct_docstrings, pad
from gptlab.data.sources import iter_jsonl_values, json_field

PAD_ID = -1


def package_examples(num_classes: int) -> list[tuple[str, str]]:
    """(docstring, package) for the `num_classes` packages with the most distinct docstrings."""
    records = [(module.split(".")[0], text) for module, _, text in distinct_docstrings()]
    counts = Counter(package for package, _ in records)
    top = {package for package, _ in counts.most_common(num_classes)}
    return [(text, package) for package, text in records if package in top]


def read_labelled_jsonl(
    paths: list[str], text_field: str, label_field: str
) -> list[tuple[str, str]]:
    examples = []
    for path, line, record in iter_jsonl_values(paths):
        where = f"{path}, line {line}"
        text = json_field(record, text_field, str, where)
        label = json_field(record, label_field, object, where)
        if isinstance(label, bool) or not isinstance(label, str | int):
            raise DataError(
                f"{where}: key {label_field!r} holds {type(label).__name__}, expected a string "
                "or an integer label"
            )
        examples.append((text, str(label)))
    return examples


def collate(items: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
    ids, labels = zip(*items, strict=True)
    return pad(ids, PAD_ID), torch.tensor(labels, dtype=torch.long)


class ClassificationDataModule(ExampleDataModule):
    """Batches (token ids padded with PAD_ID, class ids) for LitClassifier."""

    def __init__(
        self,
        source: str = "builtin",
        paths: list[str] | None = None,
        text_field: str = "text",
        label_field: str = "label",
        num_classes: int | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        val_fraction: float = 0.2,
        seed: int = 1337,
        num_workers: int = 0,
        tokenizer_path: str | None = None,
    ) -> None:
        super().__init__(
            source, paths, max_length, batch_size, val_fraction, seed, num_workers, tokenizer_path
        )
        if source == "builtin" and (num_classes is None or num_classes < 2):
            raise ValueError(
                f"finetune_data.num_classes={num_classes!r}: the built-in task needs >= 2"
            )
        if max_length < 3:
            raise ValueError(
                f"finetune_data.loader.max_length={max_length}: need >= 3 (EOT, text, EOT)"
            )
        self.text_field = text_field
        self.label_field = label_field
        self.num_classes = num_classes

    def load_examples(self) -> list[tuple[str, str]]:
        if self.source == "builtin":
            return package_examples(self.num_classes)
        return read_labelled_jsonl(self.paths, self.text_field, self.label_field)

    @cached_property
    def labels(self) -> list[str]:
        """The class names; class id i is labels[i]."""
        train, val = self.splits
        labels = sorted({label for _, label in train + val})
        if len(labels) < 2:
            raise DataError(f"the data has {len(labels)} distinct label(s); need at least 2")
        if self.num_classes is not None and len(labels) != self.num_classes:
            raise DataError(
                f"finetune_data.num_classes={self.num_classes}, but the data has {len(labels)} "
                f"labels: {labels[:20]}"
            )
        return labels

    @cached_property
    def majority_class(self) -> int:
        """The most common class of the training split: the baseline that ignores the text."""
        counts = Counter(label for _, label in self.splits[0])
        return self.labels.index(counts.most_common(1)[0][0])

    def encode(self, example: tuple[str, str]) -> tuple[list[int], int]:
        text, label = example
        ids = self.tokenizer.encode(text).ids[: self.max_length - 2]
        return [self.eot_id, *ids, self.eot_id], self.labels.index(label)

    def collate_fn(self) -> Callable:
        return collate
