"""Attention diagnostics: per-layer attention entropy, attention-sink share and attention maps.

For a fixed prompt from the validation data, every N steps:

- `model/attention_entropy/layer_i`: mean entropy (nats) of the attention distributions. Uniform
  attention over t visible tokens has entropy log t; a head that looks at one token has 0.
- `model/attention_sink/layer_i`: mean attention mass on the first token. Trained LMs often park
  attention there when a head has nothing to do (Xiao et al. 2023, "attention sinks").
- `model/attention_map/layer_i`: one heat map per head (query rows, key columns).

Both scalars average over heads and over queries 1..T-1: query 0 can only attend to itself.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from gptlab.model import GPT, record_attention
from gptlab.training.callbacks.periodic import EveryNStepsCallback
from gptlab.training.tensorboard import tensorboard_writer


def attention_probs(model: GPT, idx: Tensor) -> list[Tensor]:
    """Each layer's attention probabilities (B, n_head, T, T) for token ids idx (B, T)."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), record_attention(model) as probs:
        model(idx)
    model.train(was_training)
    return probs


def attention_entropy(probs: Tensor) -> Tensor:
    """Entropy in nats of every attention row: (..., Tq, Tk) -> (..., Tq)."""
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


def summarize(probs: Tensor) -> dict[str, float]:
    """Mean entropy and first-token share of one layer's probs (B, nh, T, T), over batch, heads
    and queries 1..T-1."""
    rows = probs.float()[..., 1:, :]  # (B, nh, T-1, T)
    return {
        "entropy": attention_entropy(rows).mean().item(),
        "sink": rows[..., 0].mean().item(),
    }


def attention_figure(probs: Tensor, title: str) -> np.ndarray:
    """Heat maps of one layer's probs (nh, T, T), one panel per head, as an RGB (H, W, 3) array.

    Uses matplotlib's object API (no pyplot): no global figure state, safe in any thread.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_head = probs.size(0)
    cols = min(n_head, 4)
    rows = -(-n_head // cols)
    fig = Figure(figsize=(2.2 * cols, 2.2 * rows + 0.4), dpi=80)
    FigureCanvasAgg(fig)
    for h in range(n_head):
        ax = fig.add_subplot(rows, cols, h + 1)
        # Square root: lifts the small weights into view beside the peaks.
        ax.imshow(probs[h].float().sqrt().cpu().numpy(), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"head {h}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title} (sqrt of attention weight; rows: queries)", fontsize=9)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


class AttentionDiagnosticsCallback(EveryNStepsCallback):
    """Logs attention entropy, sink share and maps per layer to TensorBoard (rank 0 only), at
    the start of training, every `every_n_steps` and at the end.

    The prompt is the first `prompt_tokens` tokens of the first validation window, the same for
    every run on the same data, so runs and variants can be compared. `last` holds the newest
    scalars: {"entropy": [per layer], "sink": [per layer], "step": step}.
    """

    def __init__(
        self, every_n_steps: int = 250, prompt_tokens: int = 64, images: bool = True
    ) -> None:
        super().__init__(every_n_steps)
        if prompt_tokens < 2:
            raise ValueError(
                f"AttentionDiagnosticsCallback.prompt_tokens={prompt_tokens} must be >= 2"
            )
        if images:
            try:
                import matplotlib  # noqa: F401
            except ImportError as err:
                raise ImportError(
                    "attention maps need matplotlib: pip install 'gptlab[plots]', or set "
                    "callbacks.attention_diagnostics.images=false"
                ) from err
        self.prompt_tokens = prompt_tokens
        self.images = images
        self.last: dict[str, Any] = {}
        self._prompt: Tensor | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.act(trainer, pl_module)

    def prompt(self, trainer: L.Trainer) -> Tensor:
        """The fixed prompt (1, T): the start of the first validation window."""
        if self._prompt is None:
            if trainer.datamodule is None:
                raise RuntimeError(
                    "AttentionDiagnosticsCallback takes its prompt from the validation data: "
                    "pass a datamodule to trainer.fit"
                )
            x, _ = next(iter(trainer.datamodule.val_dataloader()))
            self._prompt = x[:1, : self.prompt_tokens]
        return self._prompt

    @rank_zero_only
    def on_scheduled_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        idx = self.prompt(trainer).to(pl_module.device)
        probs = attention_probs(pl_module.model, idx)
        stats = [summarize(p) for p in probs]
        step = trainer.global_step
        self.last = {
            "entropy": [s["entropy"] for s in stats],
            "sink": [s["sink"] for s in stats],
            "step": step,
        }
        writer = tensorboard_writer(trainer)
        if writer is None:
            return
        for i, (s, p) in enumerate(zip(stats, probs, strict=True)):
            writer.add_scalar(f"model/attention_entropy/layer_{i}", s["entropy"], step)
            writer.add_scalar(f"model/attention_sink/layer_{i}", s["sink"], step)
            if self.images:
                image = attention_figure(p[0], f"layer {i}, step {step}")
                writer.add_image(f"model/attention_map/layer_{i}", image, step, dataformats="HWC")
