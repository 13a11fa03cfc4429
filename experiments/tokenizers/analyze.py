"""Results of the tokenizer study (run.py): per tokenizer, bits per byte of the validation text
and loss per token, mean ± sd over seeds; Welch's tests of the differences README.md claims;
the curves.

    python -m experiments.tokenizers.analyze [--log-dir logs] [--steps 300]

Each run is scored as `gptlab-eval` scores it (`gptlab.cli.evaluate.score`), on the whole val
split of the data it trained on. Writes results.md (the tables) and curves.png (TensorBoard's
curves, mean over seeds, rendered with matplotlib so no browser is needed) next to this file,
and prints the tables.
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from experiments.launch import analysis_arguments
from experiments.tokenizers.run import STEPS, TASK
from gptlab.analysis import (
    SweepJob,
    claims_section,
    group_runs,
    load_runs,
    mean_std_text,
    unfinished_lines,
)
from gptlab.cli.evaluate import score, training_data_dir, val_stream
from gptlab.data.manifest import load_manifest
from gptlab.training.checkpoint import load_model

HERE = Path(__file__).resolve().parent
# README.md's claims, each "a has fewer bits per byte than b".
CLAIMS = {
    "unigram vs bpe": ("unigram", "bpe"),
    "wordpiece vs unigram": ("wordpiece", "unigram"),
    "bpe vs char": ("bpe", "char"),
}


@dataclass(frozen=True)
class Scores:
    """One run on the whole val split of its data."""

    bpb: float  # bits per byte of the text
    loss: float  # nats per token
    vocab: int
    bytes_per_token: float  # of the val split, with this tokenizer


def score_run(run: SweepJob) -> Scores:
    data_dir = Path(training_data_dir(run.checkpoint))
    manifest = load_manifest(data_dir)
    model, _ = load_model(run.checkpoint)
    result = score(model, *val_stream(data_dir)[:2])
    return Scores(
        bpb=result["bpb"],
        loss=result["loss"],
        vocab=manifest["vocab_size"],
        bytes_per_token=manifest["tokenizer_stats"]["bytes_per_token"]["val"],
    )


def runs_table(scores: dict[str, list[Scores]]) -> list[str]:
    lines = [
        "| tokenizer | vocab | val bytes/token | bits/byte | val loss (nats/token) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for kind, runs in scores.items():
        bpb = mean_std_text([s.bpb for s in runs])
        loss = mean_std_text([s.loss for s in runs])
        first = runs[0]  # the tokenizer, not the seed, sets these
        lines.append(f"| {kind} | {first.vocab} | {first.bytes_per_token:.2f} | {bpb} | {loss} |")
    return lines


def report(
    scores: dict[str, list[Scores]], unfinished: list[SweepJob], root: Path, steps: int
) -> str:
    claims = {
        name: ([s.bpb for s in scores.get(a, [])], [s.bpb for s in scores.get(b, [])])
        for name, (a, b) in CLAIMS.items()
    }
    lines = [
        f"# Tokenizers: results ({steps} steps, mean ± sd over seeds)",
        "",
        f"Runs under `{root}`, scored on the whole val split (`gptlab-eval`'s computation).",
        "",
        *runs_table(scores),
        "",
        *claims_section(claims, "a has fewer bits per byte than b"),
        *unfinished_lines(unfinished),
    ]
    return "\n".join(lines) + "\n"


def mean_curve(runs: list[SweepJob], tag: str) -> tuple[list[int], list[float]]:
    """The steps every run logged `tag` at, and its mean over the runs there."""
    curves = [dict(run.scalars[tag]) for run in runs]
    steps = sorted(set.intersection(*(set(curve) for curve in curves)))
    return steps, [statistics.fmean(curve[step] for curve in curves) for step in steps]


def plot(runs: dict[str, list[SweepJob]], scores: dict[str, list[Scores]], out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for kind, group in runs.items():
        first = scores[kind][0]
        label = f"{kind} ({first.vocab}, n={len(group)})"
        axes[0].plot(*mean_curve(group, "loss/train"), label=label, alpha=0.8)
        steps, val = mean_curve(group, "loss/val")
        axes[1].plot(steps, val, marker="o", label=label)
        # nats/token -> bits/byte with the val split's bytes per token (the validation windows
        # are a sample of that split, so this is close to, not exactly, gptlab-eval's number).
        bpb = [v / (math.log(2) * first.bytes_per_token) for v in val]
        axes[2].plot(steps, bpb, marker="o", label=label)
    titles = [
        "loss/train (nats per token)",
        "loss/val (nats per token): not comparable",
        "val bits per byte: comparable across tokenizers",
    ]
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(f"{title}, mean over seeds", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> None:
    args: argparse.Namespace = analysis_arguments(__doc__.splitlines()[0], STEPS, HERE, argv)
    root = args.log_dir / TASK
    runs = [r for r in load_runs(root) if r.overrides.get("trainer.max_steps") == str(args.steps)]
    finished = group_runs([r for r in runs if r.results is not None], ["tokenizer"])
    by_kind = {kind: group for (kind,), group in finished.items()}
    scores = {kind: [score_run(run) for run in group] for kind, group in by_kind.items()}
    text = report(scores, [r for r in runs if r.results is None], root, args.steps)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.md").write_text(text, encoding="utf-8")
    if by_kind:
        plot(by_kind, scores, args.out_dir / "curves.png")
    print(text)


if __name__ == "__main__":
    main()
