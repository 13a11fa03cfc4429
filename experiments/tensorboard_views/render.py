"""What TensorBoard shows for one run, written to files: no browser needed.

    python experiments/tensorboard_views/render.py logs/train/runs/<run> <out dir>

From the run's event files it writes
  curves.png             the Scalars tab: loss/train and loss/val, and the attention diagnostics
                         (entropy and first-token share per layer) when the run logged them;
  attention_layer_i.png  the Images tab: the last attention map of each layer, as logged;
  samples.md             the Text tab: the last generated sample of each prompt.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import matplotlib
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

EVERYTHING = {"scalars": 0, "images": 0, "tensors": 0}  # 0: keep every event, not a sample


def series(events: EventAccumulator, tag: str) -> tuple[list[int], list[float]]:
    points = events.Scalars(tag)
    return [p.step for p in points], [p.value for p in points]


def layer_tags(tags: list[str], prefix: str) -> list[str]:
    """`prefix`layer_0, layer_1, ... in layer order."""
    found = [t for t in tags if t.startswith(prefix)]
    return sorted(found, key=lambda t: int(re.search(r"(\d+)$", t).group(1)))


def plot_curves(events: EventAccumulator, out: Path) -> None:
    scalars = events.Tags()["scalars"]
    panels = [("loss (nats/token)", [t for t in ("loss/train", "loss/val") if t in scalars])]
    for name, prefix in (("attention entropy (nats)", "model/attention_entropy/"),
                         ("attention on the first token", "model/attention_sink/")):  # fmt: skip
        if layer_tags(scalars, prefix):
            panels.append((name, layer_tags(scalars, prefix)))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, tags) in zip(axes[0], panels, strict=True):
        for tag in tags:
            steps, values = series(events, tag)
            label = tag if tag.endswith("loss") else tag.rsplit("/", 1)[-1]  # layer_i
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, label=label)
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def write_attention_maps(events: EventAccumulator, out_dir: Path) -> list[Path]:
    written = []
    for tag in layer_tags(events.Tags()["images"], "model/attention_map/"):
        last = events.Images(tag)[-1]  # TensorBoard keeps the PNG bytes it was given
        path = out_dir / f"attention_{tag.rsplit('/', 1)[-1]}.png"
        path.write_bytes(last.encoded_image_string)
        written.append(path)
    return written


def write_samples(events: EventAccumulator, out: Path) -> int:
    tags = sorted(t for t in events.Tags()["tensors"] if t.startswith("samples/"))
    if not tags:
        return 0
    parts = []
    for tag in tags:
        last = events.Tensors(tag)[-1]
        text = tensor_util.make_ndarray(last.tensor_proto).item().decode()
        parts.append(f"### {tag.removesuffix('/text_summary')} (step {last.step})\n\n{text}\n")
    out.write_text("\n".join(parts), encoding="utf-8")
    return len(tags)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a gptlab-train run folder")
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    events = EventAccumulator(str(args.run_dir / "tensorboard"), size_guidance=EVERYTHING)
    events.Reload()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    plot_curves(events, args.out_dir / "curves.png")
    maps = write_attention_maps(events, args.out_dir)
    samples = write_samples(events, args.out_dir / "samples.md")
    print(f"wrote curves.png, {len(maps)} attention maps and {samples} samples to {args.out_dir}")


if __name__ == "__main__":
    main()
