"""Summarise an ablation sweep: a markdown table and a plot of val loss vs step per variant.

    python -m experiments.ablations.analyze attention_ablation   # the task's newest sweep
    python -m experiments.ablations.analyze position_ablation --sweep-dir <a multirun folder>

Writes results/<task>.md (the table) and results/<task>.png (the curves) next to this file.
Seeds of a variant are the jobs whose overrides differ only in `seed`.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from pathlib import Path

from gptlab.analysis import (
    SweepJob,
    checkpoint_config,
    count_params,
    find_sweep,
    load_sweep,
    mean_std,
    welch,
)

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class VariantSummary:
    name: str
    seeds: int
    params: int
    val_loss: tuple[float, float]  # final loss/val, mean and std over seeds
    tokens_per_sec: tuple[float, float]  # each run's median, mean and std over seeds
    entropy: float | None  # final attention entropy, mean over layers and seeds
    sink: float | None  # final first-token attention share, likewise
    curve: dict[int, list[float]]  # step -> loss/val of each seed


def group_by_variant(jobs: list[SweepJob]) -> dict[str, list[SweepJob]]:
    """Jobs grouped by the overrides that vary across the sweep, seed aside, in sweep order.
    A variant is named by its value where one key is swept ('model/position=rope' -> 'rope'),
    else by 'key=value, ...'."""
    values = {k: {job.overrides.get(k) for job in jobs} for job in jobs for k in job.overrides}
    swept = [k for k, seen in values.items() if len(seen) > 1 and k != "seed"]
    groups: dict[str, list[SweepJob]] = {}
    for job in jobs:
        parts = [f"{k}={job.overrides.get(k, '')}" for k in swept]
        name = parts[0].split("=", 1)[1] if len(swept) == 1 else ", ".join(parts)
        groups.setdefault(name or "(defaults)", []).append(job)
    return groups


def layer_mean(job: SweepJob, prefix: str) -> float | None:
    """The mean over layers of the final values of tags `prefix`layer_i, if logged."""
    tags = [tag for tag in job.scalars if tag.startswith(prefix)]
    return statistics.fmean(job.final(tag) for tag in tags) if tags else None


def summarize_variant(name: str, jobs: list[SweepJob]) -> VariantSummary:
    config, *others = [checkpoint_config(job.checkpoint) for job in jobs]
    if any(other != config for other in others):
        raise ValueError(f"variant {name!r}: its seeds trained different models")
    curve: dict[int, list[float]] = {}
    for job in jobs:
        for step, value in job.scalars["loss/val"]:
            curve.setdefault(step, []).append(value)
    entropies = [layer_mean(job, "model/attention_entropy/") for job in jobs]
    sinks = [layer_mean(job, "model/attention_sink/") for job in jobs]
    return VariantSummary(
        name=name,
        seeds=len(jobs),
        params=count_params(config),
        val_loss=mean_std([job.final("loss/val") for job in jobs]),
        tokens_per_sec=mean_std(
            [statistics.median(v for _, v in job.scalars["perf/tokens_per_sec"]) for job in jobs]
        ),
        entropy=None if None in entropies else statistics.fmean(entropies),
        sink=None if None in sinks else statistics.fmean(sinks),
        curve=curve,
    )


def markdown_table(summaries: list[VariantSummary]) -> str:
    base = summaries[0]
    lines = [
        f"| variant | parameters | final val loss (mean ± std) | Δ vs {base.name} "
        f"| Welch p vs {base.name} | tokens/s | attention entropy (nats) | first-token share |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in summaries:
        (loss, loss_std), (tps, tps_std) = s.val_loss, s.tokens_per_sec
        entropy = "–" if s.entropy is None else f"{s.entropy:.2f}"
        sink = "–" if s.sink is None else f"{s.sink:.3f}"
        lines.append(
            f"| {s.name} | {s.params:,} | {loss:.3f} ± {loss_std:.3f} (n={s.seeds}) "
            f"| {loss - base.val_loss[0]:+.3f} | {p_vs_base(s, base)} "
            f"| {tps:,.0f} ± {tps_std:,.0f} | {entropy} | {sink} |"
        )
    return "\n".join(lines) + "\n"


def p_vs_base(s: VariantSummary, base: VariantSummary) -> str:
    """The two-sided Welch p of the variant's difference from the base, over seeds."""
    if s is base or min(s.seeds, base.seeds) < 2:
        return "–"
    return f"{welch(*s.val_loss, s.seeds, *base.val_loss, base.seeds).p_two_sided:.2g}"


def plot_curves(summaries: list[VariantSummary], path: Path, title: str) -> None:
    """Val loss vs step: the mean over seeds, shaded between the best and worst seed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for s in summaries:
        steps = sorted(s.curve)
        values = [s.curve[step] for step in steps]
        (line,) = ax.plot(steps, [statistics.fmean(v) for v in values], label=s.name, marker=".")
        ax.fill_between(
            steps, [min(v) for v in values], [max(v) for v in values], alpha=0.2, lw=0,
            color=line.get_color(),
        )  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def analyze(task: str, sweep_dir: Path, out_dir: Path = RESULTS) -> list[VariantSummary]:
    """Write `out_dir`/<task>.md and .png for the sweep; return the summaries."""
    jobs = load_sweep(sweep_dir)
    summaries = [summarize_variant(n, js) for n, js in group_by_variant(jobs).items()]
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(summaries)
    (out_dir / f"{task}.md").write_text(f"Sweep: `{sweep_dir}`\n\n{table}", encoding="utf-8")
    plot_curves(summaries, out_dir / f"{task}.png", f"{task}: mean over seeds (band: min–max)")
    print(table)
    return summaries


def sweep_arguments(description: str, argv: list[str] | None) -> tuple[argparse.Namespace, Path]:
    """The command line of the sweep scripts (task, --sweep-dir, --log-dir, --out-dir) and the
    sweep folder it names."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("task", help="the sweep's task_name, e.g. attention_ablation")
    parser.add_argument("--sweep-dir", type=Path, help="default: the task's newest sweep")
    parser.add_argument("--log-dir", type=Path, default=Path("logs"))
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    return args, args.sweep_dir or find_sweep(args.log_dir, args.task)


def main(argv: list[str] | None = None) -> None:
    args, sweep_dir = sweep_arguments(__doc__.split("\n")[0], argv)
    analyze(args.task, sweep_dir, args.out_dir)


if __name__ == "__main__":
    main()
