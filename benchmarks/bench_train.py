"""Does Lightning cost us anything? gptlab's Trainer path against a minimal plain-PyTorch loop.

For each model shape, trains N steps with
  (a) a plain PyTorch loop written below: same GPT, same batches (GPTDataModule), same AdamW and
      LR schedule, same gradient clipping, same precision and compile settings;
  (b) gptlab's Trainer path: `gptlab.cli.train.train` on the composed Hydra config, with the
      callbacks and TensorBoard logger of a normal run (progress bar off),
interleaved a, b, a, b, ... so that load from other processes hits both alike. Prints median
ms/step, tokens/s, MFU against a peak measured with a large matmul in the training dtype (or
--peak, e.g. a datasheet's dense bf16 number) and the ratio (b)/(a). Then: loader throughput
against the training consumption rate, generation tokens/s with and without the KV cache (within
the context, where the cache applies), grouped-query attention through sdpa's enable_gqa against
copying K and V per query head and, on CPUs, the effect of bf16 autocast and torch.compile on
the plain loop.

    python benchmarks/bench_train.py --out benchmarks/results_cpu.md   # CPU: micro, tiny, small
    python benchmarks/bench_train.py --device cuda --shapes gpt2 --precision bf16-mixed --compile

The data is the built-in corpus, prepared on first use (data/builtin-bpe4096, as gptlab-prepare).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.fabric.utilities.throughput import get_available_flops
from omegaconf import DictConfig, open_dict

from gptlab.cli import CONFIG_DIR
from gptlab.cli.prepare import prepare
from gptlab.cli.train import train
from gptlab.data.datamodule import GPTDataModule
from gptlab.model import GPT
from gptlab.training.build import build_module
from gptlab.training.callbacks.throughput import cpu_name, measure_matmul_flops, precision_dtype
from gptlab.training.lit_gpt import next_token_loss
from gptlab.training.optim import build_optimizer, build_scheduler

PRECISIONS = ("32-true", "bf16-mixed")


@dataclass(frozen=True)
class Shape:
    n_layer: int
    n_embd: int
    n_head: int
    block_size: int
    batch_size: int
    steps: int  # per run; the first fifth (at least 2) are dropped as warm-up
    vocab_size: int | None = None  # None: the tokenizer's (4096 for the built-in corpus)


SHAPES = {
    # Almost no compute: (b) - (a) is the Trainer path's fixed cost per step.
    "micro": Shape(n_layer=1, n_embd=16, n_head=1, block_size=16, batch_size=1, steps=200),
    "tiny": Shape(n_layer=4, n_embd=128, n_head=4, block_size=128, batch_size=16, steps=16),
    "small": Shape(n_layer=6, n_embd=384, n_head=6, block_size=256, batch_size=4, steps=8),
    # GPT-2 124M (vocab padded to a multiple of 64), for GPUs.
    "gpt2": Shape(n_layer=12, n_embd=768, n_head=12, block_size=1024, batch_size=16, steps=30,
                  vocab_size=50304),
}  # fmt: skip


# ----------------------------------------------------------------------------- configuration


def compose_train_config(
    args: argparse.Namespace, shape: Shape, steps: int, out: Path
) -> DictConfig:
    """The config `gptlab-train` would compose for this shape, writing under `out`."""
    overrides = [
        f"trainer={'gpu' if args.device == 'cuda' else 'cpu'}",
        f"trainer.precision={args.precision}",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps + 1}",  # no validation inside the timed steps
        "trainer.enable_progress_bar=false",
        f"compile={str(args.compile).lower()}",
        f"corpus.dir={args.data_dir}",
        f"data.loader.batch_size={shape.batch_size}",
        f"model.n_layer={shape.n_layer}",
        f"model.n_embd={shape.n_embd}",
        f"model.n_head={shape.n_head}",
        f"model.block_size={shape.block_size}",
        f"model.vocab_size={shape.vocab_size or 'null'}",
        f"scheduler.warmup_steps={steps // 2}",
        "callbacks.samples.max_new_tokens=8",  # generated after the timed steps
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.paths.log_dir = str(out / "logs")
    return cfg


def ensure_data(data_dir: Path) -> None:
    if (data_dir / "manifest.json").exists():
        return
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="prepare", overrides=[f"corpus.dir={data_dir}"])
    prepare(cfg)


@contextlib.contextmanager
def run_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="gptlab-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- the two paths


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(L.Callback):
    """Seconds between consecutive training-batch ends: everything a step costs, data included."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def trainer_path(cfg: DictConfig, device: torch.device) -> list[float]:
    """(b): gptlab's own training function, timed by an extra callback."""
    timer = StepTimer(device)
    with contextlib.redirect_stdout(io.StringIO()):  # the end-of-run report
        train(cfg, extra_callbacks=[timer])
    return timer.times


