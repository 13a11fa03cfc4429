"""Score an ablation sweep's final checkpoints on the built-in tasks, and compare the variants'
ranking by the tasks with their ranking by validation loss.

    bash experiments/ablations/rerun_with_tasks.sh        # both sweeps, then this for each
    python -m experiments.ablations.task_scores attention_ablation   # the newest sweep

For each run (variant x seed) the final `last.ckpt` is scored with `gptlab.eval` on the
built-in tasks of the data it trained on (all examples). Per variant: mean +- sample standard
deviation over seeds. Rankings: by final val loss (lower first) and by each task metric
(better first), with Spearman's rank correlation against the loss ranking. Two neighbours in a
ranking are "within noise" when their means differ by less than twice the standard error of
the difference (sd over seeds; a single seed has no sd, so nothing is called resolved).
Writes results/<task>_tasks.md.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from experiments.ablations.analyze import group_by_variant, sweep_arguments
from gptlab.analysis import load_sweep, mean_std
from gptlab.cli.evaluate import training_data_dir
from gptlab.eval.builtin import builtin_tasks
from gptlab.eval.scoring import score_tasks
from gptlab.training.checkpoint import load_model

# (column, task, metric, higher is better)
METRICS = [
    ("cloze acc", "docstring_cloze", "acc", True),
    ("cloze acc_norm", "docstring_cloze", "acc_norm", True),
    ("cloze gold bits/byte", "docstring_cloze", "gold_bpb", False),
    ("last-word acc", "last_word", "acc", True),
    ("last-word bits/byte", "last_word", "bpb", False),
]
LOSS = "val loss"


@dataclass
class Variant:
    name: str
    values: dict[str, list[float]]  # column -> one value per seed

    def mean_sd(self, column: str) -> tuple[float, float]:
        return mean_std(self.values[column])


def score_sweep(sweep_dir: Path) -> list[Variant]:
    """Every job's final val loss and task metrics, grouped into variants."""
    variants = []
    tasks_by_data: dict[str, list] = {}
    for name, jobs in group_by_variant(load_sweep(sweep_dir)).items():
        values: dict[str, list[float]] = {LOSS: [], **{m[0]: [] for m in METRICS}}
        for job in jobs:
            model, tokenizer = load_model(job.checkpoint)
            data_dir = training_data_dir(job.checkpoint)
            tasks = tasks_by_data.setdefault(data_dir, builtin_tasks(data_dir))
            scores = score_tasks(model, tokenizer, tasks, batch_size=64)
            values[LOSS].append(job.final("loss/val"))
            for column, task, metric, _ in METRICS:
                values[column].append(scores[task][metric])
        variants.append(Variant(name, values))
    return variants


def ranking(variants: list[Variant], column: str, higher_is_better: bool) -> list[Variant]:
    return sorted(variants, key=lambda v: v.mean_sd(column)[0], reverse=higher_is_better)


def within_noise(a: Variant, b: Variant, column: str) -> bool:
    """Whether the means differ by less than 2 standard errors of their difference."""
    (mean_a, sd_a), (mean_b, sd_b) = a.mean_sd(column), b.mean_sd(column)
    se = math.sqrt(sd_a**2 / len(a.values[column]) + sd_b**2 / len(b.values[column]))
    return not abs(mean_a - mean_b) > 2 * se  # equal means, or a nan sd (one seed): noise


def average_ranks(values: list[float]) -> list[float]:
    """1-based ranks of `values`, ties sharing the mean of the ranks they span."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start : end + 1]:
            ranks[i] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the average ranks, so that tied
    values (e.g. several variants at accuracy 0) count as ties; nan when either side is all
    tied."""
    rx, ry = average_ranks(x), average_ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else math.nan


def ranking_line(variants: list[Variant], column: str, higher_is_better: bool) -> str:
    """'a > b ~ c': '~' joins neighbours within noise, '>' separates resolved ones."""
    ranked = ranking(variants, column, higher_is_better)
    parts = [ranked[0].name]
    for before, after in zip(ranked, ranked[1:], strict=False):
        parts += ["~" if within_noise(before, after, column) else ">", after.name]
    return " ".join(parts)


def report(task: str, sweep_dir: Path, variants: list[Variant]) -> str:
    columns = [LOSS] + [m[0] for m in METRICS]
    seeds = sorted({len(v.values[LOSS]) for v in variants})
    lines = [
        f"Sweep: `{sweep_dir}`; built-in tasks of each run's data, all examples; "
        f"mean ± sd over {'/'.join(map(str, seeds))} seeds.",
        "",
        "| variant | " + " | ".join(columns) + " |",
        "| --- | " + " | ".join("---:" for _ in columns) + " |",
    ]
    for v in variants:
        cells = [f"{m:.4f} ± {s:.4f}" for m, s in (v.mean_sd(c) for c in columns)]
        lines.append(f"| {v.name} | " + " | ".join(cells) + " |")
    # Badness: lower is better on both sides, so rho = +1 when a metric ranks as the loss does.
    loss_badness = [v.mean_sd(LOSS)[0] for v in variants]
    lines += ["", "Rankings, best first ('~': within noise of the next, '>': resolved):", ""]
    lines.append(f"- {LOSS}: {ranking_line(variants, LOSS, False)}")
    for column, _, _, higher in METRICS:
        badness = [(-1 if higher else 1) * v.mean_sd(column)[0] for v in variants]
        rho = spearman(loss_badness, badness)
        lines.append(
            f"- {column}: {ranking_line(variants, column, higher)} (Spearman ρ vs loss {rho:+.2f})"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args, sweep_dir = sweep_arguments(__doc__.split("\n")[0], argv)
    text = report(args.task, sweep_dir, score_sweep(sweep_dir))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.task}_tasks.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
