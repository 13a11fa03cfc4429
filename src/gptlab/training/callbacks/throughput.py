"""Training throughput (tokens/s) and model FLOPs utilisation, against the device's peak."""

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

from gptlab.fileio import atomic_write_text
from gptlab.training.speed import data_parallel_size, is_logging_step

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
        tokens = x.numel() * data_parallel_size(trainer)
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
