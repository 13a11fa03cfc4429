"""Batched log-likelihood scoring of tasks, and their metrics as lm-evaluation-harness defines them.

Each (context, continuation) pair is tokenized as lm-eval's causal models do: trailing whitespace
of the context moves to the continuation, the whole text is encoded, and the continuation is
what follows the context's own tokens (an empty context is the end-of-text token). Contexts
are not preceded by end-of-text, as with lm-eval's `hf` backend on a GPT-2. A row longer than
block_size + 1 tokens loses tokens from the left of its context.

Rows are sorted by length and scored in right-padded batches, one forward each: a causal
model's positions never see the padding after them.

Metrics of a multiple-choice task (n examples, answer = argmax over choices):
- acc: the answer by total log-likelihood of each choice is the gold one.
- acc_norm: by log-likelihood divided by the choice's length in characters, `len(choice)`,
  without the delimiter: lm-eval's acc_norm (which its docs call byte length; for ASCII text
  characters are bytes, and lm-eval's `acc_bytes` divides by UTF-8 bytes).
- acc_centred: (acc - chance) / (1 - chance), chance = the mean of 1 / number of choices;
  0 at chance, 1 when always right (nanochat's CORE centres each task so).
- gold_bpb: bits per UTF-8 byte of the gold continuations, total nats / (ln 2 x total bytes):
  moves smoothly while accuracy is still at chance (OLMo's in-loop metric).
A target (cloze) task reports acc (greedy decoding gives the target exactly), ppl
(exp of minus the mean log-likelihood per example, lm-eval's `perplexity`) and bpb.
Each acc comes with its binomial standard error sqrt(p (1 - p) / n).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from gptlab.data.tokenizer import eot_id
from gptlab.eval.tasks import Task
from gptlab.model import GPT

log = logging.getLogger(__name__)

Request = tuple[list[int], list[int]]  # (context ids, continuation ids)


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> Request:
    """Token ids of context and continuation, split as lm-eval's causal models split them."""
    if not context:
        ids = tokenizer.encode(continuation).ids
        eot = eot_id(tokenizer)
        return ([eot], ids) if ids[:1] != [eot] else (ids[:1], ids[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation).ids
    context_ids = tokenizer.encode(context).ids
    return context_ids, whole[len(context_ids) :]


@torch.no_grad()
def loglikelihoods(
    model: GPT, requests: Sequence[Request], batch_size: int = 16
) -> list[tuple[float, bool]]:
    """For each (context, continuation): the summed log-probability (nats) of the continuation
    tokens given the context, and whether greedy decoding would produce them all."""
    max_len = model.config.block_size
    rows = []  # (input tokens, continuation ids) per request
    for i, (context, continuation) in enumerate(requests):
        if not context or not continuation:
            raise ValueError(
                f"request {i} needs a context token (end-of-text for an empty context) and a "
                "continuation to score"
            )
        if len(continuation) > max_len:
            raise ValueError(
                f"request {i}: a continuation of {len(continuation)} tokens exceeds "
                f"block_size={max_len}"
            )
        rows.append(((context + continuation)[-(max_len + 1) :][:-1], continuation))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    was_training = model.training
    model.eval()
    results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    try:
        for first in range(0, len(order), batch_size):
            batch = order[first : first + batch_size]
            scored = _score_batch(model, [rows[i] for i in batch])
            for i, result in zip(batch, scored, strict=True):
                results[i] = result
    finally:
        model.train(was_training)
    return results


def _score_batch(model: GPT, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """One right-padded forward of `rows` (input tokens, continuation ids), longest first."""
    width = len(rows[0][0])
    inputs = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.zeros(len(rows), width, dtype=torch.long)  # the continuation, where scored
    scored = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, (tokens, continuation) in enumerate(rows):
        end = len(tokens)
        inputs[r, :end] = torch.tensor(tokens)
        targets[r, end - len(continuation) : end] = torch.tensor(continuation)
        scored[r, end - len(continuation) : end] = True
    device = model.wte.weight.device
    logits = model(inputs.to(device))[scored.to(device)]  # (scored tokens, vocab), row by row
    logprobs = logits.float().log_softmax(-1).cpu()
    wanted = targets[scored]
    token_ll = logprobs.gather(1, wanted[:, None]).squeeze(1).double()
    missed = (logprobs.argmax(-1) != wanted).double()
    row = scored.nonzero()[:, 0]
    totals = torch.zeros(len(rows), dtype=torch.float64).index_add_(0, row, token_ll)
    misses = torch.zeros(len(rows), dtype=torch.float64).index_add_(0, row, missed)
    return [(float(t), bool(m == 0)) for t, m in zip(totals, misses, strict=True)]


def task_requests(task: Task, tokenizer: Tokenizer) -> list[Request]:
    """The requests of every choice of every example, example by example."""
    return [
        encode_pair(tokenizer, example.context, task.continuation(choice))
        for example in task.examples
        for choice in example.choices
    ]


def score_task(
    model: GPT, tokenizer: Tokenizer, task: Task, batch_size: int = 16
) -> dict[str, float]:
    """The task's metrics (see the module docstring), with n, examples/s, and `skipped`: the
    examples left out because one of their continuations is longer than the model's context."""
    task, skipped = fitting_examples(task, tokenizer, model.config.block_size)
    requests = task_requests(task, tokenizer)
    start = time.perf_counter()
    results = loglikelihoods(model, requests, batch_size)
    seconds = time.perf_counter() - start
    metrics = task_metrics(task, results)
    metrics["examples_per_sec"] = len(task.examples) / seconds if seconds > 0 else math.inf
    metrics["skipped"] = skipped
    return metrics


def fitting_examples(task: Task, tokenizer: Tokenizer, max_len: int) -> tuple[Task, int]:
    """`task` without the examples a model of context `max_len` cannot score (a continuation
    longer than its context), and how many those were; a warning names the count."""
    kept = [
        example
        for example in task.examples
        if all(
            len(c) <= max_len
            for _, c in task_requests(replace(task, examples=[example]), tokenizer)
        )
    ]
    skipped = len(task.examples) - len(kept)
    if skipped:
        log.warning(
            "task %s: left out %d of %d examples whose answer is longer than the model's "
            "block_size=%d tokens",
            task.name,
            skipped,
            len(task.examples),
            max_len,
        )
    return replace(task, examples=kept), skipped


def task_metrics(task: Task, results: Sequence[tuple[float, bool]]) -> dict[str, float]:
    """Metrics from the (log-likelihood, greedy) of each choice of each example, in the order
    of `task_requests`."""
    n = len(task.examples)
    if n == 0:
        raise ValueError(f"task {task.name!r} has no examples")
    per_example: list[Sequence[tuple[float, bool]]] = []
    offset = 0
    for example in task.examples:
        per_example.append(results[offset : offset + len(example.choices)])
        offset += len(example.choices)
    if offset != len(results):
        raise ValueError(f"{len(results)} results for the {offset} choices of task {task.name!r}")
    gold_nats = -sum(r[e.label][0] for e, r in zip(task.examples, per_example, strict=True))
    gold_bytes = sum(
        len(task.continuation(e.choices[e.label]).encode("utf-8")) for e in task.examples
    )
    metrics: dict[str, float] = {"n": n}
    if task.kind == "target":
        acc = float(np.mean([r[0][1] for r in per_example]))
        metrics |= {"acc": acc, "ppl": math.exp(gold_nats / n)}
    else:
        acc = _mean_correct(task, per_example, lambda choice: 1.0)
        acc_norm = _mean_correct(task, per_example, lambda choice: float(len(choice)))
        chance = float(np.mean([1 / len(e.choices) for e in task.examples]))
        metrics |= {
            "acc": acc,
            "acc_norm": acc_norm,
            "acc_centred": (acc - chance) / (1 - chance),
            "acc_norm_stderr": binomial_stderr(acc_norm, n),
            "chance": chance,
        }
    metrics["acc_stderr"] = binomial_stderr(acc, n)
    metrics["gold_bpb" if task.kind == "choice" else "bpb"] = gold_nats / (math.log(2) * gold_bytes)
    return metrics


def _mean_correct(task: Task, per_example, length) -> float:
    correct = [
        int(np.argmax([ll / length(c) for (ll, _), c in zip(r, e.choices, strict=True)])) == e.label
        for e, r in zip(task.examples, per_example, strict=True)
    ]
    return float(np.mean(correct))


def binomial_stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


def score_tasks(
    model: GPT, tokenizer: Tokenizer, tasks: Sequence[Task], batch_size: int = 16
) -> dict[str, dict[str, Any]]:
    return {task.name: score_task(model, tokenizer, task, batch_size) for task in tasks}