def plain_loop(cfg: DictConfig, device: torch.device) -> list[float]:
    """(a): the same model, data, optimizer, schedule, clipping and precision, by hand."""
    L.seed_everything(cfg.seed, verbose=False)
    data: GPTDataModule = instantiate(cfg.data.loader)
    lit = build_module(cfg, data)  # the same validated GPT and optimizer configs as (b)
    model = lit.model.to(device)
    if cfg.compile:
        model.compile()
    optimizer = build_optimizer(model, lit.optimizer_config)
    scheduler = build_scheduler(optimizer, lit.scheduler_config)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled="bf16" in cfg.trainer.precision)
    data.setup()
    batches = iter(data.train_dataloader())
    times, last = [], None
    for _ in range(cfg.trainer.max_steps):
        x, y = (t.to(device, non_blocking=True) for t in next(batches))
        with autocast:
            loss = next_token_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.gradient_clip_val)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        now = time.perf_counter()
        if last is not None:
            times.append(now - last)
        last = now
    return times


# ----------------------------------------------------------------------------- measurements


@dataclass
class Timing:
    step_times: list[float]
    tokens_per_step: int
    flops_per_token: float
    peak: float

    @property
    def ms(self) -> float:
        return 1000 * statistics.median(self.step_times)

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens_per_step / statistics.median(self.step_times)

    @property
    def mfu(self) -> float:
        return self.tokens_per_sec * self.flops_per_token / self.peak


def compare_paths(args, name: str, peak: float, device: torch.device) -> dict[str, object]:
    """Interleaved repeats of (a) and (b) on one shape; per-repeat ratios show the noise."""
    shape = SHAPES[name]
    steps = args.steps or shape.steps
    warmup = max(2, steps // 5)
    plain_times, trainer_times, ratios = [], [], []
    for repeat in range(args.repeats):
        with run_dir() as out:
            cfg = compose_train_config(args, shape, steps, out)
            a = plain_loop(cfg, device)[warmup:]
        with run_dir() as out:
            b = trainer_path(compose_train_config(args, shape, steps, out), device)[warmup:]
        ratios.append(statistics.median(a) / statistics.median(b))
        plain_times += a
        trainer_times += b
        log(
            f"{name} repeat {repeat + 1}/{args.repeats}: plain {1000 * statistics.median(a):.1f} "
            f"ms/step, trainer {1000 * statistics.median(b):.1f} ms/step, ratio {ratios[-1]:.3f}"
        )
    with run_dir() as out:
        cfg = compose_train_config(args, shape, steps, out)
        flops = build_module(cfg, instantiate(cfg.data.loader)).model.flops_per_token()
    tokens = shape.batch_size * shape.block_size
    return {
        "shape": name,
        "cfg": cfg,
        "plain": Timing(plain_times, tokens, flops, peak),
        "trainer": Timing(trainer_times, tokens, flops, peak),
        "ratios": ratios,
        "steps": f"{args.repeats} x {steps} ({warmup} warm-up dropped)",
    }


def loader_tokens_per_sec(cfg: DictConfig, workers: int, seconds: float = 3.0) -> float:
    data: GPTDataModule = instantiate(cfg.data.loader, num_workers=workers)
    data.setup()
    batches = iter(data.train_dataloader())
    next(batches)  # worker start-up is paid once per run, not per batch
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tokens += next(batches)[0].numel()
    return tokens / (time.perf_counter() - start)


def generation_tokens_per_sec(
    model: GPT, device: torch.device, new_tokens: int, cache: bool
) -> float:
    model.eval()
    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)
    model.generate(prompt, 4, use_cache=cache)  # warm-up
    rates = []
    for seed in range(3):
        generator = torch.Generator(device=device).manual_seed(seed)
        synchronize(device)
        start = time.perf_counter()
        model.generate(prompt, new_tokens, top_k=None, use_cache=cache, generator=generator)
        synchronize(device)
        rates.append(new_tokens / (time.perf_counter() - start))
    return statistics.median(rates)


