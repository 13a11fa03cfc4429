"""gptlab-train against nanoGPT's train.py: the same model on the same data, whole processes.

Both train the same GPT (4 layers, 4 heads, 128 wide, block 128, batch 16, no biases, no
dropout, tied embeddings, exact GELU, fp32, CPU, torch.compile off) on the same character-level
tokens: the built-in corpus prepared once by `gptlab-prepare tokenizer=char`, whose token ids
are also written as nanoGPT's train.bin / val.bin / meta.pkl. Each tool runs as a user runs it,
a fresh process timed from start to exit, at two run lengths S1 < S2, interleaved (nanoGPT S1,
gptlab S1, nanoGPT S2, gptlab S2, ...) so that load from other processes hits both alike. From
the median wall times W(S) = overhead + S x seconds per step:

    steady-state tokens/s      = (S2 - S1) x tokens per step / (W(S2) - W(S1))
    start-up + teardown (s)    = W(S1) - S1 x seconds per step

The housekeeping is matched: each evaluates at the end of the run on 2 batches of 16 windows
and writes a checkpoint there (nanoGPT: eval_iters=1 on its train and val splits, at iteration 0
too; gptlab: 32 validation windows); nanoGPT prints a line every 10 steps, gptlab draws its
progress bar and logs to TensorBoard. gptlab's end-of-run text samples are off (nanoGPT writes
none). nanoGPT trains max_iters + 1 steps, so it is given max_iters = S - 1.

    git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT     # yourself; nothing is copied
    python benchmarks/bench_nanogpt.py /tmp/nanoGPT --out benchmarks/results_nanogpt.md

nanoGPT's train.py runs from a scratch folder holding the data and a link to the checkout's
configurator.py; the checkout itself is only read.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from gptlab.data.shards import read_shard
from gptlab.model import GPT, GPTConfig
from gptlab.training.callbacks.throughput import cpu_name
from gptlab.training.lit_gpt import next_token_loss

MODEL = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128}
BATCH = 16
DATASET = "gptlab_char"  # nanoGPT's data/<dataset>/ folder, inside the scratch folder


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prepare_data(work: Path, nanogpt: Path) -> Path:
    """gptlab's char-level built-in corpus, and the same token ids in nanoGPT's format."""
    data_dir = work / "gptlab-data"
    if not (data_dir / "manifest.json").exists():
        script = Path(sys.executable).with_name("gptlab-prepare")
        subprocess.run(
            [str(script), "tokenizer=char", f"corpus.dir={data_dir}"], check=True, cwd=work
        )
    nano_dir = work / "data" / DATASET
    nano_dir.mkdir(parents=True, exist_ok=True)
    for split, name in (("train", "train.bin"), ("val", "val.bin")):
        tokens = np.concatenate([read_shard(p) for p in sorted((data_dir / split).glob("*.bin"))])
        tokens.astype(np.uint16).tofile(nano_dir / name)
    vocab = Tokenizer.from_file(str(data_dir / "tokenizer.json")).get_vocab()
    meta = {"vocab_size": len(vocab), "stoi": vocab, "itos": {i: s for s, i in vocab.items()}}
    (nano_dir / "meta.pkl").write_bytes(pickle.dumps(meta))
    configurator = work / "configurator.py"  # train.py execs it from the working directory
    if not configurator.exists():
        configurator.symlink_to(nanogpt.resolve() / "configurator.py")
    return data_dir


def nanogpt_command(steps: int, work: Path, nanogpt: Path) -> list[str]:
    options = {
        **MODEL,
        "dataset": DATASET,
        "batch_size": BATCH,
        "bias": False,
        "dropout": 0.0,
        "device": "cpu",
        "dtype": "float32",
        "compile": False,
        "gradient_accumulation_steps": 1,
        "max_iters": steps - 1,  # it trains iterations 0 .. max_iters
        "lr_decay_iters": steps - 1,
        "warmup_iters": 10,
        "eval_interval": steps - 1,  # at iteration 0 and at the end
        "eval_iters": 1,
        "log_interval": 10,
        "always_save_checkpoint": True,
        "wandb_log": False,
        "out_dir": str(work / "out-nanogpt"),
    }
    flags = [f"--{k}={v}" for k, v in options.items()]
    return [sys.executable, str(nanogpt.resolve() / "train.py"), *flags]


def gptlab_command(steps: int, work: Path, data_dir: Path) -> list[str]:
    overrides = [
        *(f"model.{k}={v}" for k, v in MODEL.items()),
        "model.bias=false",
        "model.dropout=0.0",
        "model.mlp=gelu_exact",  # nanoGPT's nn.GELU(); gptlab's default is GPT-2's tanh form
        f"corpus.dir={data_dir}",
        f"data.loader.batch_size={BATCH}",
        "data.loader.val_windows=32",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "scheduler.warmup_steps=10",
        "callbacks.samples=null",
        f"paths.log_dir={work / 'logs'}",
    ]
    return [str(Path(sys.executable).with_name("gptlab-train")), *overrides]


def wall_seconds(command: list[str], work: Path, env: dict[str, str], log_file: Path) -> float:
    start = time.perf_counter()
    with open(log_file, "w") as out:
        proc = subprocess.run(command, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{log_file.read_text()[-2000:]}")
    return seconds


# What a process imports before it trains: nanoGPT's train.py pays for torch (and numpy),
# gptlab-train for Lightning (which imports torch._dynamo) and Hydra on top.
IMPORTS = {
    "torch, numpy (nanoGPT's train.py)": "import numpy, torch",
    "lightning": "import lightning",
    "hydra": "import hydra",
    "gptlab.cli.train (all of the above and gptlab)": "import gptlab.cli.train",
}


def import_seconds(statement: str, env: dict[str, str], repeats: int) -> float:
    """Median wall time of a fresh interpreter that runs `statement` and exits."""
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", statement], env=env, check=True)
        walls.append(time.perf_counter() - start)
    return statistics.median(walls)


def import_rows(env: dict[str, str], repeats: int) -> list[str]:
    base = import_seconds("pass", env, repeats)
    return [
        f"| {name} | {import_seconds(statement, env, repeats) - base:.2f} |"
        for name, statement in IMPORTS.items()
    ]


def load_nanogpt_model(nanogpt: Path):
    """nanoGPT's model.py from the checkout, as a module (read, not copied)."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", nanogpt / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MODEL_REPEATS, MODEL_STEPS = 15, 5  # the models-alone timing: interleaved repeats of 5 steps


