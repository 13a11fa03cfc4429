"""Length generalisation: each trained position variant evaluated at 2x its training length.

    python -m experiments.ablations.length_generalisation    # the newest position_ablation sweep
    python -m experiments.ablations.length_generalisation --sweep-dir <dir> --factor 4

For every run, the loss at each position of non-overlapping validation windows of factor x
block_size tokens. Positions up to block_size see what training saw; beyond it, a model that
extrapolates keeps (or lowers) its loss with more context, and one that does not degrades.
A learned position table has block_size rows, so it cannot run past it: reported as n/a.
Writes results/length_generalisation.md and .png next to this file.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from experiments.ablations.analyze import RESULTS, group_by_variant
from gptlab.analysis import SweepJob, find_sweep, load_sweep, mean_std
from gptlab.data.datamodule import GPTDataModule
from gptlab.model import GPT
from gptlab.training.checkpoint import load_model


@torch.no_grad()
def loss_by_position(model: GPT, batches: Iterable[tuple[Tensor, Tensor]]) -> Tensor:
    """Mean next-token loss (nats) at each position, (T,), over every window of `batches`."""
    total, windows = None, 0
    for x, y in batches:
        logits = model(x)  # (B, T, V)
        loss = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")  # (B, T)
        total = loss.sum(0) if total is None else total + loss.sum(0)
        windows += x.size(0)
    if total is None:
        raise ValueError("no batches to evaluate")
    return total / windows


def evaluate_job(job: SweepJob, factor: int, batch_size: int = 16) -> Tensor | str:
    """The job's loss by position over factor x block_size tokens, or why it cannot run."""
    model, _ = load_model(job.checkpoint)
    length = factor * model.config.block_size
    limit = model.position.max_len
    if limit is not None and length > limit:
        return f"n/a: the {model.config.position} table has {limit} positions"
    data = GPTDataModule(job.config.data.loader.data_dir, block_size=length, batch_size=batch_size)
    return loss_by_position(model, data.val_dataloader())


def length_table(results: dict[str, list[Tensor | str]], block_size: int, factor: int) -> str:
    """Mean ± std over seeds of the loss in position ranges. "beyond − late" compares positions
    past training length with the second half of the trained range, where context is already
    long: about 0 or below when a model extrapolates, clearly above when it breaks down."""
    T, half, end = block_size, block_size // 2, factor * block_size
    lines = [
        f"| position | loss, positions 1–{T} | late: {half + 1}–{T} | beyond: {T + 1}–{end} "
        "| beyond − late |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, runs in results.items():
        if isinstance(runs[0], str):
            lines.append(f"| {name} | {runs[0]} | | | |")
            continue
        in_range = [r[:T].mean().item() for r in runs]
        late = [r[half:T].mean().item() for r in runs]
        beyond = [r[T:end].mean().item() for r in runs]
        excess = [b - a for a, b in zip(late, beyond, strict=True)]
        cells = [_mean_std(v) for v in (in_range, late, beyond)] + [_mean_std(excess, "+")]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def _mean_std(values: list[float], sign: str = "") -> str:
    mean, std = mean_std(values)
    return f"{mean:{sign}.3f} ± {std:.3f}"


def plot_by_position(results: dict[str, list[Tensor | str]], block_size: int, path: Path) -> None:
    """Loss vs position (mean over seeds, averaged over bins of 8 positions)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, runs in results.items():
        if isinstance(runs[0], str):
            continue
        curve = torch.stack(runs).mean(0)
        binned = curve[: len(curve) // 8 * 8].view(-1, 8).mean(1)
        ax.plot(torch.arange(len(binned)) * 8 + 4.5, binned, label=name, marker=".")
    ax.axvline(block_size + 0.5, color="grey", ls="--", lw=1)
    ax.text(block_size + 2, ax.get_ylim()[1], "training length", va="top", fontsize=8)
    ax.set_xlabel("position in the window")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("loss by position, mean over seeds (bins of 8)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="position_ablation")
    parser.add_argument("--sweep-dir", type=Path, help="default: the task's newest sweep")
    parser.add_argument("--log-dir", type=Path, default=Path("logs"))
    parser.add_argument("--factor", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    sweep_dir = args.sweep_dir or find_sweep(args.log_dir, args.task)
    groups = group_by_variant(load_sweep(sweep_dir))
    results = {
        name: [evaluate_job(job, args.factor) for job in jobs] for name, jobs in groups.items()
    }
    block_size = next(iter(groups.values()))[0].config.model.block_size
    table = length_table(results, block_size, args.factor)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "length_generalisation.md").write_text(
        f"Sweep: `{sweep_dir}`, evaluated at {args.factor} x block_size = "
        f"{args.factor * block_size} tokens\n\n{table}",
        encoding="utf-8",
    )
    plot_by_position(results, block_size, args.out_dir / "length_generalisation.png")
    print(table)


if __name__ == "__main__":
    main()
