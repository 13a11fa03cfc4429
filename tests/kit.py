"""The test kit, one home for what test modules share: the tiny model, configs of short runs on
the tiny data, a quiet hand-built Trainer, checkpoints, documents, and console scripts run as a
user runs them. conftest.py holds the fixtures and the test session's environment.

Importing it has no side effects, so a `gptlab-train` the tests start can load a callback from
it (`+callbacks.x._target_=tests.kit.BatchRecorder`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from gptlab.cli import CONFIG_DIR
from gptlab.config_schema import register_schemas
from gptlab.data.prepare import prepare_dataset
from gptlab.model import GPT, GPTConfig
from gptlab.training.checkpoint import TOKENIZER_KEY

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- the tiny model

# A model small enough that a step takes milliseconds on 2 cores. Four heads, so that grouped-query
# attention (2 KV heads) and per-head statistics have heads to group.
TINY = {"vocab_size": 64, "block_size": 16, "n_layer": 2, "n_head": 4, "n_embd": 32}


def tiny_config(**changes) -> GPTConfig:
    """The tiny model's config, with `changes` (another vocabulary, a variant, ...)."""
    return GPTConfig(**(TINY | changes))


def tiny_gpt(seed: int = 0, **changes) -> GPT:
    """The tiny model (with `changes`), initialised from `seed`, in eval mode."""
    torch.manual_seed(seed)
    return GPT(tiny_config(**changes)).eval()


def random_tokens(length: int = 16, batch: int = 2, seed: int = 1) -> torch.Tensor:
    """(batch, length) token ids of the tiny model's vocabulary, drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=generator)


# ----------------------------------------------------------------------------- short runs

# The tiny model as runs on tiny_data_dir train it: the data's vocabulary (512), 2 heads of 16,
# room for 32 tokens. As overrides, without the vocabulary (a run reads it from the data).
TINY_RUN = TINY | {"vocab_size": 512, "n_head": 2, "block_size": 32}
TINY_MODEL = [f"model.{key}={value}" for key, value in TINY_RUN.items() if key != "vocab_size"]
# Finetuning: room for whole examples.
FT_GPT = TINY_RUN | {"block_size": 64}
FT_MODEL = [*TINY_MODEL, f"model.block_size={FT_GPT['block_size']}"]
QUIET = ["trainer.enable_progress_bar=false", "callbacks.throughput=null"]


def compose_config(name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose a root config as the CLI would, with output paths outside the repository."""
    register_schemas()  # as gptlab.cli.train does
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir / "logs")
    return cfg


def tiny_run(tiny_data_dir: Path, tmp_path: Path, *extra: str) -> DictConfig:
    """The train config of the tiny model on the tiny data, plus `extra` overrides."""
    overrides = [*TINY_MODEL, f"corpus.dir={tiny_data_dir}", "data.loader.batch_size=16", *extra]
    return compose_config("train", overrides, tmp_path)


def short_run(tiny_data_dir: Path, tmp_path: Path, steps: int, *extra: str) -> DictConfig:
    """tiny_run for `steps` steps, validated once at the end, with no progress bar, no text
    samples and a one-step warmup: a callback's smoke run."""
    quick = [f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}"]
    quick += ["trainer.enable_progress_bar=false", "scheduler.warmup_steps=1"]
    return tiny_run(tiny_data_dir, tmp_path, *quick, "callbacks.samples=null", *extra)


def finetune_config(tmp_path: Path, tiny_data_dir: Path, experiment: str, *extra: str):
    """The config of a finetuning `experiment` (sft, classify) of the tiny model."""
    overrides = [*FT_MODEL, *QUIET, f"experiment={experiment}", f"corpus.dir={tiny_data_dir}"]
    return compose_config("train", [*overrides, *extra], tmp_path)


def cpu_trainer(**options) -> L.Trainer:
    """A Lightning Trainer on CPU that logs and prints nothing, for fits built by hand."""
    quiet = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    return L.Trainer(**({"accelerator": "cpu"} | quiet | options))


