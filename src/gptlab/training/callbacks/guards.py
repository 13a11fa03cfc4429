"""Guards against a run going wrong silently: non-finite losses or gradients, loss spikes."""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import Any

import lightning as L
import torch

from gptlab.errors import TrainingDivergedError
from gptlab.training.parallel import global_norm
from gptlab.training.speed import is_logging_step

log = logging.getLogger(__name__)


def grad_norm(optimizer: torch.optim.Optimizer) -> float:
    """The L2 norm of all gradients the optimizer would apply (0.0 when there are none)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
    return float(global_norm(grad for grad in grads if grad is not None))


class NonFiniteGuard(L.Callback):
    """Skips every optimizer step whose loss or gradient norm is not finite, and stops the run
    after `max_consecutive` such steps in a row. Optionally reports loss spikes.

    The decision is reduced over all ranks (one bad rank makes every rank skip), so DDP replicas
    never drift apart. A skipped step drops the gradients before the optimizer sees them: the
    weights and optimizer state stay as they were, while the LR schedule and the data stream move
    on, so a bad batch is not retried. Because bad steps never change the weights, a checkpoint
    written during a bad streak still holds the last good weights, and the run stops with an
    error that points at the last checkpoint.

    Under fp16 mixed precision the GradScaler already skips steps with overflowing gradients
    (that is how it calibrates its scale), so there only the loss is checked.

    A loss spike is a finite loss above `spike_factor` x the mean loss of the previous
    `spike_window` steps (checked once that many are in); it is logged as a warning and counted
    in the `stability/loss_spikes` metric. `spike_factor=None` turns spike detection off.
    """

    def __init__(
        self, max_consecutive: int = 5, spike_factor: float | None = None, spike_window: int = 100
    ) -> None:
        if max_consecutive < 1:
            raise ValueError(f"NonFiniteGuard.max_consecutive={max_consecutive} must be >= 1")
        if spike_factor is not None and not spike_factor > 1:
            raise ValueError(f"NonFiniteGuard.spike_factor={spike_factor} must be > 1 or null")
        if spike_window < 1:
            raise ValueError(f"NonFiniteGuard.spike_window={spike_window} must be >= 1")
        self.max_consecutive = max_consecutive
        self.spike_factor = spike_factor
        self.bad_streak = 0
        self.skipped = 0
        self.spikes = 0
        self.recent_losses: deque[float] = deque(maxlen=spike_window)
        self._step_loss: torch.Tensor | float = 0.0

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        # Once per micro-batch, with the loss divided by the accumulation count: the sum is the
        # loss of the whole step. Kept as a tensor: no device sync until the step ends.
        self._step_loss = self._step_loss + loss.detach().float()

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        loss, self._step_loss = float(self._step_loss), 0.0
        scaler_handles_grads = getattr(trainer.precision_plugin, "scaler", None) is not None
        norm = grad_norm(optimizer)
        bad_here = not math.isfinite(loss) or not (scaler_handles_grads or math.isfinite(norm))
        if trainer.strategy.reduce_boolean_decision(bad_here, all=False):
            self._skip(trainer, optimizer, f"loss {loss:g}, gradient norm {norm:g}")
        else:
            self.bad_streak = 0
            self._check_spike(trainer, loss)
        if is_logging_step(trainer, trainer.global_step + 1):  # the step about to be taken
            pl_module.log("stability/skipped_steps", float(self.skipped))
            if self.spike_factor is not None:
                pl_module.log("stability/loss_spikes", float(self.spikes))

    def _skip(self, trainer: L.Trainer, optimizer: torch.optim.Optimizer, what: str) -> None:
        optimizer.zero_grad(set_to_none=True)
        self.bad_streak += 1
        self.skipped += 1
        log.warning(
            "step %d: non-finite loss or gradient norm on some rank (here: %s); optimizer step "
            "skipped (%d of at most %d in a row)",
            trainer.global_step,
            what,
            self.bad_streak,
            self.max_consecutive,
        )
        if self.bad_streak >= self.max_consecutive:
            raise TrainingDivergedError(self._stop_message(trainer, what))

    def _stop_message(self, trainer: L.Trainer, what: str) -> str:
        checkpoint = getattr(trainer.checkpoint_callback, "last_model_path", "") or None
        kept = f"the last checkpoint, {checkpoint}, holds" if checkpoint else "no checkpoint holds"
        return (
            f"stopping at step {trainer.global_step}: {self.bad_streak} steps in a row had a "
            f"non-finite loss or gradient norm (last one here: {what}). Skipped steps never "
            f"change the weights: {kept} the last good ones. Try a lower optimizer.lr, a longer "
            "warmup or a wider precision, then resume with ckpt_path"
        )

    def _check_spike(self, trainer: L.Trainer, loss: float) -> None:
        window = self.recent_losses
        if self.spike_factor is not None and len(window) == window.maxlen:
            mean = sum(window) / len(window)
            if loss > self.spike_factor * mean:
                self.spikes += 1
                log.warning(
                    "step %d: loss spike: %.4f is %.1fx the mean %.4f of the last %d steps",
                    trainer.global_step,
                    loss,
                    loss / mean,
                    mean,
                    len(window),
                )
        window.append(loss)

    def state_dict(self) -> dict[str, Any]:
        return {
            "bad_streak": self.bad_streak,
            "skipped": self.skipped,
            "spikes": self.spikes,
            "recent_losses": list(self.recent_losses),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.bad_streak = state_dict["bad_streak"]
        self.skipped = state_dict["skipped"]
        self.spikes = state_dict["spikes"]
        self.recent_losses.clear()
        self.recent_losses.extend(state_dict["recent_losses"])
