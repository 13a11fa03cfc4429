"""gptlab-eval: loss, perplexity and bits per byte of a checkpoint on held-out text; with
`tasks=[...]`, its zero-shot scores on tasks instead (see gptlab.eval).

The text is one token stream: end-of-text, then each document followed by end-of-text (as
prepare writes it). Every token after the first is predicted once, from the tokens before it
in its window of block_size tokens (windows do not overlap, as in training).

Bits per byte = total nats / (ln 2 * UTF-8 bytes of the text). Loss and perplexity are per
token, so they depend on the tokenizer (longer tokens: fewer, harder predictions); bits per
byte measure the cost of the text itself, so models with different tokenizers compare. (A
lossy tokenizer, see gptlab.data.tokenizer, never has to predict what it drops, such as
WordPiece's spacing, so it is flattered a little.)
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from tokenizers import Tokenizer

from gptlab.cli import CONFIG_DIR
from gptlab.cli.errors import report_user_errors
from gptlab.data.prepare import load_manifest
from gptlab.data.shards import read_shard
from gptlab.data.sources import load_documents
from gptlab.data.tokenizer import eot_id, load_tokenizer
from gptlab.errors import DataError
from gptlab.eval.builtin import builtin_tasks
from gptlab.eval.scoring import score_tasks
from gptlab.eval.tasks import resolve_task, subsample
from gptlab.fileio import atomic_write_text
from gptlab.model import GPT
from gptlab.training.checkpoint import load_checkpoint, load_model, resolve_checkpoint


@torch.no_grad()
def sum_of_losses(model: GPT, stream: np.ndarray, batch_size: int = 16) -> float:
    """Total cross-entropy in nats of predicting stream[1:], in windows of block_size."""
    T = model.config.block_size
    device = next(model.parameters()).device
    predictions = len(stream) - 1
    full = predictions // T  # windows of T predictions; then one shorter window, if any

    def nats(windows: np.ndarray) -> float:  # windows: (B, T' + 1) tokens
        w = torch.from_numpy(windows.astype(np.int64)).to(device)
        logits = model(w[:, :-1]).float()  # (B, T', vocab)
        return F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()

    total = 0.0
    for first in range(0, full, batch_size):
        rows = range(first, min(first + batch_size, full))
        total += nats(np.stack([stream[i * T : i * T + T + 1] for i in rows]))
    if predictions > full * T:
        total += nats(np.asarray(stream[full * T :])[None])
    return total


def score(model: GPT, stream: np.ndarray, num_bytes: int, batch_size: int = 16) -> dict[str, float]:
    """Loss (nats/token), perplexity and bits per byte of `stream`, which encodes `num_bytes`
    bytes of text; its first token is context only."""
    if len(stream) < 2:
        raise ValueError("need at least 2 tokens to score: one of context, one to predict")
    nats = sum_of_losses(model, stream, batch_size)
    tokens = len(stream) - 1
    return {
        "loss": nats / tokens,
        "ppl": math.exp(nats / tokens),
        "bpb": nats / (math.log(2) * num_bytes),
        "tokens": tokens,
        "bytes": num_bytes,
    }


def val_stream(data_dir: str | Path) -> tuple[np.ndarray, int, Tokenizer]:
    """The val split of a prepared directory as one stream (end-of-text first), its byte count
    and its tokenizer."""
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    val = manifest["splits"]["val"]
    shards = [read_shard(data_dir / shard["file"]) for shard in val["shards"]]
    stream = np.concatenate([np.array([manifest["eot_id"]], dtype=shards[0].dtype), *shards])
    tokenizer = load_tokenizer(data_dir / manifest["tokenizer"]["file"])
    return stream, val["bytes"], tokenizer


def text_stream(documents: list[str], tokenizer: Tokenizer) -> tuple[np.ndarray, int]:
    """`documents` as one stream, end-of-text first and after each, and their byte count."""
    eot = eot_id(tokenizer)
    tokenizer.encode_special_tokens = True  # literal "<|endoftext|>" text is just text
    ids = [eot]
    for encoding in tokenizer.encode_batch(documents):
        ids += [*encoding.ids, eot]
    return np.array(ids, dtype=np.int64), sum(len(doc.encode("utf-8")) for doc in documents)


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    return json.loads(a.to_str()) == json.loads(b.to_str())


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Score the checkpoint `cfg.ckpt_path` on `cfg.tasks`, or else on `cfg.text_files` or the
    val split of `cfg.data_dir` (default: the data the checkpoint was trained on); print and
    return it."""
    path = resolve_checkpoint(cfg.ckpt_path, cfg.paths.log_dir)
    model, tokenizer = load_model(path, cfg.device)
    if cfg.tasks:
        return evaluate_tasks(cfg, path, model, tokenizer)
    if cfg.text_files:
        if tokenizer is None:
            raise ValueError(f"{path} carries no tokenizer, so text cannot be encoded")
        stream, num_bytes = text_stream(load_documents("files", list(cfg.text_files)), tokenizer)
        target = f"text files {list(cfg.text_files)}"
    else:
        data_dir = cfg.data_dir or training_data_dir(path)
        stream, num_bytes, data_tokenizer = val_stream(data_dir)
        if tokenizer is not None and not same_tokenizer(tokenizer, data_tokenizer):
            raise DataError(
                f"{data_dir} was prepared with another tokenizer than {path} was trained with; "
                "evaluate on text files (text_files=[...]) or on data prepared with its tokenizer"
            )
        target = f"val split of {data_dir}"
    if int(stream.max()) >= model.config.vocab_size:
        raise DataError(f"{target} holds token ids beyond the model's vocab_size")
    results = {"checkpoint": str(path), "target": target}
    results |= score(model, stream, num_bytes, cfg.batch_size)
    print_results(results)
    return results


