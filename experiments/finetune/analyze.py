"""Results of the finetuning study (run.py): per setting, mean ± sd over seeds of the held-out
accuracy and loss (classification) and of the loss on held-out response tokens (SFT); Welch's
tests of the differences README.md claims.

    python -m experiments.finetune.analyze [--log-dir logs]

Writes results.md next to this file and prints it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from experiments.finetune.run import LANES, TASK
from gptlab.analysis import SweepJob, claims_section, load_runs, mean_std_text, unfinished_lines

HERE = Path(__file__).resolve().parent
EARLY = 100  # the step of the early accuracy README.md compares


def accuracy_at(step: int) -> Callable[[SweepJob], float]:
    """The val accuracy of the validation after `step` optimizer steps: the last one logged at
    or before `step` (Lightning logs the validation after 100 steps at step 99)."""

    def accuracy(run: SweepJob) -> float:
        logged = dict(run.scalars["accuracy/val"])
        return 100 * logged[max(s for s in logged if s <= step)]

    return accuracy


# metric -> how a finished run gives it (accuracies in percent)
METRICS: dict[str, Callable[[SweepJob], float]] = {
    "val acc @100 (%)": accuracy_at(EARLY),
    "val acc (%)": lambda run: 100 * run.results["val_acc"],
    "val loss": lambda run: run.results["val_loss"],
}
TABLES = {  # lane -> the metrics its table shows
    "classify": ["val acc @100 (%)", "val acc (%)", "val loss"],
    "sft": ["val loss"],
}
# README.md's claims, each "a's metric is lower than b's" (an accuracy claimed higher: b vs a).
CLAIMS = {
    "SFT val loss: LoRA vs full": ("val loss", "sft_lora", "sft_full"),
    "SFT val loss: pretrained full vs from scratch": ("val loss", "sft_full", "sft_scratch"),
    "classify val acc: LoRA vs full": ("val acc (%)", "classify_lora", "classify_full"),
    "classify val acc: freeze 3 blocks vs full": (
        "val acc (%)", "classify_freeze3", "classify_full",
    ),
    "classify val acc: from scratch vs pretrained full": (
        "val acc (%)", "classify_scratch", "classify_full",
    ),
    "classify val acc @100: from scratch vs pretrained full": (
        "val acc @100 (%)", "classify_scratch", "classify_full",
    ),
}  # fmt: skip

Values = dict[str, dict[str, list[float]]]  # setting -> metric -> a value per finished run


def by_setting(runs: list[SweepJob], root: Path) -> dict[str, list[SweepJob]]:
    """Runs grouped by setting: the folder under `root` that run.py gave their sweep."""
    groups: dict[str, list[SweepJob]] = {}
    for run in runs:
        groups.setdefault(run.path.relative_to(root).parts[0], []).append(run)
    return groups


def values_of(groups: dict[str, list[SweepJob]]) -> Values:
    """Each setting's metrics of its finished runs, for the metrics of its lane's table."""
    return {
        setting: {m: [METRICS[m](run) for run in groups.get(setting, [])] for m in metrics}
        for lane, metrics in TABLES.items()
        for setting in LANES[lane]
    }


def lane_table(lane: str, values: Values) -> list[str]:
    metrics = TABLES[lane]
    lines = [f"| {lane} run | {' | '.join(metrics)} |", "| --- |" + " ---: |" * len(metrics)]
    for setting in LANES[lane]:
        cells = [mean_std_text(v) if v else "–" for v in values[setting].values()]
        lines.append(f"| {setting} | {' | '.join(cells)} |")
    return lines


def report(values: Values, checkpoints: list[str], unfinished: list[SweepJob], root: Path) -> str:
    claims = {name: (values[a][m], values[b][m]) for name, (m, a, b) in CLAIMS.items()}
    lines = [
        "# Finetuning: results (mean ± sd over seeds)",
        "",
        f"Runs under `{root}`; pretrained checkpoint: "
        + (", ".join(f"`{c}`" for c in checkpoints) or "none yet")
        + (" (**more than one**: the seeds do not share it)" if len(checkpoints) > 1 else "")
        + ".",
        "",
        *lane_table("classify", values),
        "",
        *lane_table("sft", values),
        "",
        *claims_section(claims, "a's metric is lower than b's"),
        *unfinished_lines(unfinished),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log-dir", type=Path, default=Path("logs"))
    parser.add_argument("--out-dir", type=Path, default=HERE)
    args = parser.parse_args(argv)
    root = args.log_dir / TASK
    runs = load_runs(root)
    finished = [run for run in runs if run.results is not None]
    checkpoints = sorted({run.overrides.get("init_from", "null") for run in finished} - {"null"})
    unfinished = [run for run in runs if run.results is None]
    text = report(values_of(by_setting(finished, root)), checkpoints, unfinished, root)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
