"""The schedules study (README.md here): on the default model (model=nano, 1,000 steps), cosine
vs WSD at equal steps, and WSD decays branched off one stable run vs dedicated WSD runs.

    python -m experiments.schedules.run           # the study; a rerun skips finished runs
    python -m experiments.schedules.analyze       # its tables and plot

Runs go under <log dir>/schedules/, in two lanes side by side, one thread each:

- lane 1: cosine, 5 seeds (also the seed-to-seed sd of the default model), then dedicated WSD
  runs of half the steps, 3 seeds;
- lane 2: WSD of the full steps, 3 seeds, keeping its stable-phase checkpoints: the stable run
  and the full-length WSD result in one; then the decays branched off its checkpoints to half
  and three quarters of the steps; then dedicated WSD runs of three quarters of the steps;
- last, each lane its schedule (lane 1 cosine, lane 2 WSD) at the full steps at higher peak
  learning rates (--scan-lrs, seeds --scan-seeds) under <log dir>/schedules/lr<LR>/<schedule>/:
  is WSD's lead over cosine at the default LR a matter of the learning rate?

A branch to L steps resumes the stable run's checkpoint at step L - decay (WSD's decay is
decay_fraction x L) with trainer.max_steps=L. Validation runs every gcd(branch points, steps)
steps (200 of 1,000), so that a checkpoint is kept at every branch point.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from experiments.launch import STAMP, done_settings, gptlab_train, run_lanes, say
from gptlab.analysis import load_runs
from gptlab.training.optim import SchedulerConfig

TASK = "schedules"
STEPS = 1000  # the default budget
COSINE_SEEDS = (1, 2, 3, 4, 5)
WSD_SEEDS = (1, 2, 3)
SHORTER = (0.5, 0.75)  # the lengths branched off the stable run, as fractions of the steps
SCAN_LRS = (6e-3, 1.2e-2)  # 2x and 4x the default peak LR, 3e-3
SCAN_SEEDS = (1, 2, 3)
KEYS = ("trainer.max_steps", "seed")  # what makes a run, within one arm's folder
NO_CHECKPOINTS = ["++trainer.enable_checkpointing=false", "callbacks.model_checkpoint=null"]


def warmup(args: argparse.Namespace) -> int:
    return args.steps // 10  # the default's 100 of 1,000


def shorter_lengths(steps: int) -> list[int]:
    lengths = [round(f * steps) for f in SHORTER]
    if len(set(lengths)) < len(lengths) or min(lengths) < 1:
        raise SystemExit(f"--steps {steps} is too small for branches of {SHORTER} of it")
    return lengths


def branch_point(length: int, args: argparse.Namespace) -> int:
    """The last stable step of a WSD run of `length` steps: where its decay branches off."""
    cfg = SchedulerConfig(name="wsd", warmup_steps=warmup(args), max_steps=length)
    return length - cfg.wsd_decay_steps


def common(args: argparse.Namespace) -> list[str]:
    points = [branch_point(length, args) for length in shorter_lengths(args.steps)]
    return [
        f"scheduler.warmup_steps={warmup(args)}",
        f"trainer.val_check_interval={math.gcd(*points, args.steps)}",
        "callbacks.samples=null",
        "trainer.enable_progress_bar=false",
    ]


def sweep(
    arm: str,
    scheduler: str,
    length: int,
    seeds: Sequence[int],
    args: argparse.Namespace,
    extra: Sequence[str] = (),
) -> Callable[[], None]:
    """A Hydra sweep over the `seeds` of one arm and length that have not finished yet."""
    root = args.log_dir / TASK / arm

    def train_missing() -> None:
        done = done_settings(root, KEYS)
        todo = [str(s) for s in seeds if (str(length), str(s)) not in done]
        if todo:
            overrides = ["-m", f"scheduler={scheduler}", f"trainer.max_steps={length}"]
            overrides += [f"seed={','.join(todo)}", *common(args), *extra]
            overrides.append(f"hydra.sweep.dir={root}/L{length}_{STAMP}")
            gptlab_train(overrides, args.log_dir / TASK / "launch.log")

    return train_missing


def stable_checkpoint(args: argparse.Namespace, seed: int, step: int) -> Path | None:
    """The checkpoint at `step` of the finished full-length WSD run of `seed`, if any."""
    for run in load_runs(args.log_dir / TASK / "wsd"):
        setting = (run.overrides.get("trainer.max_steps"), run.overrides.get("seed"))
        if run.results is not None and setting == (str(args.steps), str(seed)):
            found = sorted((run.path / "checkpoints").glob(f"step{step:06d}-*.ckpt"))
            if found:
                return found[0]
    return None


def branches(args: argparse.Namespace) -> None:
    """Each shorter length's decay, branched off each seed's stable run."""
    root = args.log_dir / TASK / "branch"
    done = done_settings(root, KEYS)
    for length in shorter_lengths(args.steps):
        point = branch_point(length, args)
        for seed in args.wsd_seeds:
            if (str(length), str(seed)) in done:
                continue
            checkpoint = stable_checkpoint(args, seed, point)
            if checkpoint is None:
                say(f"no stable-run checkpoint at step {point} for seed {seed}: branch skipped")
                continue
            overrides = ["scheduler=wsd", f"trainer.max_steps={length}", f"seed={seed}"]
            overrides += [f"ckpt_path={checkpoint}", *common(args), *NO_CHECKPOINTS]
            overrides.append(f"hydra.run.dir={root}/L{length}-s{seed}_{STAMP}")
            gptlab_train(overrides, args.log_dir / TASK / "launch.log")


def lr_scan(schedule: str, args: argparse.Namespace) -> list[Callable[[], None]]:
    """Full-length runs of `schedule` at each of the scan's peak learning rates."""
    return [
        sweep(
            f"lr{lr:g}/{schedule}",
            schedule,
            args.steps,
            args.scan_seeds,
            args,
            [*NO_CHECKPOINTS, f"optimizer.lr={lr:g}"],
        )
        for lr in args.scan_lrs
    ]


def lanes(args: argparse.Namespace) -> list[Callable[[], None]]:
    half, three_quarters = shorter_lengths(args.steps)
    cosine = sweep("cosine", "cosine", args.steps, args.cosine_seeds, args, NO_CHECKPOINTS)
    keep_all = ["callbacks.model_checkpoint.save_top_k=-1"]  # every stable-phase checkpoint
    stable = sweep("wsd", "wsd", args.steps, args.wsd_seeds, args, keep_all)
    dedicated = [
        sweep("wsd", "wsd", length, args.wsd_seeds, args, NO_CHECKPOINTS)
        for length in (half, three_quarters)
    ]

    def lane_1() -> None:
        cosine()
        dedicated[0]()
        for scan in lr_scan("cosine", args):
            scan()

    def lane_2() -> None:
        stable()
        branches(args)
        dedicated[1]()
        for scan in lr_scan("wsd", args):
            scan()

    return [lane_1, lane_2]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--cosine-seeds", type=int, nargs="+", default=COSINE_SEEDS)
    parser.add_argument("--wsd-seeds", type=int, nargs="+", default=WSD_SEEDS)
    parser.add_argument("--scan-lrs", type=float, nargs="*", default=SCAN_LRS)
    parser.add_argument("--scan-seeds", type=int, nargs="+", default=SCAN_SEEDS)
    parser.add_argument("--log-dir", type=Path, default=Path("logs"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    run_lanes(lanes(parse_args(argv)))


if __name__ == "__main__":
    main()
