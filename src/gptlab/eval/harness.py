"""The `gptlab` model of lm-evaluation-harness: any gptlab checkpoint, scored by lm-eval's tasks.

    pip install -e '.[eval]'
    gptlab-lm-eval --model gptlab --model_args ckpt=logs/.../last.ckpt --tasks hellaswag

lm-eval (0.4.x) finds models in its own registry only, filled when its model modules are
imported; it reads no plugin entry points. Importing this module registers `gptlab` there, and
`gptlab-lm-eval` is lm-eval's own command line with that import done first. In Python:
``import gptlab.eval.harness`` then ``lm_eval.simple_evaluate(model="gptlab", ...)``.

Tokenization, truncation and the rolling windows are lm-eval's (`TemplateLM`, the same as its
`hf` backend); the scoring is `gptlab.eval.scoring.loglikelihoods`, the code `gptlab-eval`
runs, so both report the same numbers.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as err:  # pragma: no cover - the message is the point
    raise ImportError(
        "the lm-evaluation-harness adapter needs lm-eval: pip install -e '.[eval]'"
    ) from err

from gptlab.data.tokenizer import EOT_TOKEN, eot_id
from gptlab.eval.scoring import loglikelihoods
from gptlab.training.checkpoint import load_model, resolve_checkpoint


@register_model("gptlab")
class GptlabLM(TemplateLM):
    """lm-eval's view of a gptlab checkpoint.

    model_args: ckpt (a .ckpt file, or "last": the newest last.ckpt under log_dir), log_dir
    ("logs"), max_gen_toks (256, for generate_until). lm-eval's --batch_size and --device
    apply.
    """

    def __init__(
        self,
        ckpt: str = "last",
        log_dir: str = "logs",
        device: str | None = None,
        batch_size: int | str | None = 16,
        max_gen_toks: int | str = 256,
        **unused: Any,
    ) -> None:
        super().__init__()
        path = resolve_checkpoint(ckpt, log_dir)
        if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # lm-eval asks for cuda
        self.model, tokenizer = load_model(path, device)
        if tokenizer is None:
            raise ValueError(f"{path} carries no tokenizer, so lm-eval's text cannot be encoded")
        self.gptlab_tokenizer = tokenizer
        self.batch_size = _batch_size(batch_size)
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return eot_id(self.gptlab_tokenizer)

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_) -> list[int]:
        return self.gptlab_tokenizer.encode(string).ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.gptlab_tokenizer.decode(tokens)

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, override_bs: int | None = None
    ) -> list[tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        return loglikelihoods(self.model, pairs, override_bs or self.batch_size)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text, in disjoint windows of block_size tokens."""
        totals = []
        for (text,) in (request.args for request in requests):
            windows = [
                lm_utils.make_disjoint_window(window)
                for window in lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.eot_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            results = loglikelihoods(self.model, windows, self.batch_size)
            totals.append(sum(ll for ll, _ in results))
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return [
            self.generate_one(context, dict(kwargs))
            for context, kwargs in (r.args for r in requests)
        ]

    @torch.no_grad()
    def generate_one(self, context: str, kwargs: dict[str, Any]) -> str:
        """Complete `context` greedily (or by sampling, with do_sample=True and a temperature)
        until one of `until` or end-of-text appears, at most max_gen_toks tokens; the text
        before the stop string."""
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        until.append(EOT_TOKEN)  # as lm-eval's hf backend stops at the end-of-text text too
        max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        temperature = (
            float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
        )
        room = max(1, self.max_length - max_new)  # as lm-eval's hf backend leaves room
        ids = self.tok_encode(context)[-room:] or [self.eot_token_id]
        device = self.model.wte.weight.device
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        new: list[int] = []
        text = ""
        for token in self.model.stream(idx, max_new, temperature, eos_id=self.eot_token_id):
            if token.item() == self.eot_token_id:
                break
            new.append(token.item())
            text = self.tok_decode(new)
            if any(stop in text for stop in until):
                break
        for stop in until:
            text = text.split(stop)[0]
        return text


def _batch_size(value: int | str | None) -> int:
    if value is None:
        return 16
    text = str(value)
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"the gptlab model needs --batch_size N (N >= 1), got {value!r}")
    return int(text)


def main() -> None:
    """`gptlab-lm-eval`: lm-eval's command line, with the `gptlab` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
