"""The muP coordinate check (Yang et al., Tensor Programs V, figure 5): how far each layer's
activations move in the first AdamW steps, across widths, under SP and under muP.

    python experiments/mup/coord_check.py                       # writes the plot and the table
    python experiments/mup/coord_check.py --widths 64 128 256 --out /tmp/cc

A 2-layer GPT (4 heads, vocabulary 256, 32-token context) at each width from 64 to 1024, base
width 64, trained 3 steps at lr 3e-3 on one fixed batch of one row (32 tokens, below the
narrowest width), averaged over 5 seeds; `gptlab.analysis.coordinate_check` does the
measuring. Three models: SP and muP with gptlab's default tied head, and muP with an untied
head initialised at zero (`model.readout_zero_init`, as Tensor Programs V advises), which
removes the logits' finite-width term that the tied head's random init adds. Flat lines mean
that a step moves the model the same amount at every width, which is what lets a learning rate
tuned at the base width transfer.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gptlab.analysis import coordinate_check
from gptlab.model import GPTConfig

HERE = Path(__file__).parent


# The models compared: name -> (parametrization, zero-initialised untied head).
MODELS = {"sp": ("sp", False), "mup": ("mup", False), "mup, zero head": ("mup", True)}


def run(args: argparse.Namespace) -> dict[str, dict]:
    results = {}
    for name, (parametrization, zero_head) in MODELS.items():
        config = GPTConfig(
            vocab_size=256,
            block_size=32,
            n_layer=2,
            n_head=4,
            n_embd=args.widths[0],
            tie_weights=not zero_head,
            readout_zero_init=zero_head,
            parametrization=parametrization,
            mup_base_width=args.widths[0],
        )
        results[name] = coordinate_check(
            config, args.widths, args.steps, args.lr, args.batch_size, args.seeds
        )
    return results


def table(results: dict[str, dict], widths: list[int]) -> str:
    lines = [
        "| parametrization | layer | " + " | ".join(f"width {w}" for w in widths) + " | spread |",
        "| --- | --- | " + " | ".join("---" for _ in widths) + " | --- |",
    ]
    for parametrization, by_width in results.items():
        for layer in by_width[widths[0]]:
            values = [by_width[w][layer] for w in widths]
            cells = " | ".join(f"{v:.4f}" for v in values)
            spread = max(values) / min(values)
            lines.append(f"| {parametrization} | {layer} | {cells} | {spread:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict], widths: list[int], steps: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), sharey=True)
    for ax, (parametrization, by_width) in zip(axes, results.items(), strict=True):
        for layer in by_width[widths[0]]:
            ax.plot(widths, [by_width[w][layer] for w in widths], marker="o", label=layer)
        ax.set(xscale="log", yscale="log", xlabel="width (n_embd)", title=parametrization)
        ax.set_xticks(widths, [str(w) for w in widths])
    axes[0].set_ylabel(f"mean |x_{steps} - x_0| after {steps} AdamW steps")
    axes[-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=1, help="rows of 32 tokens")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(results, args.widths)
    (args.out / "coord_check.md").write_text(text)
    plot(results, args.widths, args.steps, args.out / "coord_check.png")
    print(text)


if __name__ == "__main__":
    main()