def model_step_rows(nanogpt: Path, vocab_size: int) -> list[str]:
    """Forward + backward of the two models in this process, on the same batch and threads: the
    models' own speed, without either trainer. Median over interleaved repeats of steps."""
    nano = load_nanogpt_model(nanogpt)
    config = {**MODEL, "vocab_size": vocab_size, "dropout": 0.0, "bias": False}
    torch.manual_seed(0)
    models = {
        "nanoGPT model.py (nn.GELU, exact)": (nano.GPT(nano.GPTConfig(**config)), True),
        "gptlab GPT, model.mlp=gelu_exact": (GPT(GPTConfig(**config, mlp="gelu_exact")), False),
        "gptlab GPT, model.mlp=gelu (tanh form, the default)": (GPT(GPTConfig(**config)), False),
    }
    x = torch.randint(0, vocab_size, (BATCH, MODEL["block_size"]))
    y = torch.randint(0, vocab_size, (BATCH, MODEL["block_size"]))

    def step(model: torch.nn.Module, returns_loss: bool) -> None:
        loss = model(x, y)[1] if returns_loss else next_token_loss(model(x), y)
        loss.backward()

    times: dict[str, list[float]] = {name: [] for name in models}
    for repeat in range(MODEL_REPEATS + 1):  # the first round warms up
        for name, (model, returns_loss) in models.items():
            start = time.perf_counter()
            for _ in range(MODEL_STEPS):
                step(model, returns_loss)
            if repeat:
                times[name].append((time.perf_counter() - start) / MODEL_STEPS * 1000)
    base = statistics.median(next(iter(times.values())))
    return [
        f"| {name} | {statistics.median(t):.1f} | {min(t):.1f}-{max(t):.1f} | "
        f"{base / statistics.median(t):.3f} |"
        for name, t in times.items()
    ]


def installed(package: str) -> str:
    return "yes" if importlib.util.find_spec(package) is not None else "no"


def fit(short: int, long: int, w_short: float, w_long: float) -> tuple[float, float]:
    """(steady-state tokens/s, start-up + teardown seconds) from two run lengths."""
    seconds_per_step = (w_long - w_short) / (long - short)
    return BATCH * MODEL["block_size"] / seconds_per_step, w_short - short * seconds_per_step


