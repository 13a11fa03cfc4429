"""The tokenizer study (README.md here): a 2-layer, 64-wide model trained 300 steps on the
built-in corpus prepared with each tokenizer, over seeds.

    for kind in bpe unigram wordpiece char; do gptlab-prepare tokenizer=$kind; done
    python -m experiments.tokenizers.run        # 4 tokenizers x 3 seeds; reruns skip finished runs
    python -m experiments.tokenizers.analyze    # results.md and curves.png

Runs go under <log dir>/tokenizers/ as Hydra sweeps, in two lanes side by side (bpe and
unigram; wordpiece and char), one thread each; lane N writes its output to laneN.log there.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

from experiments.launch import STAMP, done_settings, gptlab_train, products, run_lanes

TASK = "tokenizers"
LANES = (("bpe", "unigram"), ("wordpiece", "char"))
SEEDS = (1, 2, 3)
STEPS = 300
VAL_EVERY = 50
KEYS = ("trainer.max_steps", "tokenizer", "seed")  # what makes a run
MODEL = [
    "model.n_layer=2",
    "model.n_head=4",
    "model.n_embd=64",
    "model.block_size=64",
    "data.loader.batch_size=16",
]


def sweep_overrides(
    lane: int, tokenizers: list[str], seeds: list[str], args: argparse.Namespace
) -> list[str]:
    """One Hydra sweep: `tokenizers` x `seeds`."""
    return [
        "-m",
        f"tokenizer={','.join(tokenizers)}",
        f"seed={','.join(seeds)}",
        *MODEL,
        f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={min(VAL_EVERY, args.steps)}",
        "scheduler.warmup_steps=20",
        "callbacks.samples=null",
        "trainer.enable_progress_bar=false",
        f"hydra.sweep.dir={args.log_dir / TASK}/lane{lane}_{STAMP}",
    ]


def lane(number: int, tokenizers: Sequence[str], args: argparse.Namespace) -> Callable[[], None]:
    """Train every run of `tokenizers` that has not finished yet."""
    root = args.log_dir / TASK

    def train_missing() -> None:
        done = done_settings(root, KEYS)
        missing = [
            (kind, str(seed))
            for kind in tokenizers
            for seed in args.seeds
            if (str(args.steps), kind, str(seed)) not in done
        ]
        for kinds, seeds in products(missing):
            overrides = sweep_overrides(number, kinds, seeds, args)
            gptlab_train(overrides, root / f"lane{number}.log")

    return train_missing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--log-dir", type=Path, default=Path("logs"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_lanes([lane(n, kinds, args) for n, kinds in enumerate(LANES, 1)])


if __name__ == "__main__":
    main()
