"""LitGPT: the GPT wrapped with its loss, optimizer and LR schedule.

Hyperparameters are plain dicts (model, optimizer, scheduler), so a checkpoint rebuilds the model
without Hydra: `LitGPT.load_from_checkpoint(path)`. The tokenizer travels inside the checkpoint
as its JSON text, so a checkpoint alone is enough to generate text. Checkpoints also carry every
rank's RNG states for an exact resume (see `gptlab.training.checkpoint`).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torchmetrics import MeanMetric

from gptlab.config import dataclass_from_dict
from gptlab.model import GPT, GPTConfig
from gptlab.training.checkpoint import (
    RNG_KEY,
    TOKENIZER_KEY,
    check_architecture,
    check_same_finetuning,
    gather_rng_states,
    restore_rng_state,
    rng_state_of_rank,
    saved_model_config,
)
from gptlab.training.optim import (
    OptimizerConfig,
    SchedulerConfig,
    build_optimizer,
    build_scheduler,
)
from gptlab.training.parallel import clip_grad_norm, parallelize_gpt
from gptlab.training.speed import (
    check_optimizer_strategy,
    check_switches,
    is_logging_step,
    speed_up_model,
)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting targets[b, t] from logits[b, t]; computed in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


class LitGPT(L.LightningModule):
    def __init__(
        self,
        model: dict[str, Any],
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        compile: bool = False,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        check_switches(compile=compile, activation_checkpointing=activation_checkpointing)
        self.save_hyperparameters()
        self.config = GPTConfig.from_dict(dict(model))
        self.optimizer_config = dataclass_from_dict(
            OptimizerConfig, dict(optimizer or {}), "optimizer"
        )
        self.scheduler_config = dataclass_from_dict(
            SchedulerConfig, dict(scheduler or {}), "scheduler"
        )
        self.model = GPT(self.config)
        self.val_loss = MeanMetric()
        self.tokenizer_json: str | None = None
        self.validated_at_step: int | None = None
        self._rng_to_restore: dict[str, Any] | None = None
        self._sped_up = False

    def configure_model(self) -> None:
        # Lightning calls this before wrapping the model in a strategy (DDP, FSDP) and again on
        # later fit/validate calls, so apply the options once. Under FSDP the strategy
        # checkpoints the blocks itself (inside each FSDP unit; see training/speed.py).
        if self._sped_up:
            return
        self._sped_up = True
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, ModelParallelStrategy):  # FSDP2 / tensor parallel
            parallelize_gpt(
                self.model,
                strategy.device_mesh,
                str(self._trainer.precision),
                compile=self.hparams.compile,
                activation_checkpointing=self.hparams.activation_checkpointing,
            )
            return
        under_fsdp = self._trainer is not None and isinstance(self._trainer.strategy, FSDPStrategy)
        speed_up_model(
            self.model,
            compile=self.hparams.compile,
            activation_checkpointing=self.hparams.activation_checkpointing and not under_fsdp,
        )

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        loss = next_token_loss(self.model(x), y)
        # Only on the steps the loggers write (each log call has a fixed cost); the progress
        # bar shows the latest of them.
        if is_logging_step(self.trainer, self.global_step + 1):
            self.log("loss/train", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        # Weight by token count so loss/val is the exact mean over all validation tokens.
        self.val_loss.update(next_token_loss(self.model(x), y), weight=y.numel())

    def on_validation_end(self) -> None:
        # The final report says which step its validation metrics belong to.
        if not self.trainer.sanity_checking:
            self.validated_at_step = self.trainer.global_step

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("loss/val", loss, prog_bar=True, sync_dist=False)
        self.log("loss/val_ppl", torch.exp(loss), sync_dist=False)

    def configure_optimizers(self) -> dict[str, Any]:
        check_optimizer_strategy(self.optimizer_config.name, self.trainer.strategy)
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        optimizer = build_optimizer(self.model, self.optimizer_config, scaler is not None)
        scheduler = build_scheduler(optimizer, self.scheduler_config)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # Under mixed precision Lightning refuses to clip for a fused optimizer, for fear of a
        # GradScaler whose gradients are still scaled. bf16 has no scaler (and 16-mixed gets no
        # fused optimizer, see configure_optimizers): the gradients are true, clip them here.
        if gradient_clip_val and isinstance(self.trainer.strategy, ModelParallelStrategy):
            clip_grad_norm(self.model.parameters(), gradient_clip_val)  # DTensors of two meshes
            return
        plugin = self.trainer.precision_plugin
        if (
            isinstance(plugin, MixedPrecision)
            and plugin.scaler is None
            and gradient_clip_val
            and gradient_clip_algorithm in (None, "norm")
        ):
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.tokenizer_json is not None:
            checkpoint[TOKENIZER_KEY] = self.tokenizer_json
        checkpoint[RNG_KEY] = gather_rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Runs before Lightning loads the weights, so a different model fails with a message.
        resuming = self._trainer is not None  # not LitGPT.load_from_checkpoint
        source = f"checkpoint {self._trainer.ckpt_path}" if resuming else "the checkpoint"
        saved = saved_model_config(checkpoint, source)
        remedy = (
            "a checkpoint resumes only the model it holds; set these back, or start a new run "
            "without ckpt_path"
        )
        check_architecture(self.config, saved, source, remedy)
        self.tokenizer_json = checkpoint.get(TOKENIZER_KEY)
        if resuming:
            saved_finetune = checkpoint["hyper_parameters"].get("finetune")
            check_same_finetuning(saved_finetune, self.hparams.get("finetune"), source)
            self._rng_to_restore = rng_state_of_rank(checkpoint.get(RNG_KEY), self.global_rank)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # After the last optimizer step, asking the Trainer to stop makes it validate at once
        # (unless this step was a validation step anyway), and ModelCheckpoint saves last.ckpt
        # after every validation: so the final weights are validated and saved whatever
        # trainer.val_check_interval is, and resuming from last.ckpt trains nothing more.
        if self.trainer.max_steps > 0 and self.global_step >= self.trainer.max_steps:
            self.trainer.should_stop = True

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # The RNGs are restored just before the first step after a resume, not at load time:
        # the setup in between (callbacks' on_train_start, loader iterators) may draw random
        # numbers, which the uninterrupted run drew before it wrote the checkpoint.
        if self._rng_to_restore is not None:
            restore_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
