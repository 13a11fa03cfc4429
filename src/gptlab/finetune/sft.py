"""Instruction finetuning (SFT): prompt/response data and `LitSFT`, the loss on responses only.

Records come from JSON Lines files, one of two formats per line:

- Alpaca: ``{"instruction": ..., "input": ... (optional, may be empty), "output": ...}``
- chat:   ``{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}``

or, with ``source="builtin"``, from the download-free corpus: "Write the docstring of
`json.dumps`." answered by the first paragraph of that docstring, for every documented object of
the standard library.

The prompt template (`PromptTemplate`, config ``finetune_data.template``) turns a record into text
segments, each a prompt part or a response. Each segment is tokenized on its own and the ids are
concatenated, so the prompt/response boundary is exact and a prompt encodes exactly as it will
when the finetuned model is prompted with it. Every response is followed by the end-of-text
token, which is trained too: the model learns to stop.

Targets of prompt tokens and of padding are IGNORE_INDEX, so only response tokens add loss.
Batches are right-padded. A causal decoder's position attends only to itself and earlier
positions, so padding after an example's last token cannot change anything at its real
positions, and no attention mask is needed.

With ``packing=True`` whole examples are instead packed several to a row of at most
`max_length` tokens (`pack`), and batches are (inputs, targets, segments): `segments` numbers
the examples of each row, which `GPT.forward` turns into per-example positions and a
block-diagonal causal mask, so each example is computed exactly as if it were alone. Less of
each batch is padding, so an epoch takes fewer steps.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from gptlab.data.sources import iter_jsonl_values, json_field
from gptlab.errors import DataError
from gptlab.finetune.base import (
    IGNORE_INDEX,
    ExampleDataModule,
    LitFinetune,
    distinct_docstrings,
    pad,
)
from gptlab.training.speed import is_logging_step

ROLES = ("system", "user", "assistant")

# (text, is_response): a rendered record is a list of these.
Segment = tuple[str, bool]


@dataclass
class PromptTemplate:
    """How records become text; the placeholders in braces are the only ones allowed."""

    instruction: str = "### Instruction:\n{instruction}\n\n### Response:\n"
    instruction_with_input: str = (
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    )
    system: str = "### System:\n{content}\n\n"
    user: str = "### User:\n{content}\n\n### Assistant:\n"
    assistant: str = "{content}"

    def __post_init__(self) -> None:
        allowed = {
            "instruction": {"instruction"},
            "instruction_with_input": {"instruction", "input"},
        }
        for name, text in asdict(self).items():
            permitted = allowed.get(name, {"content"})
            used = {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}
            if used - permitted:
                raise ValueError(
                    f"finetune_data.template.{name} uses {sorted(used - permitted)}; it may use "
                    f"only {', '.join('{' + p + '}' for p in sorted(permitted))}"
                )


def render(record: object, template: PromptTemplate, where: str) -> list[Segment]:
    """An Alpaca or chat record as segments; a DataError names `where` when it is neither."""
    if isinstance(record, dict) and "messages" in record:
        return _render_chat(json_field(record, "messages", list, where), template, where)
    instruction = json_field(record, "instruction", str, where)
    output = json_field(record, "output", str, where)
    extra = json_field(record, "input", str, where) if record.get("input") is not None else ""
    if extra:
        prompt = template.instruction_with_input.format(instruction=instruction, input=extra)
    else:
        prompt = template.instruction.format(instruction=instruction)
    return [(prompt, False), (output, True)]


def _render_chat(messages: list, template: PromptTemplate, where: str) -> list[Segment]:
    segments = []
    for i, message in enumerate(messages):
        here = f"{where}, message {i}"
        role = json_field(message, "role", str, here)
        if role not in ROLES:
            raise DataError(f"{here}: role {role!r} is not one of {', '.join(ROLES)}")
        content = json_field(message, "content", str, here)
        segments.append((getattr(template, role).format(content=content), role == "assistant"))
    if not any(is_response for _, is_response in segments):
        raise DataError(f"{where}: no assistant message, so nothing to learn from")
    return segments


def segment_ids(
    segments: list[Segment], tokenizer: Tokenizer, eot: int
) -> tuple[list[int], list[bool]]:
    """The token ids of `segments` and, for each, whether it belongs to a response. Each segment
    is tokenized on its own, a response is followed by the end-of-text token, and the whole
    starts with one, as every pretraining document does."""
    ids, is_response = [eot], [False]
    for text, response in segments:
        piece = tokenizer.encode(text).ids + ([eot] if response else [])
        ids += piece
        is_response += [response] * len(piece)
    return ids, is_response


def split_last_response(segments: list[Segment]) -> tuple[list[Segment], str]:
    """(the segments before the last response, the text of that response)."""
    last = max(i for i, (_, is_response) in enumerate(segments) if is_response)
    return segments[:last], segments[last][0]


def encode(
    segments: list[Segment], tokenizer: Tokenizer, eot: int, max_length: int
) -> tuple[list[int], list[int]] | None:
    """(inputs, targets) of at most `max_length` tokens: targets are the inputs shifted by one,
    IGNORE_INDEX except where they are response tokens. None when truncation to `max_length`
    leaves no response token to learn from."""
    ids, is_response = segment_ids(segments, tokenizer, eot)
    ids, is_response = ids[: max_length + 1], is_response[: max_length + 1]
    targets = [t if r else IGNORE_INDEX for t, r in zip(ids[1:], is_response[1:], strict=True)]
    if all(t == IGNORE_INDEX for t in targets):
        return None
    return ids[:-1], targets


Item = tuple[list[int], list[int]]  # an encoded example: (inputs, targets)
PAD_SEGMENT = -1  # the segment id of a packed row's padding, which no example uses


def collate(items: list[Item], pad_id: int) -> tuple[torch.Tensor, ...]:
    inputs, targets = zip(*items, strict=True)
    return pad(inputs, pad_id), pad(targets, IGNORE_INDEX)


def pack(items: list[Item], max_length: int) -> list[list[Item]]:
    """Rows of whole examples, in order: each example joins the current row while the row stays
    within `max_length` tokens, and otherwise starts the next row (items are at most
    `max_length` long already, as `encode` cuts them)."""
    rows: list[list[Item]] = []
    used = max_length  # forces a first row
    for item in items:
        if used + len(item[0]) > max_length:
            rows.append([])
            used = 0
        rows[-1].append(item)
        used += len(item[0])
    return rows


def collate_packed(rows: list[list[Item]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """(inputs, targets, segments) of packed rows: the examples of a row are concatenated,
    segments[b, t] is the index of token t's example in row b, and padding is PAD_SEGMENT."""
    joined = [(sum((x for x, _ in row), []), sum((y for _, y in row), [])) for row in rows]
    segments = [[i for i, (x, _) in enumerate(row) for _ in x] for row in rows]
    inputs, targets = collate(joined, pad_id)
    return inputs, targets, pad(segments, PAD_SEGMENT)


