"""gptlab-prepare: text source -> clean -> tokenizer -> token shards + manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from gptlab.cli import CONFIG_DIR
from gptlab.cli.errors import report_user_errors
from gptlab.data.prepare import load_manifest, prepare_dataset
from gptlab.data.sources import load_documents


def describe_source(data: DictConfig) -> str:
    if data.source == "builtin":
        description = f"builtin(include_site_packages={data.include_site_packages})"
    elif data.source == "hf":
        hf = {k: v for k, v in hf_arguments(data).items() if v is not None}
        description = f"hf({', '.join(f'{k}={v}' for k, v in hf.items())})"
    else:
        description = f"{data.source}({', '.join(data.paths)})"
    if data.get("max_documents") is not None:
        description += f", first {data.max_documents} documents"
    return description


def hf_arguments(data: DictConfig) -> dict[str, Any] | None:
    """`data.hf` as plain keyword arguments for `iter_hf_dataset`, or None."""
    if not data.get("hf"):
        return None
    if OmegaConf.is_missing(data.hf, "path"):
        raise ValueError(
            "data.hf.path is not set: name a Hugging Face Hub dataset "
            "(data.hf.path=roneneldan/TinyStories) or a builder with local files "
            "(data.hf.path=json 'data.hf.data_files=[my/*.jsonl]')"
        )
    return OmegaConf.to_container(data.hf, resolve=True)


def prepare(cfg: DictConfig) -> dict[str, Any]:
    """Prepare `cfg.data` with `cfg.tokenizer` into `cfg.data.dir`; returns the manifest."""
    out_dir = Path(cfg.data.dir)
    if (out_dir / "manifest.json").exists() and not cfg.force:
        print(f"{out_dir} is already prepared (force=true rebuilds it)")
        return load_manifest(out_dir)
    documents = load_documents(
        source=cfg.data.source,
        paths=list(cfg.data.paths),
        text_field=cfg.data.text_field,
        include_site_packages=cfg.data.include_site_packages,
        normalize=cfg.data.normalize,
        strip_html=cfg.data.strip_html,
        drop_empty=cfg.data.drop_empty,
        errors=cfg.data.errors,
        hf=hf_arguments(cfg.data),
        max_documents=cfg.data.get("max_documents"),
    )
    manifest = prepare_dataset(
        documents,
        out_dir=out_dir,
        vocab_size=cfg.tokenizer.vocab_size,
        tokenizer_path=cfg.tokenizer.path,
        val_fraction=cfg.data.val_fraction,
        shard_tokens=cfg.data.shard_tokens,
        source_description=describe_source(cfg.data),
        tokenizer_kind=cfg.tokenizer.kind,
        min_frequency=cfg.tokenizer.min_frequency,
        resume=not cfg.force,
    )
    print_summary(out_dir, manifest)
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


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="prepare")
def main(cfg: DictConfig) -> None:
    with report_user_errors("gptlab-prepare"):
        prepare(cfg)


if __name__ == "__main__":
    main()
