"""Bad input, through the entry points a user hits (prepare/train configs, the datamodule, the
CLIs): each case must stop with a clear error that names the file, key or value and what was
expected, before any work is done or anything already written is lost."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from hydra.errors import ConfigCompositionException, InstantiationException

from gptlab.cli.prepare import prepare
from gptlab.cli.train import train
from gptlab.data.datamodule import GPTDataModule
from gptlab.data.prepare import prepare_dataset
from gptlab.data.shards import read_shard, write_shard
from gptlab.data.sources import load_documents
from gptlab.data.tokenizer import MAX_TRAINING_RUN, _bounded_runs, load_tokenizer
from gptlab.errors import DataError, ShardError
from tests.kit import compose_config, run_script, small_english_documents, tiny_run

FAST = [
    "callbacks.samples=null",
    "callbacks.throughput=null",
    "data.loader.val_windows=8",
    "scheduler.warmup_steps=1",
]


def corpus(tmp_path: Path, files: dict[str, str | bytes]) -> str:
    """Write `files` into tmp_path/corpus; return a glob matching them all."""
    folder = tmp_path / "corpus"
    folder.mkdir(exist_ok=True)
    for name, content in files.items():
        data = content if isinstance(content, bytes) else content.encode("utf-8")
        (folder / name).write_bytes(data)
    return str(folder / "*")


def prepare_files(tmp_path: Path, pattern: str, *overrides: str) -> dict:
    cfg = compose_config(
        "prepare",
        [
            "corpus=text_files",
            f"corpus.paths=[{pattern}]",
            f"corpus.dir={tmp_path / 'out'}",
            "tokenizer.vocab_size=300",
            *overrides,
        ],
        tmp_path,
    )
    return prepare(cfg)


def english(count: int) -> dict[str, str]:
    return {f"doc{i}.txt": text for i, text in enumerate(small_english_documents(count))}


@pytest.fixture
def data_copy(tiny_data_dir, tmp_path):
    """A prepared dataset this test may damage."""
    return Path(shutil.copytree(tiny_data_dir, tmp_path / "data"))


# ----------------------------------------------------------------------------- text sources


@pytest.mark.parametrize("kind", ["text_files", "jsonl"])
def test_empty_file_or_corpus(tmp_path, kind):
    pattern = corpus(tmp_path, {"empty.txt": "", "blank.txt": "\n  \n"})
    with pytest.raises(DataError, match=rf"corpus is empty: .*{tmp_path}/corpus/\*"):
        prepare_files(tmp_path, pattern, f"corpus={kind}")
    assert not (tmp_path / "out").exists()  # nothing was started


def test_non_utf8_bytes_are_replaced_or_refused_as_configured(tmp_path):
    pattern = corpus(tmp_path, {**english(20), "latin1.txt": "caf\xe9 au lait".encode("latin-1")})
    docs = load_documents("files", [pattern], errors="replace")
    assert "caf\ufffd au lait" in docs
    with pytest.raises(DataError, match=r"corpus/latin1\.txt: invalid UTF-8 at byte offset 3"):
        prepare_files(tmp_path, pattern, "corpus.errors=strict")
    with pytest.raises(ValueError, match=r"unknown errors 'ignore'; choose one of \['replace'"):
        prepare_files(tmp_path, pattern, "corpus.errors=ignore")


def test_a_single_huge_line_is_prepared_and_round_trips(tmp_path):
    # Without spaces, BPE training would take minutes (quadratic in the word length).
    huge = "".join(np.random.default_rng(0).choice(list("abcdefgh"), 300_000)) + " " * 50_000
    manifest = prepare_dataset(
        [*small_english_documents(40), huge], tmp_path, vocab_size=300, progress=False
    )
    assert manifest["splits"]["train"]["tokens"] > 10_000
    tokenizer = load_tokenizer(tmp_path / "tokenizer.json")
    assert tokenizer.decode(tokenizer.encode(huge).ids) == huge
    pieces = list(_bounded_runs([huge]))  # what the tokenizer trainer was fed
    assert "".join(pieces) == huge and max(map(len, pieces)) <= MAX_TRAINING_RUN


def test_binary_files_in_a_glob_are_skipped_with_a_warning(tmp_path, caplog):
    files = {**english(20), "photo.jpg": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256))}
    pattern = corpus(tmp_path, files)
    manifest = prepare_files(tmp_path, pattern)
    documents = sum(split["documents"] for split in manifest["splits"].values())
    assert documents == 20
    assert f"skipping {tmp_path}/corpus/photo.jpg: looks binary" in caplog.text


# ----------------------------------------------------------------------------- prepared data


def shard_of(data_dir: Path) -> Path:
    return data_dir / "train" / "shard_00000.bin"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: b"NOTASHRD" + raw[8:], r"not a gptlab shard \(bad magic"),
        (lambda raw: raw[:-100], "truncated or corrupt: header says"),
    ],
    ids=["bad_magic", "truncated"],
)
def test_corrupt_shard_is_named(data_copy, damage, message):
    shard = shard_of(data_copy)
    shard.write_bytes(damage(shard.read_bytes()))
    with pytest.raises(ShardError, match=rf"{shard}: {message}"):
        GPTDataModule(str(data_copy), block_size=32, batch_size=4).setup()


def test_shard_tokenizer_and_model_vocab_mismatches(data_copy, tiny_data_dir, tmp_path):
    dm = GPTDataModule(str(data_copy), block_size=32, batch_size=4)
    shard = shard_of(data_copy)
    tokens = np.array(read_shard(shard))
    write_shard(shard, tokens, dm.vocab_size + 1)  # a shard made with another tokenizer
    with pytest.raises(ShardError, match=rf"{shard}: holds {len(tokens)} tokens of vocab "):
        GPTDataModule(str(data_copy), block_size=32, batch_size=4).setup()

    with (data_copy / "tokenizer.json").open("a") as f:
        f.write(" ")  # a tokenizer other than the one the shards were made with
    with pytest.raises(DataError, match=rf"{data_copy}/tokenizer\.json has sha256 .* expects"):
        GPTDataModule(str(data_copy), block_size=32, batch_size=4)

    cfg = tiny_run(tiny_data_dir, tmp_path, "model.vocab_size=100")
    with pytest.raises(
        ValueError, match=r"has vocab_size \d+ \(tokenizer\.json\), but the model's"
    ):
        train(cfg)


def test_missing_tokenizer_json(data_copy, tmp_path):
    (data_copy / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{data_copy}/tokenizer\.json .*is missing"):
        GPTDataModule(str(data_copy), block_size=32, batch_size=4)
    pattern = corpus(tmp_path, english(10))
    with pytest.raises(FileNotFoundError, match=r"tokenizer file /nowhere/tok\.json does not"):
        prepare_files(tmp_path, pattern, "tokenizer.path=/nowhere/tok.json")


def test_unwritable_output_dir_fails_before_any_work(tiny_data_dir, tmp_path):
    blocker = tmp_path / "a_file"  # a path under a file cannot be created, even by root
    blocker.write_text("")
    pattern = corpus(tmp_path, english(10))
    with pytest.raises(PermissionError, match=rf"{blocker}/data is not writable"):
        prepare_files(tmp_path, pattern, f"corpus.dir={blocker}/data")
    cfg = tiny_run(tiny_data_dir, tmp_path, "debug=fast_dev_run")
    cfg.paths.output_dir = str(blocker / "run")
    with pytest.raises(PermissionError, match=rf"{blocker}/run is not writable"):
        train(cfg)


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def checkpoint(tiny_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    train(
        tiny_run(tiny_data_dir, out, "trainer.max_steps=2", "trainer.val_check_interval=2", *FAST)
    )
    return out / "checkpoints" / "last.ckpt"


def test_checkpoint_of_another_model_config(tiny_data_dir, tmp_path, checkpoint):
    cfg = tiny_run(tiny_data_dir, tmp_path, f"ckpt_path={checkpoint}", "model.n_embd=64", *FAST)
    with pytest.raises(
        ValueError,
        match=rf"checkpoint {checkpoint}:\n  model\.n_embd: 64 here, 32 in the checkpoint",
    ):
        train(cfg)


def test_truncated_checkpoint(tiny_data_dir, tmp_path, checkpoint):
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(checkpoint.read_bytes()[:5000])
    cfg = tiny_run(tiny_data_dir, tmp_path, f"ckpt_path={broken}", *FAST)
    with pytest.raises(ValueError, match=rf"cannot read checkpoint {broken}"):
        train(cfg)


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    ("override", "error", "message"),
    [
        ("model.n_layr=3", ConfigCompositionException, "n_layr"),
        ("resume.allow_data_chnage=true", ConfigCompositionException, "allow_data_chnage"),
        ("+model.n_layr=3", ValueError, r"unknown keys \['n_layr'\]; valid fields are: vocab"),
        ("+optimizer.lrr=1", ValueError, r"\['lrr'\] in config section 'optimizer'; valid keys"),
        ("+data.loader.batch_sise=4", InstantiationException, "unexpected keyword.*batch_sise"),
    ],
)
def test_misspelt_config_keys(tiny_data_dir, tmp_path, override, error, message):
    with pytest.raises(error, match=message):
        train(tiny_run(tiny_data_dir, tmp_path, "debug=fast_dev_run", override))


@pytest.mark.parametrize(
    ("override", "error", "message"),
    [
        ("optimizer.lr=-1", ValueError, r"optimizer\.lr=-1\.0 must be > 0"),  # a float now
        ("model.n_embd=33", ValueError, r"n_embd=33 is invalid; expected divisible by n_head=2"),
        ("model.dropout=1.5", ValueError, r"dropout=1\.5 is invalid; expected in \[0, 1\)"),
        ("data.loader.batch_size=0", InstantiationException, "batch_size must be >= 1, got 0"),
        (
            "data.loader.block_size=64",
            ValueError,
            r"block_size=64 exceeds model\.block_size=32, the length of the 'learned' position",
        ),
    ],
)
def test_out_of_range_values(tiny_data_dir, tmp_path, override, error, message):
    with pytest.raises(error, match=message):
        train(tiny_run(tiny_data_dir, tmp_path, "debug=fast_dev_run", override))
    assert not (tmp_path / "checkpoints").exists()


# ----------------------------------------------------------------------------- the CLIs


def test_cli_prints_one_line_and_exits_1(tmp_path):
    pattern = corpus(tmp_path, {"empty.txt": ""})
    files = ["corpus=text_files", f"corpus.paths=[{pattern}]"]
    proc = run_script("gptlab-prepare", *files, cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"gptlab-prepare: error: corpus is empty: source 'files' with paths ['{pattern}'] "
        "gave no non-empty documents"
    ]

    missing = tmp_path / "missing"
    for tool in ("gptlab-eval", "gptlab-export"):
        proc = run_script(tool, f"ckpt_path={missing}.ckpt", cwd=tmp_path, check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == (
            f"{tool}: error: checkpoint {missing}.ckpt does not exist"
        )

    proc = run_script("gptlab-train", f"corpus.dir={missing}", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"gptlab-train: error: data directory {missing} does not exist; run gptlab-prepare first"
    )
