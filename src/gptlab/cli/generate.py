"""gptlab-generate: load a checkpoint and stream the completion of a prompt."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import hydra
import torch
from omegaconf import DictConfig
from tokenizers import Tokenizer

from gptlab.cli import CONFIG_DIR
from gptlab.cli.errors import report_user_errors
from gptlab.model import GPT
from gptlab.training.checkpoint import load_model, resolve_checkpoint


def stream_text(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    generator: torch.Generator | None = None,
    **sampling,
) -> Iterator[str]:
    """Yield the completion piece by piece as tokens are sampled.

    Byte-level BPE tokens can split a UTF-8 character, so each step decodes the whole completion
    and yields only the new, complete text.
    """
    device = next(model.parameters()).device
    prompt_ids = tokenizer.encode(prompt).ids
    if not prompt_ids:
        raise ValueError("prompt is empty after tokenization; give at least one character")
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    new_ids: list[int] = []
    shown = ""
    for token in model.stream(idx, max_new_tokens, generator=generator, **sampling):
        new_ids.append(int(token[0]))
        text = tokenizer.decode(new_ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a split character
            yield text[len(shown) :]
            shown = text


def generate(cfg: DictConfig) -> list[str]:
    """Print `cfg.num_samples` streamed completions of `cfg.prompt`; return them."""
    path = resolve_checkpoint(cfg.ckpt_path, cfg.paths.log_dir)
    model, tokenizer = load_model(path, cfg.device)
    if tokenizer is None:
        raise ValueError(f"{path} carries no tokenizer; it was not written by gptlab-train")
    generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    print(f"# {path}", file=sys.stderr)
    completions = []
    for _ in range(cfg.num_samples):
        sys.stdout.write(cfg.prompt)
        pieces = []
        for piece in stream_text(
            model,
            tokenizer,
            cfg.prompt,
            cfg.max_new_tokens,
            generator=generator,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
        ):
            sys.stdout.write(piece)
            sys.stdout.flush()
            pieces.append(piece)
        sys.stdout.write("\n\n")
        completions.append(cfg.prompt + "".join(pieces))
    return completions


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="generate")
def main(cfg: DictConfig) -> None:
    with report_user_errors("gptlab-generate"):
        generate(cfg)


if __name__ == "__main__":
    main()
