"""gptlab-export: write a checkpoint as a Hugging Face transformers model folder."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from gptlab.cli import CONFIG_DIR
from gptlab.cli.errors import report_user_errors
from gptlab.hf_export import export_to_hf, hf_architecture
from gptlab.training.checkpoint import load_model, resolve_checkpoint


def export(cfg: DictConfig) -> Path:
    """Export `cfg.ckpt_path` to `cfg.out_dir` (default: see `default_out_dir`)."""
    path = resolve_checkpoint(cfg.ckpt_path, cfg.paths.log_dir)
    model, tokenizer = load_model(path)
    if tokenizer is None:
        raise ValueError(f"{path} carries no tokenizer; it was not written by gptlab-train")
    arch = hf_architecture(model.config)  # before anything is written
    out_dir = Path(cfg.out_dir) if cfg.out_dir else default_out_dir(path)
    export_to_hf(model, tokenizer, out_dir, overwrite=cfg.force)
    print(f"# {path}", file=sys.stderr)
    print(f"exported a {arch} model ({model.num_params():,} parameters) to {out_dir}")
    print(
        "load it with: from transformers import AutoModelForCausalLM, AutoTokenizer; "
        f"AutoModelForCausalLM.from_pretrained('{out_dir}')"
    )
    return out_dir


def default_out_dir(checkpoint: Path) -> Path:
    """``hf/`` in the run folder of a gptlab-train checkpoint, else ``<name>-hf`` beside it."""
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent / "hf"
    return checkpoint.with_name(f"{checkpoint.stem}-hf")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    with report_user_errors("gptlab-export"):
        export(cfg)


if __name__ == "__main__":
    main()
