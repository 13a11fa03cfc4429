"""Training callbacks: throughput and MFU, and text samples logged to TensorBoard."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.strategies import FSDPStrategy
from tokenizers import Tokenizer

from gptlab.model import GPT
from gptlab.training.checkpoint import gpt_weights
from gptlab.training.scale import is_logging_step

log = logging.getLogger(__name__)


def measure_matmul_flops(
    device: torch.device, dtype: torch.dtype, size: int | None = None
) -> float:
    """Achieved FLOP/s of a large square matmul: the practical peak where no spec sheet applies.
    The default size (1024 on CPUs, 8192 on GPUs) is large enough to reach the device's peak."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.5:
        a @ b
        reps += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * size**3 * reps / (time.perf_counter() - start)


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """The device's peak FLOP/s and where the number came from (spec sheet or measured)."""
    spec = get_available_flops(device, dtype) if device.type == "cuda" else None
    if spec:
        return float(spec), "spec"
    return measure_matmul_flops(device, dtype), "measured matmul"


class ThroughputCallback(L.Callback):
    """Logs training tokens/s and model FLOPs utilisation (MFU) over a moving window of steps.

    MFU = achieved model FLOP/s (6N + attention, from `GPT.flops_per_token`) / the device's peak.
    On CPUs the peak is measured once with a large matmul in the training dtype.
    """

    def __init__(self, window: int = 20, peak_flops_per_device: float | None = None) -> None:
        self.window = window
        self.peak = peak_flops_per_device
        self.summary: dict[str, float] = {}
        self._step_times: list[float] = []
        self._tokens_per_batch = 0
        self._flops_per_token = 0.0
        self._last: float | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before any strategy wraps the model: FSDP would leave each rank a shard to count.
        self._flops_per_token = pl_module.model.flops_per_token()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.peak is None:
            dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else torch.float32
            self.peak, source = peak_flops(pl_module.device, dtype)
            log.info("MFU peak: %.3g FLOP/s per device (%s)", self.peak, source)

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        x = batch[0]  # (inputs, targets), or (inputs, targets, segments) when packed
        self._tokens_per_batch = x.numel() * trainer.world_size
        if self._last is None:
            self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        self._step_times = (self._step_times + [now - self._last])[-self.window :]
        self._last = now
        if len(self._step_times) < self.window // 2:
            return  # the first steps include warm-up and would understate throughput
        seconds = sum(self._step_times) / len(self._step_times)
        tokens_per_sec = self._tokens_per_batch / seconds
        mfu = tokens_per_sec * self._flops_per_token / (self.peak * trainer.world_size)
        self.summary = {"tokens_per_sec": tokens_per_sec, "mfu": mfu}
        if is_logging_step(trainer, trainer.global_step):
            pl_module.log("perf/tokens_per_sec", tokens_per_sec)
            pl_module.log("perf/mfu", mfu)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._last = None  # validation time is not training time


class SampleGenerationCallback(L.Callback):
    """Every `every_n_steps` (and at the end of training) generates text from fixed prompts and
    logs it to TensorBoard's Text tab; rank 0 only."""

    def __init__(
        self,
        prompts: list[str],
        every_n_steps: int = 500,
        max_new_tokens: int = 64,
        temperature: float = 0.8,
        top_k: int | None = 50,
        top_p: float | None = None,
        seed: int = 0,
        stop_at: str | None = None,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"SampleGenerationCallback.every_n_steps={every_n_steps} must be >= 1")
        self.prompts = list(prompts)
        self.every_n_steps = every_n_steps
        self.max_new_tokens = max_new_tokens
        self.sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        self.seed = seed
        self.stop_at = stop_at  # a token that ends a sample, e.g. the end-of-text token
        self.last_samples: list[str] = []
        self._sampled_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # With gradient accumulation several micro-batches end at the same global step.
        step = trainer.global_step
        if step % self.every_n_steps == 0 and step > 0 and step != self._sampled_step:
            self.log_samples(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._sampled_step:
            self.log_samples(trainer, pl_module)

    def log_samples(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sampled_step = trainer.global_step
        if pl_module.tokenizer_json is None:
            return
        model = self.whole_model(trainer, pl_module)  # every rank joins (FSDP gathers weights)
        if not trainer.is_global_zero:
            return
        tokenizer = Tokenizer.from_str(pl_module.tokenizer_json)
        self.last_samples = [
            self.complete(model, tokenizer, ids) for ids in self.prompt_ids(tokenizer)
        ]
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            for i, text in enumerate(self.last_samples):
                # Markdown code block keeps the generated whitespace readable in TensorBoard.
                experiment.add_text(f"samples/{i}", f"```\n{text}\n```", trainer.global_step)

    @staticmethod
    def whole_model(trainer: L.Trainer, pl_module: L.LightningModule) -> GPT:
        """The GPT to sample from. FSDP leaves each rank a shard of the weights, so the full
        weights are gathered (a collective every rank must join) into a plain copy on rank 0."""
        if not isinstance(trainer.strategy, FSDPStrategy):
            return pl_module.model
        state = trainer.strategy.lightning_module_state_dict()  # full on rank 0, empty elsewhere
        if not trainer.is_global_zero:
            return pl_module.model
        model = GPT(pl_module.config)
        model.load_state_dict(gpt_weights(state))
        return model.to(pl_module.device)

    def prompt_ids(self, tokenizer: Tokenizer) -> list[list[int]]:
        """The token ids of each prompt (an empty prompt starts from token 0)."""
        return [tokenizer.encode(prompt).ids or [0] for prompt in self.prompts]

    def complete(self, model: GPT, tokenizer: Tokenizer, ids: list[int]) -> str:
        device = model.wte.weight.device
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        generator = torch.Generator(device=device).manual_seed(self.seed)
        was_training = model.training
        model.eval()
        eos_id = tokenizer.token_to_id(self.stop_at) if self.stop_at else None
        # A compiled forward would recompile for every new sequence length; decode eagerly.
        with torch.compiler.set_stance("force_eager"):
            out = model.generate(
                idx, self.max_new_tokens, eos_id=eos_id, generator=generator, **self.sampling
            )
        model.train(was_training)
        return tokenizer.decode(out[0].tolist())