def evaluate_tasks(
    cfg: DictConfig, path: Path, model: GPT, tokenizer: Tokenizer | None
) -> dict[str, Any]:
    """Zero-shot scores of the model on `cfg.tasks`; written to `cfg.results_file` if set."""
    if tokenizer is None:
        raise ValueError(f"{path} carries no tokenizer, so task text cannot be encoded")
    names = [cfg.tasks] if isinstance(cfg.tasks, str) else list(cfg.tasks)
    tasks = []
    for name in names:
        if name == "builtin":
            tasks += builtin_tasks(cfg.data_dir or training_data_dir(path), cfg.seed)
        else:
            tasks.append(resolve_task(name))
    tasks = [subsample(task, cfg.max_examples, cfg.seed) for task in tasks]
    results = {
        "checkpoint": str(path),
        "tasks": score_tasks(model, tokenizer, tasks, cfg.batch_size),
    }
    print_task_results(results)
    if cfg.results_file:
        atomic_write_text(cfg.results_file, json.dumps(results, indent=2) + "\n")
    return results


def print_task_results(results: dict[str, Any]) -> None:
    print(f"# {results['checkpoint']}", file=sys.stderr)
    print(
        f"{'task':<18} {'n':>6} {'acc':>15} {'acc_norm':>9} {'centred':>8} "
        f"{'bits/byte':>9} {'ppl':>9} {'examples/s':>10}"
    )
    for name, m in results["tasks"].items():
        acc = f"{m['acc']:.4f} ± {m['acc_stderr']:.4f}"
        bpb = m.get("gold_bpb", m.get("bpb"))
        print(
            f"{name:<18} {m['n']:>6,} {acc:>15} {_cell(m, 'acc_norm', 9)} "
            f"{_cell(m, 'acc_centred', 8)} {bpb:>9.4f} {_cell(m, 'ppl', 9, '.2f')} "
            f"{m['examples_per_sec']:>10.1f}"
        )


def _cell(metrics: dict[str, float], key: str, width: int, spec: str = ".4f") -> str:
    """A metric right-aligned in `width`, or "-" for a metric the task does not have."""
    return f"{metrics[key]:>{width}{spec}}" if key in metrics else f"{'-':>{width}}"


def training_data_dir(checkpoint_path: Path) -> str:
    """The data directory a gptlab-train checkpoint was trained on (saved by Lightning)."""
    hparams = load_checkpoint(checkpoint_path).get("datamodule_hyper_parameters", {})
    if "data_dir" not in hparams:
        raise ValueError(
            f"{checkpoint_path} does not record its data directory; set data_dir=... "
            "or text_files=[...]"
        )
    return hparams["data_dir"]


def print_results(results: dict[str, Any]) -> None:
    print(f"# {results['checkpoint']} on the {results['target']}", file=sys.stderr)
    print(f"{'tokens':>12} {'bytes':>12} {'loss':>8} {'perplexity':>11} {'bits/byte':>10}")
    print(
        f"{results['tokens']:>12,} {results['bytes']:>12,} {results['loss']:>8.4f} "
        f"{results['ppl']:>11.2f} {results['bpb']:>10.4f}"
    )


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    with report_user_errors("gptlab-eval"):
        evaluate(cfg)


if __name__ == "__main__":
    main()