def main(args: argparse.Namespace) -> None:
    short, long = sorted(args.steps)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    work = Path(tempfile.mkdtemp(prefix="gptlab-vs-nanogpt-")) if not args.work else args.work
    work.mkdir(parents=True, exist_ok=True)
    data_dir = prepare_data(work, args.nanogpt)
    tools = {
        "nanoGPT train.py": lambda s: nanogpt_command(s, work, args.nanogpt),
        "gptlab-train": lambda s: gptlab_command(s, work, data_dir),
    }
    walls: dict[tuple[str, int], list[float]] = {(t, s): [] for t in tools for s in (short, long)}
    load_before = os.getloadavg()[0]
    for repeat in range(args.repeats):
        for steps in (short, long):
            for tool, command in tools.items():
                log_file = work / f"{tool.split()[0]}-{steps}-{repeat}.log"
                walls[tool, steps].append(wall_seconds(command(steps), work, env, log_file))
                log(f"repeat {repeat + 1}/{args.repeats}: {tool}, {steps} steps: "
                    f"{walls[tool, steps][-1]:.1f} s")  # fmt: skip
    imports = import_rows(env, repeats=2 * args.repeats + 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    vocab_size = Tokenizer.from_file(str(data_dir / "tokenizer.json")).get_vocab_size()
    model_steps = model_step_rows(args.nanogpt, vocab_size)
    rows, rates = [], {}
    for tool in tools:
        w_short, w_long = (statistics.median(walls[tool, s]) for s in (short, long))
        rate, overhead = fit(short, long, w_short, w_long)
        rates[tool] = rate
        spread = ", ".join(
            f"{s}: {min(walls[tool, s]):.1f}-{max(walls[tool, s]):.1f}" for s in (short, long)
        )
        rows.append(f"| {tool} | {w_short:.1f} | {w_long:.1f} | {rate:,.0f} | {overhead:.1f} | "
                    f"{spread} |")  # fmt: skip
    nano, ours = rates["nanoGPT train.py"], rates["gptlab-train"]
    threads = args.threads or torch.get_num_threads()
    report = [
        "# gptlab-train vs nanoGPT train.py (CPU, fp32, whole processes)",
        "",
        f"- date: {datetime.date.today().isoformat()}; machine: {cpu_name()}, "
        f"{os.cpu_count()} cores, {threads} threads each",
        f"- torch {torch.__version__}, python {platform.python_version()} ({sys.executable}); "
        f"nanoGPT checkout {args.nanogpt} at {git_head(args.nanogpt)}",
        f"- installed beside gptlab: transformers {installed('transformers')}, scipy "
        f"{installed('scipy')} (torchmetrics imports both when they are there, and Lightning "
        "imports torchmetrics)",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- model {MODEL}, batch {BATCH}, no biases, char vocabulary of the built-in corpus",
        f"- {args.repeats} interleaved repeats per tool and length; medians; load average "
        f"(1 min) before / after: {load_before:.1f} / {os.getloadavg()[0]:.1f}",
        "",
        f"| tool | wall s, {short} steps | wall s, {long} steps | steady-state tokens/s | "
        "start-up + teardown s | wall s min-max per length |",
        "|---|---:|---:|---:|---:|---|",
        *rows,
        "",
        f"gptlab-train / nanoGPT steady-state tokens/s: **{ours / nano:.3f}**",
        "",
        "Where start-up goes: import time, median of fresh interpreters, less an empty one's",
        "",
        "| import | seconds |",
        "|---|---:|",
        *imports,
        "",
        "The models alone: forward + backward of one batch in this process, same threads, "
        f"median of {MODEL_REPEATS} interleaved repeats of {MODEL_STEPS} steps",
        "",
        "| model | ms per step | min-max | speed vs nanoGPT's |",
        "|---|---:|---:|---:|",
        *model_steps,
    ]
    text = "\n".join(report) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")


def git_head(checkout: Path) -> str:
    proc = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return proc.stdout.strip() or "an unknown commit"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("nanogpt", type=Path, help="a nanoGPT checkout (its train.py is run)")
    parser.add_argument("--steps", type=int, nargs=2, default=[100, 400], help="two run lengths")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="threads for both (0: torch's)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a new temp folder)")
    parser.add_argument("--out", type=Path, help="also write the report (markdown) here")
    parsed = parser.parse_args()
    if not (parsed.nanogpt / "train.py").is_file():
        parser.error(f"{parsed.nanogpt} has no train.py; pass the path of a nanoGPT checkout")
    if len(set(parsed.steps)) != 2 or min(parsed.steps) < 20:
        parser.error(f"--steps {parsed.steps}: need two different lengths of at least 20 steps")
    return parsed


if __name__ == "__main__":
    main(parse_args())
