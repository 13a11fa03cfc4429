"""Preparing at scale: worker processes, tasks + merge, a killed run, bounded memory."""

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from gptlab.cli.prepare import prepare as prepare_cli
from gptlab.data.clean import Cleaning
from gptlab.data.prepare import JOURNAL_NAME, load_manifest
from gptlab.data.shards import read_shard
from tests.kit import (
    child_env,
    compose_config,
    files_of,
    run_script,
    start_script,
    synthetic_documents,
)


def write_corpus(folder, count, seed=0):
    """`count` text files of a few documents each (blank-line separated)."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = synthetic_documents(count * 3, seed)
    for i in range(count):
        (folder / f"{i:04d}.txt").write_text("\n\n".join(docs[3 * i : 3 * i + 3]) + "\n")
    return str(folder / "*.txt")


def cli_config(tmp_path, pattern, *overrides):
    return compose_config(
        "prepare",
        [
            "corpus=text_files",
            f"corpus.paths=[{pattern}]",
            "corpus.document_split=paragraph",
            "corpus.val_fraction=0.1",
            "corpus.shard_tokens=2000",
            "corpus.num_proc=1",
            "tokenizer.vocab_size=300",
            f"paths.data_dir={tmp_path / 'data'}",
            *overrides,
        ],
        tmp_path,
    )


def stream(data_dir, manifest, split):
    shards = manifest["splits"][split]["shards"]
    return np.concatenate([read_shard(Path(data_dir) / s["file"]) for s in shards])


def test_two_tasks_and_a_merge_give_the_token_streams_of_one_task(tmp_path):
    pattern = write_corpus(tmp_path / "corpus", 120)
    single = prepare_cli(cli_config(tmp_path / "one", pattern))
    for index in range(2):
        task = cli_config(
            tmp_path / "two", pattern, "corpus.num_tasks=2", f"corpus.task_index={index}"
        )
        manifest = prepare_cli(task)
        assert 0 < manifest["splits"]["train"]["documents"] < single["splits"]["train"]["documents"]
    merged = prepare_cli(cli_config(tmp_path / "two", pattern, "corpus.num_tasks=2", "merge=true"))
    one_dir, two_dir = Path(single_dir(tmp_path / "one")), Path(single_dir(tmp_path / "two"))
    assert merged == load_manifest(two_dir)
    assert (one_dir / "tokenizer.json").read_bytes() == (two_dir / "tokenizer.json").read_bytes()
    for split in ("train", "val"):
        assert np.array_equal(stream(one_dir, single, split), stream(two_dir, merged, split))
        for key in ("documents", "tokens", "bytes"):
            assert merged["splits"][split][key] == single["splits"][split][key]
    assert merged["unigram_entropy"] == single["unigram_entropy"]
    assert merged["splits"]["train"]["shards"][0]["file"].startswith("task_00000-of-00002/train/")


def single_dir(root):
    return root / "data" / "text_files-bpe300"


def test_a_one_file_corpus_prepares_with_the_defaults(tmp_path, monkeypatch):
    """`gptlab-prepare corpus=text_files 'corpus.paths=[input.txt]'`, as nanoGPT's Shakespeare."""
    text = "\n\n".join(synthetic_documents(400)) + "\n"
    (tmp_path / "input.txt").write_text(text)
    cfg = compose_config(
        "prepare",
        ["corpus=text_files", "corpus.paths=[input.txt]", f"paths.data_dir={tmp_path}/data"],
        tmp_path,
    )
    monkeypatch.chdir(tmp_path)
    manifest = prepare_cli(cfg)
    assert manifest["split"]["method"] == "position"
    splits = manifest["splits"]
    assert splits["val"]["tokens"] / (splits["train"]["tokens"] + splits["val"]["tokens"]) == (
        pytest.approx(0.05, abs=0.01)
    )


