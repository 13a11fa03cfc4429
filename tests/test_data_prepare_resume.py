"""An interrupted prepare continues where it stopped; the tokenizer statistics in the manifest."""

import numpy as np
import pytest

from gptlab.data import prepare as prepare_module
from gptlab.data.prepare import JOURNAL_NAME, MANIFEST_NAME
from gptlab.data.shards import ShardBuilder, read_shard
from gptlab.data.tokenizer import load_tokenizer, unk_id
from tests.kit import files_of, goes_to_val, prepare_small, split_by_hash, synthetic_documents

DOCS = synthetic_documents(300)
FINISH = ShardBuilder.finish


def run(docs, out_dir, **options):
    """prepare with shards small enough that the val split has several, and batches small
    enough that a shard takes several."""
    return prepare_small(docs, out_dir, **({"shard_tokens": 300, "batch_chars": 500} | options))


class Interrupted(Exception):
    """Stands in for Ctrl-C or a killed process."""


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: what every resumed run must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("reference")
    return out, run(DOCS, out)


def interrupt_after(monkeypatch, shards):
    """Make prepare stop when it would finish shard number `shards` + 1; return the paths of
    the shards it finished."""
    written = []

    def finish_then_stop(builder):
        if len(written) == shards:
            raise Interrupted
        FINISH(builder)
        written.append(builder.path)

    monkeypatch.setattr(ShardBuilder, "finish", finish_then_stop)
    return written


def record_writes(monkeypatch):
    written = []

    def record(builder):
        FINISH(builder)
        written.append(builder.path)

    monkeypatch.setattr(ShardBuilder, "finish", record)
    return written


def forbid_training(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the tokenizer was trained again")

    monkeypatch.setattr(prepare_module, "train_tokenizer", fail)


@pytest.mark.parametrize("stop", [0, 3, 9])
def test_interrupted_prepare_continues_where_it_stopped(tmp_path, monkeypatch, reference, stop):
    ref_dir, ref_manifest = reference
    total = sum(len(split["shards"]) for split in ref_manifest["splits"].values())
    assert stop < total - 1

    first_run = interrupt_after(monkeypatch, stop)
    with pytest.raises(Interrupted):
        run(DOCS, tmp_path)
    assert not (tmp_path / MANIFEST_NAME).exists()  # incomplete, and it says so
    kept = {path: path.stat().st_mtime_ns for path in first_run}
    # A process killed inside an atomic write leaves its temporary file (the journal is
    # rewritten every few seconds, so a SIGKILL often lands there).
    (tmp_path / f".{JOURNAL_NAME}.k1ll3d.tmp").write_text('{"job": ')

    forbid_training(monkeypatch)
    second_run = record_writes(monkeypatch)
    manifest = run(DOCS, tmp_path)
    assert len(second_run) == total - stop  # only the missing shards were written
    assert not list(tmp_path.rglob("*.partial"))
    assert {path: path.stat().st_mtime_ns for path in first_run} == kept
    assert manifest == ref_manifest
    assert files_of(tmp_path) == files_of(ref_dir)  # no journal or temp file left either


def test_a_damaged_shard_makes_prepare_start_over(tmp_path, monkeypatch, reference):
    ref_dir, _ = reference
    interrupt_after(monkeypatch, 4)
    with pytest.raises(Interrupted):
        run(DOCS, tmp_path)
    damaged = tmp_path / "train" / "shard_00002.bin"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    second_run = record_writes(monkeypatch)
    run(DOCS, tmp_path)
    assert second_run[0].name == "shard_00000.bin"
    assert files_of(tmp_path) == files_of(ref_dir)


@pytest.mark.parametrize(
    ("docs", "options"),
    [(DOCS[1:], {}), (DOCS, {"vocab_size": 290}), (DOCS, {"resume": False})],
    ids=["other documents", "other settings", "resume=False"],
)
def test_a_different_job_starts_over(tmp_path, monkeypatch, docs, options):
    interrupt_after(monkeypatch, 3)
    with pytest.raises(Interrupted):
        run(DOCS, tmp_path)
    second_run = record_writes(monkeypatch)
    manifest = run(docs, tmp_path, **options)
    assert second_run[0].name == "shard_00000.bin"
    assert not (tmp_path / JOURNAL_NAME).exists()
    assert manifest["splits"]["train"]["documents"] == len(split_by_hash(docs, 0.1)[0])


def test_tokenizer_stats_of_byte_level_bpe(reference):
    out, manifest = reference
    stats = manifest["tokenizer_stats"]
    for name, split in manifest["splits"].items():
        assert stats["bytes_per_token"][name] == split["bytes"] / split["tokens"]
        assert stats["coverage"][name] == 1.0  # nothing is unknown to byte-level BPE
    train = np.concatenate(
        [read_shard(out / s["file"]) for s in manifest["splits"]["train"]["shards"]]
    )
    assert stats["vocab_used"] == len(np.unique(train)) / manifest["vocab_size"]


def test_coverage_counts_unknown_tokens(tmp_path):
    docs = synthetic_documents(300)
    i = next(i for i, doc in enumerate(docs) if goes_to_val(doc + " ζζζ", 0.1))
    docs[i] += " ζζζ"  # a val document with characters the train split lacks
    manifest = prepare_small(docs, tmp_path, tokenizer_kind="char", vocab_size=100)
    unknown = unk_id(load_tokenizer(tmp_path / "tokenizer.json"))
    val = manifest["splits"]["val"]
    tokens = np.concatenate([read_shard(tmp_path / s["file"]) for s in val["shards"]])
    assert (tokens == unknown).sum() == 3
    assert manifest["tokenizer_stats"]["coverage"] == {"train": 1.0, "val": 1 - 3 / val["tokens"]}
    assert manifest["tokenizer"]["kind"] == "char"


def test_documents_changed_before_the_resume_point_start_over(tmp_path, monkeypatch, reference):
    """With a given tokenizer the settings cannot tell: the replay's hash chain does."""
    ref_dir, _ = reference
    given = {"tokenizer_path": str(ref_dir / "tokenizer.json")}
    interrupt_after(monkeypatch, 5)
    with pytest.raises(Interrupted):
        run(DOCS, tmp_path / "out", **given)
    changed = [*DOCS[:3], DOCS[3] + " changed", *DOCS[4:]]
    second_run = record_writes(monkeypatch)
    run(changed, tmp_path / "out", **given)
    assert second_run[0].name == "shard_00000.bin"
    run(changed, tmp_path / "fresh", **given)
    assert files_of(tmp_path / "out") == files_of(tmp_path / "fresh")
