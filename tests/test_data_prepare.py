"""gptlab-prepare's output: the manifest, the hash split, shards and tokenizer, exact
duplicates, end-of-text handling, and refusals of bad input."""

import hashlib
import json
import math
import random

import numpy as np
import pytest

from gptlab.data.prepare import load_manifest
from gptlab.data.shards import read_header, read_shard
from gptlab.data.tokenizer import EOT_TOKEN, file_sha256, load_tokenizer
from gptlab.errors import DataError
from tests.kit import prepare_small, split_by_hash, synthetic_documents


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    docs = synthetic_documents()
    out_dir = tmp_path_factory.mktemp("prepared")
    return docs, out_dir, prepare_small(docs, out_dir, source_description="synthetic")


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
    train_docs, val_docs = split_by_hash(synthetic_documents(), 0.1)
    sample = "".join(
        len(d.encode()).to_bytes(8, "little").decode("latin-1") + d for d in train_docs
    )
    assert manifest["tokenizer"] == {
        "file": "tokenizer.json",
        "sha256": file_sha256(out_dir / "tokenizer.json"),
        "kind": "bpe",
        "sample": {
            "method": "first 100,000,000 bytes of the train split",
            "documents": len(train_docs),
            "bytes": sum(len(d.encode()) for d in train_docs),
            "sha256": hashlib.sha256(sample.encode("latin-1")).hexdigest(),
        },
    }
    assert manifest["split"] == {"method": "hash", "val_fraction": 0.1}
    assert manifest["dropped"] == {"empty": 0, "duplicate": 0}
    assert manifest["vocab_size"] == tokenizer.get_vocab_size() <= 300
    assert manifest["eot_id"] == tokenizer.token_to_id(EOT_TOKEN)
    assert manifest["dtype"] == "uint16"
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert (train["documents"], val["documents"]) == (len(train_docs), len(val_docs))
    assert 10 < len(val_docs) < 50  # 30 expected
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
    train_docs, val_docs = split_by_hash(docs, 0.1)
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


def test_the_split_of_a_document_does_not_depend_on_its_place(prepared, tmp_path):
    docs, out_dir, manifest = prepared
    shuffled = random.Random(1).sample(docs, len(docs))
    other = prepare_small(shuffled, tmp_path, tokenizer_path=str(out_dir / "tokenizer.json"))
    tokenizer = load_tokenizer(out_dir / "tokenizer.json")
    val_docs = split_by_hash(shuffled, 0.1)[1]
    expected = [t for doc in val_docs for t in [*tokenizer.encode(doc).ids, manifest["eot_id"]]]
    assert split_stream(tmp_path, other, "val").tolist() == expected
    assert other["splits"]["val"]["documents"] == manifest["splits"]["val"]["documents"]


def test_a_small_corpus_is_split_by_position(tmp_path):
    """nanoGPT's split: the last val_fraction of the text is val, cut mid-document."""
    text = "\n\n".join(synthetic_documents(40))  # one file holding the whole corpus
    manifest = prepare_small([text], tmp_path, val_fraction=0.1)
    cut = len(text) - round(0.1 * len(text))
    assert manifest["split"] == {"method": "position", "val_from_char": cut}
    tokenizer = load_tokenizer(tmp_path / "tokenizer.json")
    eot = manifest["eot_id"]
    for split, part in (("train", text[:cut]), ("val", text[cut:])):
        assert split_stream(tmp_path, manifest, split).tolist() == [
            *tokenizer.encode(part).ids,
            eot,
        ]
    assert manifest["tokenizer"]["sample"]["bytes"] == cut  # the tokenizer saw no val text


def test_a_corpus_of_few_documents_sends_every_kth_to_val(tmp_path):
    """Between 1 / val_fraction and 10 / val_fraction documents, as before hashing."""
    docs = synthetic_documents(50)
    for i in range(9, 50, 10):
        docs[i] += " zyzzyva zyzzyva zyzzyva zyzzyva"
    manifest = prepare_small([*docs, docs[3]], tmp_path)
    assert manifest["split"] == {"method": "every_kth_document", "every": 10}
    assert manifest["dropped"] == {"empty": 0, "duplicate": 1}
    tokenizer = load_tokenizer(tmp_path / "tokenizer.json")
    eot = manifest["eot_id"]
    val = [d for i, d in enumerate(docs) if i % 10 == 9]
    train = [d for i, d in enumerate(docs) if i % 10 != 9]
    for split, part in (("train", train), ("val", val)):
        expected = [t for doc in part for t in [*tokenizer.encode(doc).ids, eot]]
        assert split_stream(tmp_path, manifest, split).tolist() == expected
    assert not any("zyzz" in token for token in tokenizer.get_vocab())


def test_tokenizer_sample_is_the_first_train_bytes(tmp_path):
    docs = synthetic_documents(300)
    train_docs = split_by_hash(docs, 0.1)[0]
    late = [i for i, d in enumerate(docs) if d == train_docs[-1]][0]
    docs[late] += " zyzzyva" * 20  # a train document far beyond the sample
    manifest = prepare_small(docs, tmp_path, train_bytes=2000)
    sample = manifest["tokenizer"]["sample"]
    assert sample["bytes"] == 2000
    sizes = np.cumsum([len(d.encode()) for d in train_docs])
    assert sample["documents"] == int(np.searchsorted(sizes, 2000)) + 1
    vocab = load_tokenizer(tmp_path / "tokenizer.json").get_vocab()
    assert not any("zyzz" in token for token in vocab)


def test_duplicates_are_dropped_and_counted(tmp_path):
    docs = synthetic_documents(200)
    with_copies = [docs[0], *docs, docs[5], docs[7], docs[5]]
    manifest = prepare_small(with_copies, tmp_path, tokenizer_path=None)
    reference = prepare_small(docs, tmp_path / "ref")
    assert manifest["dropped"] == {"empty": 0, "duplicate": 4}
    assert manifest["splits"] == reference["splits"]


def test_literal_eot_text_does_not_split_documents(tmp_path):
    docs = [f"{i} before {EOT_TOKEN} after" for i in range(10)] + synthetic_documents(10)
    manifest = prepare_small(docs, tmp_path, val_fraction=0.5)
    train = split_stream(tmp_path, manifest, "train")
    assert (train == manifest["eot_id"]).sum() == manifest["splits"]["train"]["documents"]


def test_given_tokenizer_is_copied_and_rerun_removes_stale_shards(prepared, tmp_path):
    _, source_dir, source_manifest = prepared
    first = prepare_small(synthetic_documents(), tmp_path, shard_tokens=500)
    assert len(first["splits"]["train"]["shards"]) > 2
    given = str(source_dir / "tokenizer.json")
    manifest = prepare_small(
        synthetic_documents(40), tmp_path, tokenizer_path=given, vocab_size=999
    )
    assert manifest["tokenizer"]["sha256"] == source_manifest["tokenizer"]["sha256"]
    assert manifest["vocab_size"] == source_manifest["vocab_size"]
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    listed = [s["file"] for split in manifest["splits"].values() for s in split["shards"]]
    assert files == sorted(["manifest.json", "tokenizer.json", *listed])  # no stale or temp files


def test_out_dir_not_writable_fails_before_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match=r"a_file/data is not writable"):
        prepare_small(synthetic_documents(10), blocker / "data")


def test_too_little_text(tmp_path):
    with pytest.raises(DataError, match="has 1 character, need 2"):
        prepare_small(["x"], tmp_path)
    with pytest.raises(DataError, match="corpus is empty"):
        prepare_small([], tmp_path)


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
