"""The LR-transfer study, SP vs μP (README.md here, "LR transfer"): experiment=small_cpu trained
over a learning-rate grid in 2x steps x widths x seeds, under both parametrizations.

    python -m experiments.mup.transfer_run          # the study; a rerun skips finished runs
    python -m experiments.mup.transfer_analyze      # its tables and plot

The two parametrizations run side by side, one thread each, as one Hydra sweep per width under
<log dir>/mup_transfer/<sp|mup>/ (each lane's output in its launch.log). μP's base width is the
smallest width, where μP is the same model as SP. Only the final validation loss is measured,
and no checkpoint is kept. --init-std sets the init std (model.init_std, the std at the base
width under μP) of every run: a base hyperparameter to tune, beside the LR.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from experiments.launch import STAMP, done_settings, gptlab_train, products, run_lanes

TASK = "mup_transfer"
WIDTHS = (32, 64, 128, 256)
LRS = tuple(2.0**k for k in range(-10, -3))  # 2^-10 (~0.001) to 2^-4 (0.0625)
SEEDS = (1, 2, 3)
STEPS = 300  # small_cpu's budget
KEYS = ("trainer.max_steps", "model.n_embd", "optimizer.lr", "seed", "model.init_std")


def sweep_overrides(
    parametrization: str, width: int, lrs: list[str], seeds: list[str], args: argparse.Namespace
) -> list[str]:
    """One Hydra sweep: `lrs` x `seeds` at one width."""
    root = args.log_dir / TASK / parametrization
    overrides = [
        "-m",
        "experiment=small_cpu",
        f"model.parametrization={parametrization}",
        f"model.n_embd={width}",
        f"optimizer.lr={','.join(lrs)}",
        f"seed={','.join(seeds)}",
        f"trainer.max_steps={args.steps}",
        f"scheduler.warmup_steps={args.steps // 10}",  # small_cpu's 30 of 300
        f"trainer.val_check_interval={args.steps}",  # the final loss is all the study reads
        "++trainer.enable_checkpointing=false",  # ++: set it, whether the config has it or not
        "callbacks.model_checkpoint=null",
        "callbacks.attention_diagnostics=null",
        f"hydra.sweep.dir={root}/w{width}_{STAMP}",
    ]
    if parametrization == "mup":
        overrides.append(f"model.mup_base_width={min(args.widths)}")
    if args.init_std is not None:
        overrides.append(f"model.init_std={args.init_std}")
    return overrides


def init_std_override(init_std: float | None) -> str | None:
    """How a run records --init-std among its overrides (None: the config's default)."""
    return None if init_std is None else str(init_std)


def lane(parametrization: str, args: argparse.Namespace) -> Callable[[], None]:
    """Train every run of one parametrization that has not finished yet, width by width."""
    root = args.log_dir / TASK / parametrization

    def train_missing() -> None:
        done = done_settings(root, KEYS)
        steps, lrs, seeds = str(args.steps), list(map(str, args.lrs)), list(map(str, args.seeds))
        init = init_std_override(args.init_std)
        for width in args.widths:
            missing = [
                (lr, seed)
                for lr in lrs
                for seed in seeds
                if (steps, str(width), lr, seed, init) not in done
            ]
            for sweep_lrs, sweep_seeds in products(missing):
                overrides = sweep_overrides(parametrization, width, sweep_lrs, sweep_seeds, args)
                gptlab_train(overrides, root / "launch.log")

    return train_missing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=WIDTHS)
    parser.add_argument("--lrs", type=float, nargs="+", default=LRS)
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    parser.add_argument("--steps", type=int, default=STEPS)
    add_init_std_option(parser)
    parser.add_argument("--log-dir", type=Path, default=Path("logs"))
    return parser.parse_args(argv)


def add_init_std_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--init-std", type=float, help="model.init_std of every run (default: the config's)"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_lanes([lane(parametrization, args) for parametrization in ("sp", "mup")])


if __name__ == "__main__":
    main()