def test_tasks_with_nothing_or_no_val_document_merge_all_the_same(tmp_path):
    """3 tasks over 2 files: one task gets no file; a small one likely no val document."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = synthetic_documents(330)
    (corpus / "big.txt").write_text("\n\n".join(docs[:300]))
    (corpus / "small.txt").write_text("\n\n".join(docs[300:]))
    pattern = str(corpus / "*.txt")
    single = prepare_cli(cli_config(tmp_path / "one", pattern))
    parts = [
        prepare_cli(
            cli_config(tmp_path / "three", pattern, "corpus.num_tasks=3", f"corpus.task_index={i}")
        )
        for i in range(3)
    ]
    assert min(part["splits"]["train"]["documents"] for part in parts) == 0
    merged = prepare_cli(
        cli_config(tmp_path / "three", pattern, "corpus.num_tasks=3", "merge=true")
    )
    for split in ("train", "val"):
        one = stream(single_dir(tmp_path / "one"), single, split)
        assert np.array_equal(one, stream(single_dir(tmp_path / "three"), merged, split))


def test_merge_names_a_missing_task(tmp_path):
    pattern = write_corpus(tmp_path / "corpus", 120)
    prepare_cli(cli_config(tmp_path, pattern, "corpus.num_tasks=2", "corpus.task_index=0"))
    with pytest.raises(FileNotFoundError, match="task 1 of 2 has not finished"):
        prepare_cli(cli_config(tmp_path, pattern, "corpus.num_tasks=2", "merge=true"))


@pytest.mark.slow
def test_shards_are_the_same_for_any_num_proc_and_batch_size(tmp_path):
    pattern = write_corpus(tmp_path / "corpus", 150)
    runs = {
        "1 process": ["corpus.num_proc=1"],
        "2 processes": ["corpus.num_proc=2", "corpus.batch_chars=700"],
        "3 processes, 1 document each": ["corpus.num_proc=3", "corpus.batch_chars=1"],
    }
    outputs = {}
    for name, overrides in runs.items():
        root = tmp_path / name.replace(" ", "_").replace(",", "")
        prepare_cli(cli_config(root, pattern, *overrides))
        outputs[name] = files_of(single_dir(root))
    first = outputs.pop("1 process")
    assert len(first) > 5
    for files in outputs.values():
        assert files == first


class DyingCleaning(Cleaning):
    """Cleans like Cleaning, but a worker process that meets `marker` dies at once (the first
    time: it removes `flag` as it goes)."""

    def __init__(self, marker, flag):
        super().__init__()
        object.__setattr__(self, "marker", marker)
        object.__setattr__(self, "flag", flag)

    def __call__(self, text):
        in_worker = multiprocessing.parent_process() is not None
        if in_worker and self.marker in text and os.path.exists(self.flag):
            os.unlink(self.flag)
            os._exit(9)
        return super().__call__(text)


@pytest.mark.slow
def test_a_dying_worker_fails_clearly_and_the_rerun_completes(tmp_path):
    from gptlab.data.prepare import prepare_dataset

    docs = synthetic_documents(600)
    options = {"vocab_size": 300, "val_fraction": 0.1, "shard_tokens": 500, "progress": False}
    options |= {"num_proc": 2, "batch_chars": 300}
    reference = tmp_path / "reference"
    prepare_dataset(docs, reference, cleaning=Cleaning(), **options)
    flag = tmp_path / "die"
    flag.touch()
    dying = DyingCleaning(docs[450], str(flag))
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="an encoding worker died .* run the same command"):
        prepare_dataset(docs, out, cleaning=dying, **options)
    journal = json.loads((out / JOURNAL_NAME).read_text())
    assert journal["splits"]["train"]["shards"]  # progress was kept
    assert not list(out.rglob("*.bin.tmp"))
    prepare_dataset(docs, out, cleaning=dying, **options)
    assert files_of(out) == files_of(reference)


def shards_in(journal):
    """How many finished shards the journal lists (0 if it is not there yet)."""
    try:
        splits = json.loads(journal.read_text())["splits"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return sum(len(split["shards"]) for split in splits.values())


@pytest.mark.slow
def test_sigkill_mid_encode_with_workers_then_rerun_is_byte_identical(tmp_path):
    pattern = write_corpus(tmp_path / "corpus", 600)
    overrides = [
        "corpus=text_files",
        f"corpus.paths=[{pattern}]",
        "corpus.document_split=paragraph",
        "corpus.shard_tokens=2000",
        "corpus.num_proc=2",
        "corpus.batch_chars=2000",
        "tokenizer.vocab_size=300",
    ]

    def args(root):
        return [*overrides, f"paths.data_dir={root}/data"]

    run_script("gptlab-prepare", *args(tmp_path / "ref"), cwd=tmp_path)
    output = tmp_path / "victim.txt"
    victim = start_script("gptlab-prepare", *args(tmp_path / "run"), cwd=tmp_path, output=output)
    out = single_dir(tmp_path / "run")
    journal = out / JOURNAL_NAME
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and victim.poll() is None:
        if shards_in(journal) >= 2:
            break
        time.sleep(0.05)
    assert victim.poll() is None, "the run finished before it could be killed"
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (out / "manifest.json").exists()
    run_script("gptlab-prepare", *args(tmp_path / "run"), cwd=tmp_path)
    assert files_of(out) == files_of(single_dir(tmp_path / "ref"))


@pytest.mark.slow
def test_peak_memory_stays_far_below_what_holding_the_corpus_took(tmp_path):
    """12 MB of text: the code that held every document and Encoding peaked at ~1 GB on 20 MB
    of this text (measured: 1013 MB, 40x the corpus); streaming needs the interpreter, the
    tokenizer and a few batches (measured: ~140 MB on 20 MB)."""
    from benchmarks.bench_prepare import measure, prepare_command, write_corpus

    pattern = write_corpus(tmp_path / "corpus", 12, seed=2)
    command = prepare_command(
        pattern,
        tmp_path / "out",
        tmp_path / "hydra",
        "corpus.num_proc=1",  # everything in one process, which getrusage then measures
        "tokenizer.train_bytes=3000000",
    )
    peak = measure(command, child_env())
    manifest = load_manifest(tmp_path / "out")
    assert sum(split["bytes"] for split in manifest["splits"].values()) > 11e6
    assert peak["largest_mb"] < 300, peak
