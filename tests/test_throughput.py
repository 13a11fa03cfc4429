"""ThroughputCallback: MFU against the peak of the precision that runs, at each batch's real
shape, and never above 100% when the CPU peak was measured too low."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch

from gptlab.model import GPT
from gptlab.training.callbacks import throughput
from gptlab.training.callbacks.throughput import (
    ThroughputCallback,
    measured_cpu_peak,
    precision_dtype,
)
from tests.kit import tiny_config


@pytest.mark.parametrize(
    "precision,dtype",
    [
        ("32-true", torch.float32),
        ("32", torch.float32),
        ("bf16-mixed", torch.bfloat16),
        ("bf16-true", torch.bfloat16),
        ("16-mixed", torch.float16),  # measured against fp32 before: ~15x too much on a GPU
        ("16-true", torch.float16),
        ("64-true", torch.float64),
    ],
)
def test_mfu_peak_is_that_of_the_precision_that_runs(precision, dtype):
    assert precision_dtype(precision) == dtype


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def drive(callback: ThroughputCallback, batches: list[torch.Tensor], seconds: float, monkeypatch):
    """Feed `batches` through the callback's hooks, each training batch taking `seconds`."""
    clock = Clock()
    monkeypatch.setattr(throughput.time, "perf_counter", clock)
    model = GPT(tiny_config())
    logged: dict[str, float] = {}
    module = SimpleNamespace(
        model=model, device=torch.device("cpu"), log=lambda k, v: logged.__setitem__(k, v)
    )
    strategy = SimpleNamespace()  # no tensor_parallel_size: every rank is a data-parallel rank
    trainer = SimpleNamespace(world_size=1, global_step=0, log_every_n_steps=1, strategy=strategy)
    callback.setup(trainer, module, "fit")
    for i, x in enumerate(batches):
        callback.on_train_batch_start(trainer, module, (x, x), i)
        clock.now += seconds
        trainer.global_step += 1
        callback.on_train_batch_end(trainer, module, None, (x, x), i)
    return model, logged


def test_mfu_uses_each_batch_real_length(monkeypatch):
    # Padded finetuning batches: 4 rows of 8 tokens, half of block_size.
    batches = [torch.zeros(4, 8, dtype=torch.long)] * 4
    callback = ThroughputCallback(window=4, peak_flops_per_device=1e12)
    model, logged = drive(callback, batches, seconds=0.5, monkeypatch=monkeypatch)
    assert callback.summary["tokens_per_sec"] == pytest.approx(32 / 0.5)
    expected = 32 * model.flops_per_token(seq_len=8) / 0.5 / 1e12
    assert callback.summary["mfu"] == pytest.approx(expected)
    assert model.flops_per_token(seq_len=8) < model.flops_per_token()  # the shape matters
    assert logged["perf/mfu"] == pytest.approx(expected)


def test_mfu_never_reads_above_100_percent(monkeypatch, caplog):
    batches = [torch.zeros(4, 16, dtype=torch.long)] * 6
    callback = ThroughputCallback(window=4, peak_flops_per_device=1.0)  # far too low a peak
    with caplog.at_level(logging.WARNING, logger="gptlab.training.callbacks.throughput"):
        drive(callback, batches, seconds=0.5, monkeypatch=monkeypatch)
    assert callback.summary["mfu"] == pytest.approx(1.0)
    warnings = [r.getMessage() for r in caplog.records if "above the measured peak" in r.message]
    assert len(warnings) == 1  # said once, not at every step


def test_cpu_peak_is_measured_once_per_machine_and_only_ever_raised(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTLAB_CACHE_DIR", str(tmp_path))
    measurements = iter([5e10, 4e10, 7e10])
    measure = lambda device, dtype: next(measurements)  # noqa: E731
    monkeypatch.setattr(throughput, "measure_matmul_flops", measure)
    assert measured_cpu_peak(torch.float32) == 5e10
    assert measured_cpu_peak(torch.float32) == 5e10  # cached: no second measurement
    assert measured_cpu_peak(torch.float32, remeasure=True) == 5e10  # a lower one is noise
    assert measured_cpu_peak(torch.float32, remeasure=True) == 7e10
    cached = json.loads((tmp_path / throughput.PEAK_FILE).read_text())
    assert list(cached.values()) == [7e10]
    assert f"{torch.get_num_threads()} threads" in next(iter(cached))


def test_too_low_a_measured_cpu_peak_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTLAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(throughput, "measure_matmul_flops", lambda device, dtype: 1e15)
    (tmp_path / throughput.PEAK_FILE).write_text(
        json.dumps({throughput._peak_key(torch.float32): 1.0})  # measured on a busy machine
    )
    callback = ThroughputCallback(window=4)
    module = SimpleNamespace(device=torch.device("cpu"))
    callback.on_train_start(SimpleNamespace(precision="32-true"), module)
    assert callback.peak == 1.0
    batches = [torch.zeros(4, 16, dtype=torch.long)] * 6
    drive(callback, batches, seconds=0.5, monkeypatch=monkeypatch)
    assert callback.peak == 1e15  # re-measured, not raised to the achieved rate
    assert 0 < callback.summary["mfu"] < 1e-6