def docstring_instructions() -> list[dict[str, str]]:
    """Alpaca-style records from the built-in corpus: name an object, get its docstring's first
    paragraph (its summary)."""
    return [
        {"instruction": f"Write the docstring of `{name}`.", "output": text.split("\n\n")[0]}
        for _, name, text in distinct_docstrings()
    ]


class SFTDataModule(ExampleDataModule):
    """Prompt/response batches (inputs, targets) for LitSFT; see the module docstring."""

    def __init__(
        self,
        source: str = "builtin",
        paths: list[str] | None = None,
        template: Mapping[str, str] | None = None,
        max_length: int = 128,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        seed: int = 1337,
        num_workers: int = 0,
        tokenizer_path: str | None = None,
        split_seed: int | None = None,
        packing: bool = False,
    ) -> None:
        super().__init__(
            source,
            paths,
            max_length,
            batch_size,
            val_fraction,
            seed,
            num_workers,
            tokenizer_path,
            split_seed,
        )
        self.template = PromptTemplate(**dict(template or {}))
        self.packing = packing  # items are then rows of packed examples (see `pack`)

    def load_examples(self) -> list[list[Segment]]:
        if self.source == "builtin":
            return [
                render(record, self.template, f"built-in instruction {i}")
                for i, record in enumerate(docstring_instructions())
            ]
        return [
            render(record, self.template, f"{path}, line {line}")
            for path, line, record in iter_jsonl_values(self.paths)
        ]

    def encode(self, example: list[Segment]) -> tuple[list[int], list[int]] | None:
        return encode(example, self.tokenizer, self.eot_id, self.max_length)

    def _encode_split(self, examples: list, split: str) -> list:
        items = super()._encode_split(examples, split)
        return pack(items, self.max_length) if self.packing else items

    def collate_fn(self) -> Callable:
        return partial(collate_packed if self.packing else collate, pad_id=self.eot_id)

    def response_tokens_per_batch(self) -> float:
        """The mean number of response tokens (targets that add loss) in a training batch."""
        self.setup()
        rows = self.train_items if self.packing else [[item] for item in self.train_items]
        targets = sum(t != IGNORE_INDEX for row in rows for _, ys in row for t in ys)
        return self.batch_size * targets / len(rows)

    def sample_prompts(self, count: int) -> list[tuple[list[int], str]]:
        """(prompt token ids, reference response) of the first `count` held-out examples. The
        prompt is everything before the last response, as the ids that precede that response
        in training (`segment_ids`): the model is prompted exactly as it was trained."""
        pairs = []
        for segments in self.splits[1][:count]:
            before, reference = split_last_response(segments)
            pairs.append((segment_ids(before, self.tokenizer, self.eot_id)[0], reference))
        return pairs


