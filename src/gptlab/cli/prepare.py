"""gptlab-prepare: text source -> clean -> tokenizer -> token shards + manifest.

With corpus.num_tasks > 1, one run per task (corpus.task_index) prepares its part of the corpus;
``merge=true`` then writes the manifest over all of them (docs/data.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from gptlab.cli import CONFIG_DIR
from gptlab.cli.errors import report_user_errors
from gptlab.cli.overrides import check_overrides
from gptlab.data.clean import Cleaning, DocumentSplit
from gptlab.data.manifest import load_manifest, merge_tasks
from gptlab.data.prepare import prepare_dataset, prepared_manifest
from gptlab.data.sources import Source


def source_of(corpus: DictConfig) -> Source:
    """The `Source` that `corpus` (the config group) describes."""
    split = DocumentSplit(corpus.document_split, corpus.document_regex, corpus.chunk_chars)
    return Source(
        corpus.source,
        list(corpus.paths),
        corpus.text_field,
        corpus.include_site_packages,
        corpus.errors,
        hf_arguments(corpus),
        split,
    )


def describe_source(corpus: DictConfig) -> str:
    description = source_of(corpus).describe()
    if corpus.document_split != "file":
        description += f", document_split={corpus.document_split}"
    if corpus.get("max_documents") is not None:
        description += f", first {corpus.max_documents} documents"
    return description


def hf_arguments(corpus: DictConfig) -> dict[str, Any] | None:
    """`corpus.hf` as plain keyword arguments for `iter_hf_dataset`, or None."""
    if not corpus.get("hf"):
        return None
    if OmegaConf.is_missing(corpus.hf, "path"):
        raise ValueError(
            "corpus.hf.path is not set: name a Hugging Face Hub dataset "
            "(corpus.hf.path=roneneldan/TinyStories) or a builder with local files "
            "(corpus.hf.path=json 'corpus.hf.data_files=[my/*.jsonl]')"
        )
    return OmegaConf.to_container(corpus.hf, resolve=True)


def prepare(cfg: DictConfig) -> dict[str, Any]:
    """Prepare `cfg.corpus` with `cfg.tokenizer` into `cfg.corpus.dir`; returns the manifest."""
    corpus = cfg.corpus
    out_dir = Path(corpus.dir)
    if cfg.merge:
        manifest = merge_tasks(out_dir, corpus.num_tasks)
        print_summary(out_dir, manifest)
        return manifest
    done = prepared_manifest(out_dir, corpus.num_tasks, corpus.task_index)
    if done.exists() and not cfg.force:
        print(f"{done.parent} is already prepared (force=true rebuilds it)")
        return json.loads(done.read_text()) if corpus.num_tasks > 1 else load_manifest(out_dir)
    manifest = prepare_dataset(
        source_of(corpus),
        out_dir=out_dir,
        vocab_size=cfg.tokenizer.vocab_size,
        tokenizer_path=cfg.tokenizer.path,
        val_fraction=corpus.val_fraction,
        shard_tokens=corpus.shard_tokens,
        source_description=describe_source(corpus),
        tokenizer_kind=cfg.tokenizer.kind,
        min_frequency=cfg.tokenizer.min_frequency,
        resume=not cfg.force,
        cleaning=Cleaning(corpus.normalize, corpus.strip_html, corpus.drop_empty),
        train_bytes=cfg.tokenizer.train_bytes,
        num_proc=corpus.num_proc or len(os.sched_getaffinity(0)),
        batch_chars=corpus.batch_chars,
        max_documents=corpus.get("max_documents"),
        num_tasks=corpus.num_tasks,
        task_index=corpus.task_index,
    )
    print_summary(done.parent, manifest)
    if corpus.num_tasks > 1:
        print(f"task {corpus.task_index} of {corpus.num_tasks} done; merge=true joins the tasks")
    return manifest


def print_summary(out_dir: Path, manifest: dict[str, Any]) -> None:
    stats = manifest["tokenizer_stats"]
    kind = manifest["tokenizer"].get("kind") or "given"
    print(f"\nPrepared {out_dir}  (tokenizer {kind}, vocab {manifest['vocab_size']:,})")
    print(
        f"{'split':<6} {'documents':>10} {'MB':>8} {'tokens':>12} {'shards':>7} "
        f"{'bytes/token':>12} {'coverage':>9}"
    )
    for name, split in manifest["splits"].items():
        if not split["tokens"]:  # one task's part may hold no document of a split
            print(f"{name:<6} {0:>10} {0:>8.2f} {0:>12} {0:>7} {'-':>12} {'-':>9}")
            continue
        print(
            f"{name:<6} {split['documents']:>10,} {split['bytes'] / 1e6:>8.2f} "
            f"{split['tokens']:>12,} {len(split['shards']):>7} "
            f"{stats['bytes_per_token'][name]:>12.2f} {stats['coverage'][name]:>9.2%}"
        )
    print(
        f"coverage = tokens that are not [UNK]; {stats['vocab_used']:.1%} of the vocabulary "
        "occurs in the train split"
    )
    print(f"unigram entropy of train tokens: {manifest['unigram_entropy']:.3f} nats/token")
    dropped = manifest["dropped"]
    split = manifest["split"]
    how = {
        "hash": "by document hash",
        "every_kth_document": f"every {split.get('every')}th document (few documents)",
        "position": "by position (very few documents)",
    }[split["method"]]
    print(
        f"dropped {dropped['duplicate']:,} duplicate and {dropped['empty']:,} empty documents; "
        f"val split {how}"
    )
    sample = manifest["tokenizer"].get("sample")
    if sample:
        print(
            f"tokenizer trained on {sample['bytes'] / 1e6:.1f} MB of {sample['documents']:,} "
            "train documents (tokenizer.train_bytes)"
        )


@check_overrides("gptlab-prepare")
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="prepare")
def main(cfg: DictConfig) -> None:
    with report_user_errors("gptlab-prepare"):
        prepare(cfg)


if __name__ == "__main__":
    main()
