"""Parquet files and Hugging Face datasets as sources, from local files the tests write."""

import importlib.util
import json
import sys

import pytest

from gptlab.cli.prepare import describe_source, hf_arguments, prepare
from gptlab.data.sources import Source, iter_hf_dataset, iter_parquet, load_documents
from gptlab.errors import DataError
from tests.kit import compose_config, small_english_documents

needs_pyarrow = pytest.mark.skipif(
    importlib.util.find_spec("pyarrow") is None, reason="pyarrow missing: pip install -e '.[dev]'"
)
needs_datasets = pytest.mark.skipif(
    importlib.util.find_spec("datasets") is None, reason="datasets missing: pip install -e '.[dev]'"
)


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path, monkeypatch):
    """`datasets` writes lock files into its cache even when streaming local files."""
    if importlib.util.find_spec("datasets") is not None:
        import datasets

        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def write_parquet(path, columns, row_group_size=2):
    import pyarrow as pa
    import pyarrow.parquet as parquet

    parquet.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@needs_pyarrow
def test_parquet_rows_in_order_across_row_groups_and_files(tmp_path):
    write_parquet(tmp_path / "a.parquet", {"text": ["one", "two", "three"], "id": [1, 2, 3]})
    write_parquet(tmp_path / "b.parquet", {"text": ["four"], "id": [4]})
    rows = list(iter_parquet(str(tmp_path / "*.parquet")))
    assert rows == [
        (f"{tmp_path / 'a.parquet'}:0", "one"),
        (f"{tmp_path / 'a.parquet'}:1", "two"),
        (f"{tmp_path / 'a.parquet'}:2", "three"),
        (f"{tmp_path / 'b.parquet'}:0", "four"),
    ]


@needs_pyarrow
def test_parquet_other_text_column(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", {"content": ["x", "y"]})
    assert [text for _, text in iter_parquet([str(path)], text_field="content")] == ["x", "y"]


@needs_pyarrow
@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"body": ["x"]}, r"d\.parquet: no column 'text'; the columns are \['body'\]"),
        ({"text": [1, 2]}, r"d\.parquet: column 'text' holds int64, expected strings"),
        ({"text": ["ok", None, "x"]}, r"d\.parquet, row 1: column 'text' is null"),
    ],
)
def test_parquet_bad_content_is_named(tmp_path, columns, message):
    path = write_parquet(tmp_path / "d.parquet", columns)
    with pytest.raises(DataError, match=message):
        list(iter_parquet([str(path)]))


@needs_pyarrow
def test_not_a_parquet_file(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_text("just text")
    with pytest.raises(DataError, match=r"d\.parquet: not a readable Parquet file"):
        list(iter_parquet([str(path)]))


def test_missing_package_says_which_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match=r"pip install 'gptlab\[hf\]'"):
        list(iter_hf_dataset("json", data_files=str(tmp_path / "x.jsonl")))


def test_max_documents_stops_reading(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": "  "}\n{"text": "b"}\n{broken\n')
    # The broken line is never read: two non-empty documents were enough.
    assert load_documents("jsonl", [str(path)], max_documents=2) == ["a", "b"]
    with pytest.raises(ValueError, match="max_documents must be None or >= 1"):
        load_documents("jsonl", [str(path)], max_documents=0)


def test_hf_config_without_path_says_what_to_set(tmp_path):
    cfg = compose_config("prepare", ["corpus=hf"], tmp_path)
    with pytest.raises(ValueError, match="corpus.hf.path is not set"):
        prepare(cfg)


def test_hf_source_argument_errors():
    with pytest.raises(ValueError, match="source 'hf' needs hf.path"):
        load_documents("hf", hf={"split": "train"})
    with pytest.raises(ValueError, match="source 'hf' takes no paths"):
        load_documents("hf", ["x.txt"], hf={"path": "json"})


@needs_datasets
def test_hf_dataset_from_local_json(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "first", "n": 1}, {"text": "second"}])
    records = list(iter_hf_dataset("json", data_files=str(path)))
    assert records == [("json[train]:0", "first"), ("json[train]:1", "second")]


@needs_datasets
def test_hf_record_without_text_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"body": "x"}])
    with pytest.raises(
        DataError,
        match=r"json\[train\]:0: expected a JSON object with key 'text'; the record has \['body'\]",
    ):
        list(iter_hf_dataset("json", data_files=str(path)))


@needs_pyarrow
@needs_datasets
def test_prepare_from_a_hf_dataset_with_one_override(tmp_path):
    docs = small_english_documents(30)
    path = write_parquet(tmp_path / "d.parquet", {"text": docs}, row_group_size=10)
    overrides = [
        "corpus=hf",
        "corpus.hf.path=parquet",
        f"corpus.hf.data_files={path}",
        "corpus.max_documents=20",
        "tokenizer.vocab_size=300",
        f"paths.data_dir={tmp_path / 'data'}",
    ]
    cfg = compose_config("prepare", overrides, tmp_path)
    manifest = prepare(cfg)
    assert manifest["source"] == (
        f"hf(path=parquet, split=train, streaming=True, data_files={path}), first 20 documents"
    )
    splits = manifest["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == 20


@pytest.mark.parametrize(
    ("name", "path", "config_name"),
    [
        ("tinystories", "roneneldan/TinyStories", None),
        ("fineweb_edu", "HuggingFaceFW/fineweb-edu", "sample-10BT"),
    ],
)
def test_hub_dataset_configs(tmp_path, name, path, config_name):
    cfg = compose_config("prepare", [f"corpus={name}"], tmp_path)
    assert cfg.corpus.source == "hf" and cfg.corpus.name == name
    assert hf_arguments(cfg.corpus) == {
        "path": path,
        "name": config_name,
        "split": "train",
        "streaming": True,
        "data_files": None,
        "revision": None,
    }
    assert cfg.corpus.dir.endswith(f"{name}-bpe4096")
    assert describe_source(cfg.corpus).startswith(f"hf(path={path}")


def test_tasks_split_a_hf_dataset_by_its_files_in_order(tmp_path):
    files = []
    for i in range(3):
        files.append(str(tmp_path / f"{i}.jsonl"))
        lines = [json.dumps({"text": f"file {i} record {j}"}) for j in range(4)]
        (tmp_path / f"{i}.jsonl").write_text("\n".join(lines) + "\n")
    source = Source("hf", hf={"path": "json", "data_files": files})
    whole = list(source.documents())
    parts = [list(source.documents(i, 2)) for i in range(2)]
    assert len(whole) == 12 and parts[0] and parts[1]
    assert parts[0] + parts[1] == whole