def gqa_attention_ms(
    shape: Shape, kv_heads: int, device: torch.device, rounds: int = 5, calls: int = 10
) -> tuple[float, float]:
    """Median ms of causal attention forward + backward with `kv_heads` KV heads: K and V
    expanded to every query head with repeat_interleave (what model.py did before), and sdpa's
    enable_gqa, which reads each KV head in place. Interleaved, so load hits both alike."""
    hs, group = shape.n_embd // shape.n_head, shape.n_head // kv_heads
    B, T = shape.batch_size, shape.block_size
    q = torch.randn(B, shape.n_head, T, hs, device=device, requires_grad=True)
    k, v = (torch.randn(B, kv_heads, T, hs, device=device, requires_grad=True) for _ in "kv")

    def copied() -> torch.Tensor:
        k_all, v_all = (t.repeat_interleave(group, dim=1) for t in (k, v))
        return F.scaled_dot_product_attention(q, k_all, v_all, is_causal=True)

    def grouped() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    times: dict[object, list[float]] = {copied: [], grouped: []}
    for _ in range(rounds + 1):  # the first round warms up
        for attend, spent in times.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(calls):
                attend().sum().backward()
            synchronize(device)
            spent.append(1000 * (time.perf_counter() - start) / calls)
    return statistics.median(times[copied][1:]), statistics.median(times[grouped][1:])


def cpu_effects(cfg: DictConfig, device: torch.device) -> list[tuple[str, float, float]]:
    """Plain-loop ms/step (median) and first-step seconds for fp32, bf16 autocast, compile."""
    rows = []
    for label, precision, compile in (
        ("fp32 eager", "32-true", False),
        ("bf16 autocast eager", "bf16-mixed", False),
        ("fp32 torch.compile", "32-true", True),
        ("bf16 autocast + torch.compile", "bf16-mixed", True),
    ):
        with open_dict(cfg):
            cfg.trainer.precision, cfg.compile = precision, compile
        start = time.perf_counter()
        times = plain_loop(cfg, device)
        first = time.perf_counter() - start - sum(times)
        rows.append((label, 1000 * statistics.median(times[1:]), first))
        log(f"  {label}: {rows[-1][1]:.1f} ms/step, first step {first:.1f} s")
    return rows


def spec_sheet(device: torch.device, dtype: torch.dtype) -> str:
    spec = get_available_flops(device, dtype) if device.type == "cuda" else None
    return f"; spec sheet (Lightning's table) {spec:.3g} FLOP/s" if spec else ""


# ----------------------------------------------------------------------------- report


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores"


