"""Table of finetuning runs: python experiments/finetune/collect.py logs/classify logs/sft

For every run folder under the given directories (anything with .hydra/overrides.yaml and
TensorBoard events) prints its overrides and its last logged validation metrics.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from gptlab.analysis import read_scalars

METRICS = ("loss/val", "accuracy/val", "accuracy/val_majority")


def last_values(events_dir: Path) -> dict[str, tuple[int, float]]:
    """tag -> (step, value) of each metric's last logged point."""
    scalars = read_scalars(events_dir)
    return {tag: scalars[tag][-1] for tag in METRICS if scalars.get(tag)}


def main(roots: list[str]) -> None:
    print("| run | overrides | step | " + " | ".join(METRICS) + " |")
    print("| --- | --- | --- |" + " --- |" * len(METRICS))
    for root in roots:
        for overrides_file in sorted(Path(root).glob("**/.hydra/overrides.yaml")):
            run = overrides_file.parent.parent
            overrides = [
                o for o in yaml.safe_load(overrides_file.read_text()) if "progress_bar" not in o
            ]
            values = last_values(run / "tensorboard")
            step = max((s for s, _ in values.values()), default=0)
            cells = [f"{values[m][1]:.4f}" if m in values else "" for m in METRICS]
            print(f"| {run.name} | {' '.join(overrides)} | {step} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