class BatchRecorder(L.Callback):
    """Saves each rank's training inputs and losses, to compare runs sample for sample."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.inputs: list[torch.Tensor] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.inputs.append(batch[0].clone())
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module) -> None:
        record = {"inputs": torch.stack(self.inputs), "losses": torch.tensor(self.losses)}
        torch.save(record, self.out_dir / f"rank{trainer.global_rank}.pt")


# ----------------------------------------------------------------------------- files runs leave


def write_checkpoint(path: Path, model, tokenizer_json: str | None, data_dir: Path | None = None):
    """A checkpoint as gptlab-train writes it (the keys `load_model` reads), without training."""
    checkpoint = {
        "hyper_parameters": {"model": model.config.to_dict()},
        "state_dict": {f"model.{name}": value for name, value in model.state_dict().items()},
        TOKENIZER_KEY: tokenizer_json,
    }
    if data_dir is not None:
        checkpoint["datamodule_hyper_parameters"] = {"data_dir": str(data_dir)}
    torch.save(checkpoint, path)
    return path


def write_run_folder(folder: Path, overrides: list[str], results=None, error=None) -> None:
    """A run folder as gptlab-train leaves it, without events: its overrides, and results.json
    or error.txt if it finished or failed."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if results is not None:
        (folder / "results.json").write_text(json.dumps(results))
    if error is not None:
        (folder / "error.txt").write_text(error + "\n")


def files_of(directory: Path) -> dict[str, bytes]:
    """Every file below `directory` and its bytes, by relative path."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


# ----------------------------------------------------------------------------- documents

WORDS = ["the", "a", "model", "token", "data", "loss", "batch", "learns", "next", "word", "shard"]


def small_english_documents(count: int = 120) -> list[str]:
    """Real prose that imports in milliseconds: pydoc's topic help texts."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)[:count]]


def synthetic_documents(count: int = 300, seed: int = 0) -> list[str]:
    """`count` different documents of random words."""
    rng = random.Random(seed)
    return [
        f"{i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) + "."
        for i in range(count)
    ]


def goes_to_val(doc: str, val_fraction: float) -> bool:
    """The hash split, written out from its definition: BLAKE2b-64 of the UTF-8 text, read
    little-endian, below val_fraction of 2^64."""
    key = int.from_bytes(hashlib.blake2b(doc.encode(), digest_size=8).digest(), "little")
    return key < val_fraction * 2**64


def split_by_hash(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    return (
        [d for d in docs if not goes_to_val(d, val_fraction)],
        [d for d in docs if goes_to_val(d, val_fraction)],
    )


def prepare_small(docs: list[str], out_dir: Path, **options):
    """prepare_dataset, quietly, with a small vocabulary and small shards (or `options`)."""
    small = {"vocab_size": 300, "val_fraction": 0.1, "shard_tokens": 1000, "progress": False}
    return prepare_dataset(docs, out_dir, **(small | options))


# ----------------------------------------------------------------------------- console scripts

# Variables of a developer's shell that change what a command prints (tracebacks) or where it
# writes; the commands the tests run must behave as for a user who set none of them.
NOT_INHERITED = ("HYDRA_FULL_ERROR", "GPTLAB_ROOT")


def child_env(**variables: str) -> dict[str, str]:
    """The environment of a process a test starts: this one's (offline, the session's caches)
    without NOT_INHERITED, with the repository importable (for tests.kit) and one thread per
    process (the test machines have 2 cores), plus `variables`."""
    env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return env | {"PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"} | variables


def console_script(name: str) -> str:
    """Console script `name` (gptlab-train, ...) of the running environment."""
    return str(Path(sys.executable).with_name(name))


def run_script(
    name: str, *args: str, cwd: Path, timeout: float = 300, check: bool = True, **env: str
) -> subprocess.CompletedProcess:
    """Run console script `name` in `cwd` to its end, with child_env(**env); its output as text.
    With `check`, it must succeed (else the test fails showing the output's end)."""
    proc = subprocess.run(
        [console_script(name), *args],
        cwd=cwd,
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert proc.returncode == 0, f"{name} failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
    return proc


def start_script(name: str, *args: str, cwd: Path, output: Path, **env: str) -> subprocess.Popen:
    """Start console script `name` in `cwd`, its output going to the file `output`, in a session
    of its own: os.killpg(proc.pid, ...) reaches every process it starts, as when a node dies."""
    with open(output, "w") as out:
        return subprocess.Popen(
            [console_script(name), *args],
            cwd=cwd,
            env=child_env(**env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