def report_header(title: str, gpu_name: str | None) -> list[str]:
    """A benchmark report's title and the lines saying when, on what and how it was run."""
    return [
        f"# {title}",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {machine()}" + (f", {gpu_name}" if gpu_name else ""),
        f"- torch {torch.__version__}, lightning {L.__version__}, "
        f"python {platform.python_version()}, {torch.get_num_threads()} torch threads",
        f"- command: `python {' '.join(sys.argv)}`",
    ]


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def path_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        plain, trainer, ratios = r["plain"], r["trainer"], r["ratios"]
        for label, t in (("(a) plain PyTorch", plain), ("(b) gptlab Trainer", trainer)):
            speed = [f"{t.ms:.1f}", f"{t.tokens_per_sec:,.0f}", f"{t.mfu:.1%}"]
            rows.append([r["shape"], label, *speed, r["steps"]])
        spread = (
            f"per repeat: median {statistics.median(ratios):.3f}, "
            f"min {min(ratios):.3f}, max {max(ratios):.3f}"
        )
        pooled = trainer.tokens_per_sec / plain.tokens_per_sec
        extra_ms = f"{trainer.ms - plain.ms:+.1f}"
        rows.append([r["shape"], "**ratio (b)/(a)**", extra_ms, f"**{pooled:.3f}**", spread, ""])
    return table(["shape", "path", "ms/step (median)", "tokens/s", "MFU", "steps"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--shapes", nargs="+", choices=sorted(SHAPES), default=["micro", "tiny", "small"]
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=PRECISIONS, default="32-true")
    parser.add_argument("--compile", action="store_true", help="torch.compile in both paths")
    parser.add_argument("--steps", type=int, default=0, help="steps per run (0: the shape's)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved (a, b) pairs")
    parser.add_argument("--data-dir", type=Path, default=Path("data/builtin-bpe4096"))
    parser.add_argument("--gen-tokens", type=int, default=256)
    parser.add_argument(
        "--peak",
        type=float,
        default=0,
        help="MFU peak FLOP/s, e.g. a datasheet's dense bf16 "
        "number (default: measured with a large matmul)",
    )
    parser.add_argument("--skip-extras", action="store_true", help="only the (a)/(b) comparison")
    parser.add_argument("--out", type=Path, help="also write the report (markdown) here")
    args = parser.parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ensure_data(args.data_dir.resolve())
    args.data_dir = args.data_dir.resolve()
    load_before = os.getloadavg()

    dtype = precision_dtype(args.precision)
    peak, source = (
        (args.peak, "given") if args.peak else (measure_matmul_flops(device, dtype), "measured")
    )
    log(f"peak {peak:.3g} FLOP/s ({source}, {dtype})")
    results = [compare_paths(args, name, peak, device) for name in args.shapes]

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    report = [
        *report_header(f"gptlab training benchmark ({args.device})", gpu),
        f"- precision {args.precision}, compile {args.compile}; MFU peak {peak:.3g} FLOP/s "
        f"({source}, {dtype}){spec_sheet(device, dtype)}",
        f"- load average (1 min) before / after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f}",
        "",
        "## Trainer path vs plain PyTorch",
        "",
        path_table(results),
    ]
    if not args.skip_extras:
        report += extras(args, results, device)
    text = "\n".join(report) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")


def extras(args, results: list[dict], device: torch.device) -> list[str]:
    """Loader, generation and (on CPUs) precision/compile sections, for all but `micro`
    (which only measures the fixed cost of a step)."""
    loader_rows, gen_rows, gqa_rows, effect_rows = [], [], [], []
    for r in (r for r in results if r["shape"] != "micro"):
        cfg, consumed = r["cfg"], r["trainer"].tokens_per_sec
        for workers in (0, 2):
            rate = loader_tokens_per_sec(cfg, workers)
            rates = [f"{rate:,.0f}", f"{consumed:,.0f}", f"{rate / consumed:,.0f}x"]
            loader_rows.append([r["shape"], str(workers), *rates])
        model = build_module(cfg, instantiate(cfg.data.loader)).model.to(device)
        # Learned positions end the context at block_size, and with it the cache: stay inside.
        new_tokens = min(args.gen_tokens, model.config.block_size - 1)
        cached, uncached = (
            generation_tokens_per_sec(model, device, new_tokens, c) for c in (True, False)
        )
        rates = [f"{cached:,.0f}", f"{uncached:,.0f}", f"{cached / uncached:.1f}x"]
        gen_rows.append([r["shape"], str(new_tokens), *rates])
        for kv_heads in sorted({1, SHAPES[r["shape"]].n_head // 2} - {0}):
            copied, grouped = gqa_attention_ms(SHAPES[r["shape"]], kv_heads, device)
            speed = [f"{copied:.2f}", f"{grouped:.2f}", f"{copied / grouped:.2f}x"]
            gqa_rows.append([r["shape"], f"{SHAPES[r['shape']].n_head} / {kv_heads}", *speed])
        if device.type == "cpu":
            log(f"CPU effects on {r['shape']}:")
            for label, ms, first in cpu_effects(cfg, device):
                effect_rows.append([r["shape"], label, f"{ms:.1f}", f"{first:.1f}"])
    loader_header = ["shape", "workers", "loader tokens/s", "training tokens/s (b)", "headroom"]
    gen_header = ["shape", "new tokens", "KV cache tokens/s", "no cache tokens/s", "speed-up"]
    effect_header = ["shape", "setting", "ms/step (median)", "first step s (incl. compile)"]
    sections = ["", "## Data loader vs training consumption", "", table(loader_header, loader_rows)]
    gqa_header = ["shape", "query / KV heads", "K, V copied ms", "enable_gqa ms", "speed-up"]
    sections += ["", "## Generation (batch 1, 1-token prompt)", "", table(gen_header, gen_rows)]
    sections += [
        "",
        "## Grouped-query attention: K and V copied per query head vs sdpa's enable_gqa",
        "",
        "Causal sdpa, forward + backward, the shape's batch and context; median of 5 interleaved "
        "rounds of 10 calls.",
        "",
        table(gqa_header, gqa_rows),
    ]
    if effect_rows:
        title = "## bf16 autocast and torch.compile on CPU (plain loop)"
        sections += ["", title, "", table(effect_header, effect_rows)]
    return sections


if __name__ == "__main__":
    main()
