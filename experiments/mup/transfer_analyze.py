"""Results of the LR-transfer study (transfer_run.py): per parametrization, the final val loss
over LR x width (mean ± sd over seeds), the optimal LR at each width and how far it drifts
across widths, and whether a wider model is ever worse at the same LR.

    python -m experiments.mup.transfer_analyze [--log-dir logs] [--steps 300]

Writes transfer.md (the tables) and transfer.png (loss vs log2 LR, one curve per width, an SP
and a μP panel) next to this file, and prints the tables.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from experiments.launch import analysis_arguments
from experiments.mup.transfer_run import STEPS, TASK, add_init_std_option, init_std_override
from gptlab.analysis import (
    GridOptimum,
    SweepJob,
    compare_seeds,
    grid_optimum,
    group_runs,
    load_runs,
    mean_std_text,
    unfinished_lines,
)

HERE = Path(__file__).resolve().parent
PARAMETRIZATIONS = {"sp": "SP", "mup": "μP"}
TARGET_DRIFT = 2.0  # the target: μP's optimal LR within x2 across widths
ALPHA = 0.05

Losses = dict[int, dict[float, list[float]]]  # width -> lr -> final val loss of each seed


def final_losses(runs: list[SweepJob], steps: int, init_std: float | None = None) -> Losses:
    """The final val losses of the finished runs of `steps` steps and `init_std` (None: the
    config's), by width and LR."""
    losses: Losses = {}
    keys = ("trainer.max_steps", "model.init_std", "model.n_embd", "optimizer.lr")
    setting = (str(steps), init_std_override(init_std))
    for (run_steps, init, width, lr), group in group_runs(runs, keys).items():
        finished = [run.results["val_loss"] for run in group if run.results is not None]
        if (run_steps, init) == setting and finished:
            losses.setdefault(int(width), {})[float(lr)] = finished
    return {w: dict(sorted(by_lr.items())) for w, by_lr in sorted(losses.items())}


def optima(losses: Losses) -> dict[int, GridOptimum]:
    """The optimum in log2 LR at each width."""
    return {
        width: grid_optimum([math.log2(lr) for lr in by_lr], list(by_lr.values()))
        for width, by_lr in losses.items()
    }


def loss_table(losses: Losses, found: dict[int, GridOptimum]) -> list[str]:
    """Rows: LRs; columns: widths; the lowest mean of each width in bold."""
    widths = list(losses)
    lrs = sorted({lr for by_lr in losses.values() for lr in by_lr})
    lines = [
        "| lr | log2 lr | " + " | ".join(f"width {w}" for w in widths) + " |",
        "| ---: | ---: |" + " ---: |" * len(widths),
    ]
    for lr in lrs:
        cells = []
        for w in widths:
            text = mean_std_text(losses[w][lr]) if lr in losses[w] else "–"
            cells.append(f"**{text}**" if found[w].best == math.log2(lr) else text)
        lines.append(f"| {lr:.4g} | {math.log2(lr):.1f} | " + " | ".join(cells) + " |")
    return lines


def optimum_table(found: dict[int, GridOptimum]) -> list[str]:
    lines = [
        "| width | best lr on the grid | fitted optimum | 90% interval (seed bootstrap) | note |",
        "| ---: | ---: | ---: | ---: | --- |",
    ]
    for width, o in found.items():
        note = "at the grid's edge: widen --lrs" if o.at_edge else ""
        lines.append(
            f"| {width} | {2**o.best:.4g} | {2**o.fitted:.4g} (log2 {o.fitted:.2f}) "
            f"| [{2**o.low:.4g}, {2**o.high:.4g}] | {note} |"
        )
    return lines


def drift(found: dict[int, GridOptimum]) -> tuple[float, float]:
    """Max / min over widths of the optimal LR: on the grid, and fitted."""
    best = [o.best for o in found.values()]
    fitted = [o.fitted for o in found.values()]
    return 2 ** (max(best) - min(best)), 2 ** (max(fitted) - min(fitted))


def wider_table(losses: Losses) -> tuple[list[str], int, int, int]:
    """Per LR and adjacent pair of widths: the change in loss from the narrower to the wider,
    and the one-sided Welch p that the wider is worse. Also returns the number of pairs tested,
    worse on average, and significantly worse (p < ALPHA)."""
    widths = list(losses)
    pairs = list(zip(widths, widths[1:], strict=False))
    lrs = sorted({lr for by_lr in losses.values() for lr in by_lr})
    lines = [
        "| lr | " + " | ".join(f"{wide} vs {narrow}" for narrow, wide in pairs) + " |",
        "| ---: |" + " ---: |" * len(pairs),
    ]
    tested = worse = significant = 0
    for lr in lrs:
        cells = []
        for narrow, wide in pairs:
            a, b = losses[narrow].get(lr, []), losses[wide].get(lr, [])
            if len(a) < 2 or len(b) < 2:
                cells.append("n/a (< 2 seeds)")
                continue
            c = compare_seeds(a, b)  # p_less: the narrower is lower, i.e. the wider is worse
            tested += 1
            worse += c.difference < 0
            significant += c.p_less < ALPHA
            mark = " **worse**" if c.p_less < ALPHA else ""
            cells.append(f"{-c.difference:+.3f} (p={c.p_less:.2g}){mark}")
        lines.append(f"| {lr:.4g} | " + " | ".join(cells) + " |")
    return lines, tested, worse, significant


def report(
    losses_by_p: dict[str, Losses],
    unfinished: list[SweepJob],
    steps: int,
    init_std: float | None = None,
) -> str:
    init = "" if init_std is None else f", model.init_std={init_std:g}"
    lines = [
        f"# LR transfer, SP vs μP: results ({steps} steps of experiment=small_cpu{init})",
        "",
        "Written by `python -m experiments.mup.transfer_analyze`. Final validation loss "
        "(nats/token), mean ± sample sd over seeds (n = seeds that finished).",
    ]
    lines += unfinished_lines(unfinished)
    for p, losses in losses_by_p.items():
        name = PARAMETRIZATIONS[p]
        found = optima(losses)
        on_grid, fitted = drift(found)
        wider, tested, worse, significant = wider_table(losses)
        edges = [str(w) for w, o in found.items() if o.at_edge]
        lines += ["", f"## {name}", "", "Final val loss:", "", *loss_table(losses, found), ""]
        lines += [
            "Optimal LR per width (fitted: the vertex of a parabola in log2 LR through the best "
            "grid point and its neighbours):",
            "",
            *optimum_table(found),
            "",
            f"**Drift of the optimal LR across widths (max / min): {on_grid:.3g}x on the grid, "
            f"{fitted:.3g}x fitted** (target under μP: within {TARGET_DRIFT:g}x)."
            + (f" The optimum is at the grid's edge at width {', '.join(edges)}." if edges else ""),
            "",
            f"Wider vs the next narrower width at the same LR: loss change (wider − narrower) and "
            f"the one-sided Welch p that the wider is worse (**worse**: p < {ALPHA}):",
            "",
            *wider,
            "",
            f"**Wider worse on average in {worse} of {tested} pairs, significantly in "
            f"{significant}.**",
        ]
    return "\n".join(lines) + "\n"


def plot(losses_by_p: dict[str, Losses], path: Path) -> None:
    """Loss vs log2 LR, one curve per width (mean, sd bars); a panel per parametrization."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(losses_by_p), sharey=True, squeeze=False)[0]
    for ax, (p, losses) in zip(axes, losses_by_p.items(), strict=True):
        for width, by_lr in losses.items():
            x = [math.log2(lr) for lr in by_lr]
            means = [statistics.fmean(v) for v in by_lr.values()]
            sds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in by_lr.values()]
            ax.errorbar(x, means, yerr=sds, marker="o", ms=3, capsize=2, label=f"width {width}")
        ax.set_title(PARAMETRIZATIONS[p])
        ax.set_xlabel("log2 learning rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("final validation loss (nats/token)")
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> None:
    args = analysis_arguments(__doc__.splitlines()[0], STEPS, HERE, argv, add_init_std_option)
    runs = {p: load_runs(args.log_dir / TASK / p) for p in PARAMETRIZATIONS}
    losses = {p: final_losses(r, args.steps, args.init_std) for p, r in runs.items()}
    missing = [PARAMETRIZATIONS[p] for p, by_width in losses.items() if not by_width]
    if missing:
        raise SystemExit(
            f"no finished {args.steps}-step runs of {', '.join(missing)} under "
            f"{args.log_dir / TASK}: run `python -m experiments.mup.transfer_run` first"
        )
    unfinished = [run for r in runs.values() for run in r if run.results is None]
    text = report(losses, unfinished, args.steps, args.init_std)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "transfer.md").write_text(text, encoding="utf-8")
    plot(losses, args.out_dir / "transfer.png")
    print(text)


if __name__ == "__main__":
    main()
