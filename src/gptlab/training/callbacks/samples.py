"""Text samples logged to TensorBoard's Text tab while training: completions of fixed prompts
(pretraining), or responses to held-out prompts (instruction finetuning)."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_only
from tokenizers import Tokenizer

from gptlab.data.tokenizer import EOT_TOKEN
from gptlab.model import GPT
from gptlab.training.callbacks.periodic import EveryNStepsCallback
from gptlab.training.checkpoint import gpt_weights
from gptlab.training.parallel import gather_gpt_weights


def whole_model(trainer: L.Trainer, pl_module: L.LightningModule) -> GPT:
    """The GPT to sample from or score. FSDP leaves each rank a shard of the weights, so the full
    weights are gathered (a collective every rank must join) into a plain copy on rank 0."""
    strategy = trainer.strategy
    if not isinstance(strategy, FSDPStrategy | ModelParallelStrategy):
        return pl_module.model
    if isinstance(strategy, ModelParallelStrategy):  # FSDP2 / tensor parallel
        weights = gather_gpt_weights(pl_module)  # whole on rank 0, empty elsewhere
    else:
        weights = gpt_weights(strategy.lightning_module_state_dict())
    if not trainer.is_global_zero:
        return pl_module.model
    model = GPT(pl_module.config)
    model.load_state_dict(weights)
    return model.to(pl_module.device)


class SampleGenerationCallback(EveryNStepsCallback):
    """Every `every_n_steps` (and at the end of training) generates text from fixed prompts and
    logs it to TensorBoard's Text tab; rank 0 only."""

    def __init__(
        self,
        prompts: list[str],
        every_n_steps: int = 500,
        max_new_tokens: int = 64,
        temperature: float = 0.8,
        top_k: int | None = 50,
        top_p: float | None = None,
        seed: int = 0,
        stop_at: str | None = None,
    ) -> None:
        super().__init__(every_n_steps)
        self.prompts = list(prompts)
        self.max_new_tokens = max_new_tokens
        self.sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        self.seed = seed
        self.stop_at = stop_at  # a token that ends a sample, e.g. the end-of-text token
        self.last_samples: list[str] = []

    def on_scheduled_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.tokenizer_json is None:
            return
        model = whole_model(trainer, pl_module)  # every rank joins (FSDP gathers weights)
        if not trainer.is_global_zero:
            return
        tokenizer = Tokenizer.from_str(pl_module.tokenizer_json)
        self.last_samples = [
            self.complete(model, tokenizer, ids) for ids in self.prompt_ids(tokenizer)
        ]
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            for i, text in enumerate(self.last_samples):
                # Markdown code block keeps the generated whitespace readable in TensorBoard.
                experiment.add_text(f"samples/{i}", f"```\n{text}\n```", trainer.global_step)

    def prompt_ids(self, tokenizer: Tokenizer) -> list[list[int]]:
        """The token ids of each prompt (an empty prompt starts from token 0)."""
        return [tokenizer.encode(prompt).ids or [0] for prompt in self.prompts]

    def complete(self, model: GPT, tokenizer: Tokenizer, ids: list[int]) -> str:
        device = model.wte.weight.device
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        generator = torch.Generator(device=device).manual_seed(self.seed)
        was_training = model.training
        model.eval()
        eos_id = tokenizer.token_to_id(self.stop_at) if self.stop_at else None
        # A compiled forward would recompile for every new sequence length; decode eagerly.
        with torch.compiler.set_stance("force_eager"):
            out = model.generate(
                idx, self.max_new_tokens, eos_id=eos_id, generator=generator, **self.sampling
            )
        model.train(was_training)
        return tokenizer.decode(out[0].tolist())


class ResponseSampleCallback(SampleGenerationCallback):
    """The model's responses to the first `num_examples` held-out prompts of an SFTDataModule,
    logged to TensorBoard as samples/<i> every `every_n_steps` and at the end of training; the
    reference responses are logged once, at the start, as samples/reference_<i>."""

    def __init__(
        self,
        num_examples: int = 3,
        every_n_steps: int = 100,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            [], every_n_steps, max_new_tokens, temperature, top_k, top_p, seed, stop_at=EOT_TOKEN
        )
        self.num_examples = num_examples
        self.references: list[str] = []
        self._prompt_ids: list[list[int]] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        # An SFTDataModule (gptlab.finetune.sft), which holds out prompts with their responses.
        if not hasattr(datamodule, "sample_prompts"):
            raise TypeError(
                f"ResponseSampleCallback needs an SFTDataModule, got {type(datamodule).__name__}"
            )
        pairs = datamodule.sample_prompts(self.num_examples)
        self._prompt_ids = [ids for ids, _ in pairs]
        self.references = [reference for _, reference in pairs]
        self.log_references(trainer)

    def prompt_ids(self, tokenizer: Tokenizer) -> list[list[int]]:
        return self._prompt_ids  # tokenized by the data module, as in training

    @rank_zero_only
    def log_references(self, trainer: L.Trainer) -> None:
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            for i, text in enumerate(self.references):
                experiment.add_text(f"samples/reference_{i}", f"```\n{text}\n```", 0)
