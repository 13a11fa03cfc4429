"""Training callbacks: throughput and MFU, and text samples logged to TensorBoard."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.strategies import FSDPStrategy
from tokenizers import Tokenizer

from gptlab.fileio import atomic_write_text
from gptlab.model import GPT
from gptlab.training.checkpoint import gpt_weights
from gptlab.training.speed import is_logging_step

log = logging.getLogger(__name__)

PEAK_FILE = "matmul_peak.json"  # measured CPU peaks, in the user's cache directory


def precision_dtype(precision: str) -> torch.dtype:
    """The dtype a Lightning precision setting ("32-true", "bf16-mixed", "16-mixed", ...) runs
    its matmuls in: the one whose peak MFU is measured against."""
    if "bf16" in precision:
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float64 if precision.startswith("64") else torch.float32


def measure_matmul_flops(
    device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 7
) -> float:
    """Achieved FLOP/s of a large square matmul, the best of `repeats` short timings: the
    practical peak where no spec sheet applies. A busy machine slows some timings, not the
    best one, unless it is busy throughout. The default size (1024 on CPUs, 8192 on GPUs) is
    large enough to reach the device's peak."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up: thread pool, kernel selection
    best = 0.0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        reps, start = 0, time.perf_counter()
        while reps < 2 or time.perf_counter() - start < 0.05:
            a @ b
            reps += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 2 * size**3 * reps / (time.perf_counter() - start))
    return best


def peak_cache_path() -> Path:
    """$GPTLAB_CACHE_DIR, else $XDG_CACHE_HOME/gptlab, else ~/.cache/gptlab; then PEAK_FILE."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get("GPTLAB_CACHE_DIR") or Path(cache) / "gptlab") / PEAK_FILE


def cpu_name() -> str:
    """The processor's model name (Linux), else what `platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _peak_key(dtype: torch.dtype) -> str:
    """What a measured CPU peak depends on: the processor, the threads, the dtype and torch."""
    threads = torch.get_num_threads()
    return f"{cpu_name()} | {threads} threads | {dtype} | torch {torch.__version__}"


def _cached_peaks() -> dict[str, float]:
    with contextlib.suppress(OSError, ValueError):
        return {k: float(v) for k, v in json.loads(peak_cache_path().read_text()).items()}
    return {}


def measured_cpu_peak(dtype: torch.dtype, remeasure: bool = False) -> float:
    """The CPU's matmul peak for this thread count and dtype. Measured once per machine and kept
    in the user's cache (a measurement costs about half a second of start-up); each new
    measurement can only raise the kept value, since the peak is the best the machine did."""
    peaks, key = _cached_peaks(), _peak_key(dtype)
    if key in peaks and not remeasure:
        return peaks[key]
    peaks[key] = max(peaks.get(key, 0.0), measure_matmul_flops(torch.device("cpu"), dtype))
    with contextlib.suppress(OSError):  # a read-only home costs a re-measurement, nothing else
        peak_cache_path().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(peak_cache_path(), json.dumps(peaks, indent=1, sort_keys=True))
    return peaks[key]


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """The device's peak FLOP/s in `dtype` and where the number came from (spec or measured)."""
    spec = get_available_flops(device, dtype) if device.type == "cuda" else None
    if spec:
        return float(spec), f"spec sheet, {dtype}"
    if device.type == "cpu":
        return measured_cpu_peak(dtype), f"measured matmul, {dtype}, cached in {peak_cache_path()}"
    return measure_matmul_flops(device, dtype), f"measured matmul, {dtype}"


class ThroughputCallback(L.Callback):
    """Logs training tokens/s and model FLOPs utilisation (MFU) over a moving window of steps.

    MFU = achieved model FLOP/s / the device's peak in the precision that runs (bf16 or fp16
    tensor cores for the mixed precisions). The model FLOPs are `GPT.flops_per_token` at each
    batch's real length (padded or packed finetuning batches are shorter than block_size), with
    no weight gradients for frozen weights. On CPUs the peak is a measured matmul. Should the
    training ever beat the peak, the peak was measured too low (on a busy machine): it is
    measured again, and if training still beats it, raised to the achieved rate with a warning,
    so MFU never reads above 100%.
    """

    def __init__(self, window: int = 20, peak_flops_per_device: float | None = None) -> None:
        self.window = window
        self.peak = peak_flops_per_device
        self.summary: dict[str, float] = {}
        self._steps: list[tuple[float, int, float]] = []  # (seconds, tokens, FLOPs) per batch
        self._batch: tuple[int, float] = (0, 0.0)
        self._flops_per_token: tuple[float, float] = (0.0, 0.0)  # a + b * seq_len
        self._dtype: torch.dtype | None = None  # set while a measured CPU peak may be re-measured
        self._warned = False
        self._last: float | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before any strategy wraps the model: FSDP would leave each rank a shard to count.
        # FLOPs per token are linear in the sequence length; keep the line.
        base = pl_module.model.flops_per_token(seq_len=0)
        self._flops_per_token = (base, pl_module.model.flops_per_token(seq_len=1) - base)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.peak is None:
            dtype = precision_dtype(str(trainer.precision))
            self.peak, source = peak_flops(pl_module.device, dtype)
            if pl_module.device.type == "cpu":
                self._dtype = dtype
            log.info("MFU peak: %.3g FLOP/s per device (%s)", self.peak, source)

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        x = batch[0]  # (inputs, targets), or (inputs, targets, segments) when packed
        base, per_position = self._flops_per_token
        tokens = x.numel() * trainer.world_size
        self._batch = (tokens, tokens * (base + per_position * x.size(-1)))
        if self._last is None:
            self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        self._steps = (self._steps + [(now - self._last, *self._batch)])[-self.window :]
        self._last = now
        if len(self._steps) < self.window // 2:
            return  # the first steps include warm-up and would understate throughput
        seconds, tokens, flops = (sum(column) for column in zip(*self._steps, strict=True))
        achieved = flops / seconds / trainer.world_size  # model FLOP/s per device
        if achieved > self.peak:
            self._raise_peak(achieved)
        self.summary = {"tokens_per_sec": tokens / seconds, "mfu": achieved / self.peak}
        if is_logging_step(trainer, trainer.global_step):
            pl_module.log("perf/tokens_per_sec", self.summary["tokens_per_sec"])
            pl_module.log("perf/mfu", self.summary["mfu"])

    def _raise_peak(self, achieved: float) -> None:
        if self._dtype is not None:  # a measured CPU peak: measure again, once
            self.peak = max(self.peak, measured_cpu_peak(self._dtype, remeasure=True))
            self._dtype = None
        if achieved > self.peak:
            if not self._warned:
                log.warning(
                    "training ran at %.3g FLOP/s per device, above the measured peak %.3g FLOP/s:"
                    " the peak was measured too low (a busy machine?), so MFU is reported "
                    "against the achieved rate from here on",
                    achieved,
                    self.peak,
                )
                self._warned = True
            self.peak = achieved

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
