"""The schema of the Hydra configs: which keys each section may hold, their types and defaults.

`register_schemas()` (called by gptlab.cli.train) stores the schema of configs/train.yaml in
Hydra's ConfigStore; train.yaml names it first in its defaults list, so composition fails on an
unknown or misspelled key, or a value of the wrong type, before anything is built. (Not from
gptlab.cli itself: gptlab-prepare would then import torch and Lightning for nothing.)

The model, optimizer, scheduler, finetune and scaling sections are derived from the dataclasses
that the run builds from them (`GPTConfig`, `OptimizerConfig`, ...): the same keys, types and
defaults, so a preset under configs/ states only what differs, and the schema cannot drift from
the code. `CONFIG_DEFAULTS` lists the few keys the configs leave open on purpose. Values are
checked by those dataclasses, which list the valid choices (variant names are open registries,
so the schema types them as strings; OmegaConf rejects `Literal` annotations).

Sections without such a dataclass (trainer, callbacks, logger, paths, tokenizer, corpus) are
typed as open mappings here; their YAML files are their one home.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from gptlab.finetune.base import FinetuneConfig
from gptlab.model import GPTConfig
from gptlab.scaling.plan import ScalingConfig
from gptlab.training.optim import OptimizerConfig, SchedulerConfig

# Keys a config may leave to the run, with the config's default where it differs from the
# dataclass's: the vocabulary comes from the prepared data (null), and a scaling plan picks depth
# and heads from the width (null in configs/experiment/scaling_law.yaml).
CONFIG_DEFAULTS: dict[type, dict[str, Any]] = {
    GPTConfig: {"vocab_size": None, "n_layer": GPTConfig.n_layer, "n_head": GPTConfig.n_head},
}


def schema_of(cls: type, name: str) -> type:
    """A structured-config dataclass with `cls`'s fields, types and defaults (nested dataclasses
    become their own schemas); the keys in CONFIG_DEFAULTS[cls] may also be null."""
    hints = typing.get_type_hints(cls)
    open_keys = CONFIG_DEFAULTS.get(cls, {})
    specs = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            hint = schema_of(hint, f"{name}{hint.__name__}")
            specs.append((f.name, hint, field(default_factory=hint)))
            continue
        if f.name in open_keys:
            hint = Optional[hint]  # noqa: UP045 (OmegaConf reads typing.Optional)
            default = open_keys[f.name]
        elif f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            specs.append((f.name, hint, field(default_factory=f.default_factory)))
            continue
        else:
            default = "???"  # required: the config must set it
        if isinstance(default, (list, dict, tuple)):  # mutable defaults need a factory
            specs.append((f.name, hint, field(default_factory=lambda d=default: list(d))))
        else:
            specs.append((f.name, hint, field(default=default)))
    return dataclasses.make_dataclass(name, specs)


ModelSchema = schema_of(GPTConfig, "ModelSchema")
OptimizerSchema = schema_of(OptimizerConfig, "OptimizerSchema")
SchedulerSchema = schema_of(SchedulerConfig, "SchedulerSchema")
FinetuneSchema = schema_of(FinetuneConfig, "FinetuneSchema")
ScalingSchema = schema_of(ScalingConfig, "ScalingSchema")

# An open mapping: any keys (a `_target_` and its arguments, or a group's own settings).
Mapping = dict[str, Any]


@dataclass
class ResumeSchema:
    allow_data_change: bool = "???"  # type: ignore[assignment]


@dataclass
class DataSchema:
    """Train-time loading of prepared shards: `loader` is the data module's `_target_` and its
    arguments."""

    loader: Mapping = field(default_factory=dict)


@dataclass
class TrainSchema:
    """configs/train.yaml. Its own values (seed, run_name, ...) live in that file, with their
    comments; the sections' defaults come from the dataclasses above."""

    task_name: str = "???"
    seed: int = "???"  # type: ignore[assignment]
    run_name: Optional[str] = None  # noqa: UP045
    ckpt_path: Optional[str] = None  # noqa: UP045
    compile: bool = "???"  # type: ignore[assignment]
    activation_checkpointing: bool = "???"  # type: ignore[assignment]
    global_batch_tokens: Optional[int] = None  # noqa: UP045
    estimate_only: bool = "???"  # type: ignore[assignment]
    memory_check: bool = "???"  # type: ignore[assignment]
    resume: ResumeSchema = field(default_factory=ResumeSchema)
    init_from: Optional[str] = None  # noqa: UP045
    model: ModelSchema = field(default_factory=ModelSchema)  # type: ignore[valid-type]
    optimizer: OptimizerSchema = field(default_factory=OptimizerSchema)  # type: ignore[valid-type]
    scheduler: SchedulerSchema = field(default_factory=SchedulerSchema)  # type: ignore[valid-type]
    corpus: Mapping = field(default_factory=dict)
    tokenizer: Mapping = field(default_factory=dict)
    # Pretraining reads `data`; a finetuning experiment sets `finetune` and reads `finetune_data`.
    data: Optional[DataSchema] = None  # noqa: UP045
    finetune: Optional[FinetuneSchema] = None  # type: ignore[valid-type]  # noqa: UP045
    finetune_data: Optional[Mapping] = None  # noqa: UP045
    scaling: Optional[ScalingSchema] = None  # type: ignore[valid-type]  # noqa: UP045
    trainer: Mapping = field(default_factory=dict)
    callbacks: Optional[Mapping] = None  # noqa: UP045
    logger: Optional[Mapping] = None  # noqa: UP045
    paths: Mapping = field(default_factory=dict)


def register_schemas() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent); the root configs name them."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainSchema)
