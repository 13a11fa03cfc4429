"""What zero-shot task scoring costs: examples/s by batch size, and in-loop evaluation's share of
training wall time.

1. Scoring: the built-in tasks (a fixed subsample) scored with a checkpoint at each batch size;
   batch size 1 (one forward per row, no padding) is the baseline of the same run.
2. In-loop: `gptlab-train callbacks=eval_tasks` for --steps steps with the callback scoring
   every --every steps. The callback times its own scoring (TensorBoard `eval/seconds`), so its
   share of the run's wall time is measured inside one run, interleaved with the training it
   interrupts (load from other processes hits both alike). The share at the callback's defaults
   (every 250 steps of the default 1,000-step run) is extrapolated from the same run's seconds
   per evaluation and per training step.

    python benchmarks/bench_eval.py                          # the newest last.ckpt; 1,000 steps
    python benchmarks/bench_eval.py --steps 100 --every 25    # a quick look (~10x shorter)

The data is the built-in corpus as gptlab-prepare writes it (data/builtin-bpe4096).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from gptlab.analysis import read_scalars
from gptlab.cli import CONFIG_DIR
from gptlab.cli.train import train
from gptlab.eval.builtin import builtin_tasks
from gptlab.eval.scoring import score_tasks
from gptlab.eval.tasks import subsample
from gptlab.training.checkpoint import load_model, resolve_checkpoint

DEFAULT_EVERY, DEFAULT_STEPS = 250, 1000  # configs/callbacks/eval_tasks.yaml, the default run


def scoring_table(ckpt: Path, data_dir: str, batch_sizes: list[int], max_examples: int) -> None:
    model, tokenizer = load_model(ckpt)
    tasks = [subsample(t, max_examples) for t in builtin_tasks(data_dir)]
    print(f"\n## Scoring {ckpt} ({', '.join(f'{t.name}: {len(t.examples)}' for t in tasks)})\n")
    print("| batch size | " + " | ".join(f"{t.name} examples/s" for t in tasks) + " | vs batch 1 |")
    print("| ---: | " + " | ".join("---:" for _ in tasks) + " | ---: |")
    baseline = None
    for batch_size in batch_sizes:
        start = time.perf_counter()
        results = score_tasks(model, tokenizer, tasks, batch_size)
        seconds = time.perf_counter() - start
        baseline = baseline or seconds
        speeds = " | ".join(f"{results[t.name]['examples_per_sec']:.1f}" for t in tasks)
        print(f"| {batch_size} | {speeds} | {baseline / seconds:.2f}x |")


def in_loop_share(data_dir: str, steps: int, every: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        overrides = [
            f"corpus.dir={data_dir}",
            "callbacks=eval_tasks",
            f"callbacks.eval_tasks.every_n_steps={every}",
            f"trainer.max_steps={steps}",
            f"scheduler.warmup_steps={min(100, steps // 10)}",  # the default run's 100
            "trainer.enable_progress_bar=false",
        ]
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
        with open_dict(cfg):
            cfg.paths.output_dir = str(out)
            cfg.paths.log_dir = str(out / "logs")
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            train(cfg)
        wall = time.perf_counter() - start
        scalars = read_scalars(out / "tensorboard")
    evals = len(scalars["eval/seconds"])
    eval_seconds = scalars["eval/seconds"][-1][1]
    per_eval = eval_seconds / evals
    per_step = (wall - eval_seconds) / steps
    default_evals = DEFAULT_STEPS // DEFAULT_EVERY
    default_share = default_evals * per_eval / (DEFAULT_STEPS * per_step + default_evals * per_eval)
    print(f"\n## In-loop evaluation, {steps} steps, scoring every {every}\n")
    print(
        "| run wall s | evaluations | scoring s | share of wall time | s per evaluation | "
        "s per training step | share at the defaults (every 250 of 1,000 steps) |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(
        f"| {wall:.1f} | {evals} | {eval_seconds:.1f} | {eval_seconds / wall:.1%} | "
        f"{per_eval:.2f} | {per_step:.3f} | {default_share:.1%} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", default="last", help="checkpoint to score (default: newest)")
    parser.add_argument("--data-dir", default="data/builtin-bpe4096")
    parser.add_argument("--batch-sizes", default="1,16,32,64")
    parser.add_argument("--max-examples", type=int, default=200)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--every", type=int, default=DEFAULT_EVERY)
    parser.add_argument("--skip-training", action="store_true", help="only the scoring table")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    ckpt = resolve_checkpoint(args.ckpt, "logs")
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    scoring_table(ckpt, args.data_dir, sizes, args.max_examples)
    if not args.skip_training:
        in_loop_share(args.data_dir, args.steps, args.every)


if __name__ == "__main__":
    main()
