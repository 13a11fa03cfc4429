import json
import math
import random

import numpy as np
import pytest

from gptlab.data.errors import DataError
from gptlab.data.prepare import load_manifest, prepare_dataset, split_documents
from gptlab.data.shards import read_header, read_shard
from gptlab.data.tokenizer import EOT_TOKEN, file_sha256, load_tokenizer

WORDS = ["the", "a", "model", "token", "data", "loss", "batch", "learns", "next", "word", "shard"]


def synthetic_documents(count=300, seed=0):
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) + "." for _ in range(count)
    ]


def prepare(docs, out_dir, **kwargs):
    options = {"vocab_size": 300, "val_fraction": 0.1, "shard_tokens": 1000, "progress": False}
    return prepare_dataset(docs, out_dir, **(options | kwargs))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    docs = synthetic_documents()
    out_dir = tmp_path_factory.mktemp("prepared")
    return docs, out_dir, prepare(docs, out_dir, source_description="synthetic")


def split_stream(out_dir, manifest, split):
    shards = manifest["splits"][split]["shards"]
    return np.concatenate([read_shard(out_dir / shard["file"]) for shard in shards])


def test_manifest_fields(prepared):
    _, out_dir, manifest = prepared
    tokenizer = load_tokenizer(out_dir / "tokenizer.json")
    assert manifest == load_manifest(out_dir)
    assert manifest["format_version"] == 1
    assert manifest["created_with"].startswith("gptlab ")
    assert manifest["source"] == "synthetic"
    assert manifest["tokenizer"] == {
        "file": "tokenizer.json",
        "sha256": file_sha256(out_dir / "tokenizer.json"),
        "kind": "bpe",
    }
    assert manifest["vocab_size"] == tokenizer.get_vocab_size() <= 300
    assert manifest["eot_id"] == tokenizer.token_to_id(EOT_TOKEN)
    assert manifest["dtype"] == "uint16"
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert (train["documents"], val["documents"]) == (270, 30)
    assert train["bytes"] + val["bytes"] == sum(len(d.encode()) for d in synthetic_documents())


@pytest.mark.parametrize("split", ["train", "val"])
def test_shards_hold_the_split_stream(prepared, split):
    docs, out_dir, manifest = prepared
    entry = manifest["splits"][split]
    shards = entry["shards"]
    assert [s["file"] for s in shards] == [f"{split}/shard_{i:05d}.bin" for i in range(len(shards))]
    assert len(shards) == math.ceil(entry["tokens"] / 1000)
    assert all(s["tokens"] == 1000 for s in shards[:-1])
    assert sum(s["tokens"] for s in shards) == entry["tokens"]
    for shard in shards:
        header = read_header(out_dir / shard["file"])
        assert (header.num_tokens, header.vocab_size) == (shard["tokens"], manifest["vocab_size"])

    tokenizer = load_tokenizer(out_dir / "tokenizer.json")
    train_docs, val_docs = split_documents(docs, 0.1)
    expected = [
        token
        for doc in (train_docs if split == "train" else val_docs)
        for token in [*tokenizer.encode(doc).ids, manifest["eot_id"]]
    ]
    assert split_stream(out_dir, manifest, split).tolist() == expected


def test_unigram_entropy_of_train_tokens(prepared):
    _, out_dir, manifest = prepared
    counts = np.bincount(split_stream(out_dir, manifest, "train"))
    p = counts[counts > 0] / counts.sum()
    assert manifest["unigram_entropy"] == pytest.approx(-(p * np.log(p)).sum())
    assert 0 < manifest["unigram_entropy"] < math.log(manifest["vocab_size"])


def test_split_every_kth_document():
    docs = [str(i) for i in range(25)]
    train, val = split_documents(docs, 0.1)
    assert val == ["9", "19"] and len(train) == 23
    assert split_documents(["a", "b", "c"], 0.1) == (["a", "b"], ["c"])
    with pytest.raises(DataError, match="at least 2 documents"):
        split_documents(["only one"], 0.1)
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(docs, 0.0)


def test_tokenizer_sees_only_the_train_split(tmp_path):
    docs = synthetic_documents(100)
    for i in range(9, 100, 10):  # exactly the val documents
        docs[i] += " zyzzyva zyzzyva zyzzyva zyzzyva"
    prepare(docs, tmp_path)
    vocab = load_tokenizer(tmp_path / "tokenizer.json").get_vocab()
    assert not any("zyzz" in token for token in vocab)


def test_literal_eot_text_does_not_split_documents(tmp_path):
    docs = [f"before {EOT_TOKEN} after"] * 10 + ["plain text"] * 10
    manifest = prepare(docs, tmp_path, val_fraction=0.5)
    train = split_stream(tmp_path, manifest, "train")
    assert (train == manifest["eot_id"]).sum() == manifest["splits"]["train"]["documents"]


def test_given_tokenizer_is_copied_and_rerun_removes_stale_shards(prepared, tmp_path):
    _, source_dir, source_manifest = prepared
    first = prepare(synthetic_documents(), tmp_path, shard_tokens=500)
    assert len(first["splits"]["train"]["shards"]) > 2
    given = str(source_dir / "tokenizer.json")
    manifest = prepare(synthetic_documents(40), tmp_path, tokenizer_path=given, vocab_size=999)
    assert manifest["tokenizer"]["sha256"] == source_manifest["tokenizer"]["sha256"]
    assert manifest["vocab_size"] == source_manifest["vocab_size"]
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    listed = [s["file"] for split in manifest["splits"].values() for s in split["shards"]]
    assert files == sorted(["manifest.json", "tokenizer.json", *listed])  # no stale or temp files


def test_out_dir_not_writable_fails_before_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match=r"a_file/data is not writable"):
        prepare(synthetic_documents(10), blocker / "data")


def test_too_few_documents(tmp_path):
    with pytest.raises(DataError, match="at least 2 documents"):
        prepare(["lonely"], tmp_path)


def test_load_manifest_errors(prepared, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing.*does not exist; run gptlab-prepare"):
        load_manifest(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"no manifest\.json in .*run gptlab-prepare"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{oops")
    with pytest.raises(DataError, match=r"manifest\.json: not valid JSON"):
        load_manifest(tmp_path)
    _, _, manifest = prepared
    (tmp_path / "manifest.json").write_text(json.dumps(manifest | {"format_version": 7}))
    with pytest.raises(DataError, match="format_version 7"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(DataError, match="missing key 'tokenizer'"):
        load_manifest(tmp_path)
