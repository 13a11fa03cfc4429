"""The finetuning study (README.md here): the seven finetuning runs of the pretrained default
model, over seeds.

    gptlab-prepare && gptlab-train             # the pretrained model: the README's main command
    python -m experiments.finetune.run         # 7 runs x 3 seeds; reruns skip finished runs
    python -m experiments.finetune.analyze     # results.md

Every run that starts from pretrained weights starts from one checkpoint, --init-from: by
default the newest last.ckpt of gptlab-train under <log dir>/train, found once at launch. The
seeds vary the finetuning's own randomness only: the initialisation of the new classifier head
or LoRA adapters (of every weight, from scratch), dropout, and the order of the training
examples. The held-out examples stay those of seed 1337, the single-seed runs' split
(finetune_data.loader.split_seed).

Runs go under <log dir>/finetune/<setting>/, one Hydra sweep over the seeds per setting; the
classification settings run in one lane and the SFT settings in another, side by side, one
thread each (lane output: classify.log and sft.log there).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

from experiments.launch import STAMP, done_settings, gptlab_train, run_lanes, say
from gptlab.training.checkpoint import resolve_checkpoint

TASK = "finetune"
SEEDS = (1, 2, 3)
SPLIT_SEED = 1337  # the held-out examples of every run: the default seed's, as before
LORA = ("finetune.method=lora", "optimizer.lr=3e-3")
FROM_SCRATCH = "init_from=null"
# setting -> its overrides; each lane trains its settings one after the other.
LANES: dict[str, dict[str, tuple[str, ...]]] = {
    "classify": {
        "classify_full": ("experiment=classify",),
        "classify_lora": ("experiment=classify", *LORA),
        "classify_scratch": ("experiment=classify", FROM_SCRATCH),
        "classify_freeze3": ("experiment=classify", "finetune.freeze_blocks=3"),
    },
    "sft": {
        "sft_full": ("experiment=sft",),
        "sft_lora": ("experiment=sft", *LORA),
        "sft_scratch": ("experiment=sft", FROM_SCRATCH),
    },
}


def sweep_overrides(
    setting: str, overrides: Sequence[str], seeds: list[str], args: argparse.Namespace
) -> list[str]:
    """One Hydra sweep: `seeds` of one setting."""
    init = [] if FROM_SCRATCH in overrides else [f"init_from={args.init_from}"]
    return [
        "-m",
        *overrides,
        *init,
        f"seed={','.join(seeds)}",
        f"finetune_data.loader.split_seed={SPLIT_SEED}",
        "trainer.enable_progress_bar=false",
        f"hydra.sweep.dir={args.log_dir / TASK / setting}/{STAMP}",
    ]


def lane(name: str, args: argparse.Namespace) -> Callable[[], None]:
    """Train, setting by setting, the seeds of lane `name` that have not finished yet."""

    def train_missing() -> None:
        for setting, overrides in LANES[name].items():
            done = done_settings(args.log_dir / TASK / setting, ["seed"])
            seeds = [str(seed) for seed in args.seeds if (str(seed),) not in done]
            if seeds:
                command = sweep_overrides(setting, overrides, seeds, args)
                gptlab_train(command, args.log_dir / TASK / f"{name}.log")

    return train_missing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    parser.add_argument("--log-dir", type=Path, default=Path("logs"))
    parser.add_argument("--init-from", default="last", help="the pretrained checkpoint")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        args.init_from = resolve_checkpoint(args.init_from, args.log_dir).resolve()
    except FileNotFoundError as err:
        raise SystemExit(f"{err}\n(--init-from names the pretrained checkpoint)") from None
    say(f"pretrained checkpoint: {args.init_from}")
    run_lanes([lane(name, args) for name in LANES])


if __name__ == "__main__":
    main()