class LitSFT(LitFinetune):
    """LitGPT on prompt/response batches. Prompt and padding targets are IGNORE_INDEX, so only
    response tokens add loss. Packed batches (finetune_data.loader.packing) carry a third tensor,
    the segment ids, which the model is given.

    The training loss of an optimizer step is the mean over all its response tokens, on every
    rank and in every accumulated micro-batch, as loss/val is over the validation set: a
    micro-batch with more response tokens weighs more. The total is known only once the last
    micro-batch is in, so each micro-batch backpropagates its summed loss divided by a constant,
    `loss_divisor`, and `on_before_optimizer_step` rescales the gradients to the mean.
    """

    def setup(self, stage: str) -> None:
        # Any constant gives the same gradients; about the response tokens of a micro-batch, the
        # backpropagated loss stays near a mean loss in size, which is what fp16 loss scaling
        # and NonFiniteGuard's spike check expect.
        datamodule = getattr(self.trainer, "datamodule", None)
        sft_data = isinstance(datamodule, SFTDataModule)
        self.loss_divisor = datamodule.response_tokens_per_batch() if sft_data else 1.0
        self._step_sums = torch.zeros(2)  # (summed loss, response tokens) of this optimizer step

    def response_loss(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed next-token loss over the response tokens of a batch, their count)."""
        x, y, *segments = batch  # (inputs, targets) padded, (inputs, targets, segments) packed
        logits = self.model(x, segments=segments[0] if segments else None)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        return loss, (y != IGNORE_INDEX).sum()

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        loss, count = self.response_loss(batch)
        self._step_sums = self._step_sums.to(loss.device) + torch.stack(
            [loss.detach(), count.float()]
        )
        return loss / self.loss_divisor

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning divided each micro-batch's loss by the accumulation count, and DDP averages
        # the gradients of the ranks; undo both and the divisor, then divide by the step's tokens.
        loss, tokens = self.trainer.strategy.reduce(self._step_sums, reduce_op="sum")
        self._step_sums = torch.zeros_like(self._step_sums)
        trainer = self.trainer
        scale = trainer.accumulate_grad_batches * trainer.world_size * self.loss_divisor
        for param in self.parameters():
            if param.grad is not None:
                param.grad.mul_(scale / tokens.clamp(min=1))
        if is_logging_step(trainer, self.global_step + 1):
            self.log("loss/train", loss / tokens.clamp(min=1), prog_bar=True)

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        loss, count = self.response_loss(batch)
        # Weighted by response tokens, loss/val is the exact mean over all of them.
        self.val_loss.update(loss / count, weight=count)
