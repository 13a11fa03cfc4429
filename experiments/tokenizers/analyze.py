"""Tokenizer study: curves from TensorBoard's event files and bits per byte of each run.

    python experiments/tokenizers/analyze.py logs/train/multiruns/<date>

Writes curves.png (TensorBoard's scalars rendered with matplotlib, so no browser is needed) and
prints a Markdown table: per run, the tokenizer, its bytes per token, and gptlab-eval's loss,
perplexity and bits per byte on the whole val split.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

from gptlab.analysis import read_scalars
from gptlab.cli.evaluate import score, training_data_dir, val_stream
from gptlab.training.checkpoint import load_model

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


def load_run(run_dir: Path) -> dict:
    data_dir = Path(training_data_dir(run_dir / "checkpoints" / "last.ckpt"))
    manifest = json.loads((data_dir / "manifest.json").read_text())
    logged = read_scalars(run_dir / "tensorboard")
    scalars = {tag: list(zip(*logged[tag], strict=True)) for tag in ("loss/train", "loss/val")}
    return {
        "dir": run_dir,
        "tokenizer": manifest["tokenizer"]["kind"],
        "vocab": manifest["vocab_size"],
        "data_dir": data_dir,
        "bytes_per_token": manifest["tokenizer_stats"]["bytes_per_token"]["val"],
        "scalars": scalars,
    }


def plot(runs: list[dict], out: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for run in runs:
        label = f"{run['tokenizer']} ({run['vocab']})"
        steps, train = run["scalars"]["loss/train"]
        axes[0].plot(steps, train, label=label, alpha=0.8)
        steps, val = run["scalars"]["loss/val"]
        axes[1].plot(steps, val, marker="o", label=label)
        # nats/token -> bits/byte with the val split's bytes per token (the validation windows
        # are a sample of that split, so this is close to, not exactly, gptlab-eval's number).
        bpb = [v / (math.log(2) * run["bytes_per_token"]) for v in val]
        axes[2].plot(steps, bpb, marker="o", label=label)
    titles = [
        "loss/train (nats per token)",
        "loss/val (nats per token): not comparable",
        "val bits per byte: comparable across tokenizers",
    ]
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def table(runs: list[dict]) -> str:
    lines = [
        "| tokenizer | vocab | val bytes/token | val loss (nats/token) | perplexity | bits/byte |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        model, _ = load_model(run["dir"] / "checkpoints" / "last.ckpt")
        stream, num_bytes, _ = val_stream(run["data_dir"])
        result = score(model, stream, num_bytes)
        lines.append(
            f"| {run['tokenizer']} | {run['vocab']} | {run['bytes_per_token']:.2f} | "
            f"{result['loss']:.3f} | {result['ppl']:.1f} | {result['bpb']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("multirun", type=Path, help="a gptlab-train -m sweep folder")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    run_dirs = sorted(p.parent for p in args.multirun.glob("*/tensorboard"))
    runs = [load_run(run_dir) for run_dir in run_dirs]
    plot(runs, args.out / "curves.png")
    print(table(runs))


if __name__ == "__main__":
    main()
