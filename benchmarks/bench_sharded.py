"""What does sharding buy? Tokens/s and memory per process of 1 process, DDP, FSDP2 and tensor
parallel, each a real `gptlab-train` run of the same model.

Layouts, with N processes (--processes) and tensor-parallel size T (--tensor-parallel):
  1 process     the baseline (trainer=cpu / gpu);
  DDP(N)        every process holds the whole model, weights, gradients and optimizer state;
  FSDP2(N)      weights, gradients and optimizer state sharded over the N processes;
  TP(T) x FSDP2(N/T)  each block split over groups of T processes, FSDP2 over the groups.
Every data-parallel rank takes --batch-size sequences per step (the ranks of a tensor-parallel
group share theirs), so tokens/s are totals over all processes; on CPUs each process gets
cores / processes threads, so every layout uses the whole machine. The layouts run round-robin
--repeats times (so load from other processes hits all alike); tokens/s is the median over the
repeats of the run's own throughput (gptlab's ThroughputCallback over all but the first fifth of
the steps).

Memory, per process (the largest over the ranks), measured by `RankMemory` inside each rank:
  model state   bytes of the weights, gradients and optimizer state the process holds (its shards
                under FSDP2 / tensor parallel): what sharding divides;
  peak RSS      the process's peak resident memory (getrusage), Python and libraries included;
                every process builds the whole model once before sharding it, so this includes
                one full fp32 copy of the weights;
  peak CUDA     (GPUs) the peak memory allocated by torch over the training steps.

    python benchmarks/bench_sharded.py --out benchmarks/results_sharded_cpu.md   # CPU, 2 procs
    python benchmarks/bench_sharded.py --shape tiny --steps 6 --repeats 1        # does it run?
    # GPUs (8): GPT-2 124M and the 1.1B llama_style, bf16, compiled
    python benchmarks/bench_sharded.py --device cuda --processes 8 --tensor-parallel 2 \\
        --shape gpt2 --batch-size 16 --precision bf16-mixed --compile \\
        --out benchmarks/results_sharded_gpu.md
    python benchmarks/bench_sharded.py --device cuda --processes 8 --tensor-parallel 2 \\
        --shape llama1b --batch-size 4 --precision bf16-mixed --compile \\
        --out benchmarks/results_sharded_gpu_1b.md

The data is the built-in corpus, prepared on first use (as bench_train.py does).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from bench_train import ensure_data, log, report_header, table
from torch.distributed.tensor import DTensor

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent

# Model overrides per shape. `cpu`: ~55M parameters (with the built-in corpus's 4096-token
# vocabulary) and short sequences, so weights, gradients and AdamW state (16 bytes a parameter,
# ~0.9 GB) dominate a process's memory, not activations.
SHAPES = {
    "tiny": ["model.n_layer=2", "model.n_embd=64", "model.n_head=4", "model.block_size=32"],
    "cpu": ["model.n_layer=4", "model.n_embd=1024", "model.n_head=16", "model.block_size=128"],
    "gpt2": ["model=gpt2_124m"],
    "llama1b": ["model=llama_style", "activation_checkpointing=true"],
}


class RankMemory(L.Callback):
    """Writes this rank's memory (see the module docstring) to `out_dir`/memory_rank<r>.json."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.model_state_bytes = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        held = model_state_bytes(pl_module, trainer.optimizers)
        self.model_state_bytes = max(self.model_state_bytes, held)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        record = {
            "model_state_bytes": self.model_state_bytes,
            # ru_maxrss is in KiB on Linux
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
        if pl_module.device.type == "cuda":
            record["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(pl_module.device)
        path = self.out_dir / f"memory_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(record))


def local_bytes(tensor: torch.Tensor) -> int:
    """The bytes this process holds of `tensor` (its shard of a DTensor)."""
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def model_state_bytes(module: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> int:
    """Weights, gradients and optimizer state held by this process."""
    total = 0
    for parameter in module.parameters():
        total += local_bytes(parameter)
        if parameter.grad is not None:
            total += local_bytes(parameter.grad)
    for optimizer in optimizers:
        for state in optimizer.state.values():
            total += sum(local_bytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    return total


@dataclass(frozen=True)
class Layout:
    name: str
    processes: int
    overrides: list[str]


def layouts(args: argparse.Namespace) -> list[Layout]:
    gpu = args.device == "cuda"
    n, t = args.processes, args.tensor_parallel
    single, ddp, fsdp = ("gpu", "ddp", "fsdp") if gpu else ("cpu", "ddp_cpu", "fsdp_cpu")
    tp_name = f"TP({t})" + (f" x FSDP2({n // t})" if n > t else "")
    sharded = [f"trainer={fsdp}", f"trainer.devices={n}"]
    return [
        Layout("1 process", 1, [f"trainer={single}"]),
        Layout(f"DDP({n})", n, [f"trainer={ddp}", f"trainer.devices={n}"]),
        Layout(f"FSDP2({n})", n, sharded),
        Layout(tp_name, n, [*sharded, f"trainer.strategy.tensor_parallel_size={t}"]),
    ]


def run_layout(args: argparse.Namespace, layout: Layout, work: Path) -> dict:
    """Train `layout` once in a new folder under `work`; its tokens/s and per-rank memory."""
    out = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    warmup = max(2, args.steps // 5)
    overrides = [
        *SHAPES[args.shape],
        *layout.overrides,
        f"corpus.dir={args.data_dir}",
        f"data.loader.batch_size={args.batch_size}",
        f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={args.steps}",  # validates once, after the timed steps
        "trainer.enable_progress_bar=false",
        "data.loader.val_windows=8",
        f"scheduler.warmup_steps={warmup}",
        f"compile={str(args.compile).lower()}",
        f"callbacks.throughput.window={args.steps - warmup}",
        "callbacks.samples=null",
        "callbacks.lr_monitor=null",
        "logger.tensorboard=null",
        "+callbacks.rank_memory._target_=bench_sharded.RankMemory",
        f"+callbacks.rank_memory.out_dir={out}",
        f"hydra.run.dir={out}",
    ]
    if args.precision:
        overrides.append(f"trainer.precision={args.precision}")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(BENCHMARKS), os.environ.get("PYTHONPATH", "")]),
    }
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // layout.processes))
    script = Path(sys.executable).with_name("gptlab-train")
    proc = subprocess.run(
        [str(script), *overrides], cwd=out, env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        sys.exit(f"{layout.name} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    results = json.loads((out / "results.json").read_text())
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("memory_rank*.json"))]
    assert len(ranks) == layout.processes, f"{layout.name}: {len(ranks)} memory records"
    memory = {key: max(rank[key] for rank in ranks) for key in ranks[0]}
    return {"tokens_per_sec": results["tokens_per_sec"], **memory}


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def report_table(results: dict[str, list[dict]]) -> str:
    """One row per layout; ratios against the 1-process baseline (speed) and DDP (memory)."""
    names = list(results)
    base_speed = statistics.median(r["tokens_per_sec"] for r in results[names[0]])
    ddp = results[names[1]][-1]
    memory_keys = [k for k in ddp if k != "tokens_per_sec"]
    labels = {
        "model_state_bytes": "model state MiB",
        "peak_rss_bytes": "peak RSS MiB",
        "peak_cuda_bytes": "peak CUDA MiB",
    }
    header = ["layout", "tokens/s", "vs 1 process"]
    for key in memory_keys:
        header += [labels[key], "vs DDP"]
    rows = []
    for name, runs in results.items():
        speed = statistics.median(r["tokens_per_sec"] for r in runs)
        row = [name, f"{speed:,.0f}", f"{speed / base_speed:.2f}x"]
        for key in memory_keys:
            row += [mib(runs[-1][key]), f"{runs[-1][key] / ddp[key]:.2f}x"]
        rows.append(row)
    return table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shape", choices=list(SHAPES), default="cpu")
    parser.add_argument("--processes", type=int, default=2, help="N (GPUs, or CPU processes)")
    parser.add_argument("--tensor-parallel", type=int, default=2, help="T, a divisor of N")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per DP rank")
    parser.add_argument("--steps", type=int, default=10, help="steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the layouts")
    parser.add_argument("--precision", help="trainer.precision (default: the preset's)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block")
    parser.add_argument("--data-dir", type=Path, default=Path("data/builtin-bpe4096"))
    parser.add_argument("--out", type=Path, help="also write the report (markdown) here")
    args = parser.parse_args()
    if args.processes % args.tensor_parallel:
        parser.error(f"--tensor-parallel={args.tensor_parallel} must divide --processes")
    args.data_dir = args.data_dir.resolve()
    ensure_data(args.data_dir)
    load_before = os.getloadavg()
    results: dict[str, list[dict]] = {layout.name: [] for layout in layouts(args)}
    with tempfile.TemporaryDirectory(prefix="gptlab-bench-sharded-") as work:
        for repeat in range(args.repeats):
            for layout in layouts(args):
                log(f"round {repeat + 1}/{args.repeats}: {layout.name}")
                results[layout.name].append(run_layout(args, layout, Path(work)))
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    report = [
        *report_header(f"Sharded training benchmark ({args.device})", gpu),
        f"- shape {args.shape} ({' '.join(SHAPES[args.shape])}), {args.batch_size} sequences "
        f"per data-parallel rank, {args.steps} steps per run, median of {args.repeats} rounds",
        f"- load average (1 min) before / after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f}",
        "",
        report_table(results),
    ]
    text = "\n".join(report) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
