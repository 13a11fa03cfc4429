"""Command-line overrides checked before Hydra composes, so that a mistake is one line that says
what to write instead:

- a key that is not in the config schema (gptlab.config_schema), also with a leading +, is
  named with the valid keys of its section;
- an override whose config path moved when the groups became single choices (README: "Config
  overrides: old to new") is named with the override that replaces it (Hydra would only say
  that the old path does not exist).

- The `model/attention` group picks the backend only (sdpa, eager); the variants it used to name
  are plain values that combine freely.
- `data` used to hold the prepare-time corpus, the train-time loader and the finetuning
  datasets; they are now the `corpus`, `data` (loader only) and `finetune_data` groups.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gptlab.cli import CONFIG_DIR
from gptlab.cli.errors import report_user_errors

# model/attention=<old variant> -> the values it set (in experiment=attention_ablation the same
# variants are the study's named combinations: ablation/attention=<variant>).
ATTENTION_VARIANTS = {
    "mha": "model.n_kv_heads=null",
    "gqa": "model.n_kv_heads=2",
    "mqa": "model.n_kv_heads=1",
    "local": "model.sliding_window=32",
    "qk_norm": "model.qk_norm=true",
}


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


def finetuning_experiments() -> set[str]:
    """Experiments that read `finetune_data` (where `data.*` used to name the finetuning data)."""
    folder = Path(CONFIG_DIR) / "experiment"
    return {p.stem for p in folder.glob("*.yaml") if "/finetune_data:" in p.read_text()}


def new_override(override: str, finetuning: bool = False) -> str | None:
    """The override that replaces `override` (``key=value``, optionally with a leading +/~),
    or None if it did not move. `finetuning`: the command runs a finetuning experiment."""
    prefix = override[: len(override) - len(override.lstrip("+~"))]
    key, _, value = override[len(prefix) :].partition("=")
    if key == "model/attention" and value in ATTENTION_VARIANTS:
        return ATTENTION_VARIANTS[value]
    if key == "data" and value not in (*choices("data"), "", "null"):
        group = "finetune_data" if value in choices("finetune_data") else "corpus"
        return f"{prefix}{group}={value}"
    if key == "data.dir" or (key.startswith("data.") and not finetuning):
        if key.startswith("data.loader"):
            return None  # the pretraining loader kept its path
        return f"{prefix}corpus.{key.removeprefix('data.')}={value}"
    if key.startswith("data.") and finetuning:
        return f"{prefix}finetune_data.{key.removeprefix('data.')}={value}"
    return None


def moved_override_error(args: Sequence[str]) -> str | None:
    """The error for the first moved override among command-line `args`, or None."""
    overrides = [arg for arg in args if "=" in arg and not arg.startswith("-")]
    experiments = {o.partition("=")[2] for o in overrides if o.startswith("experiment=")}
    finetuning = bool(experiments & finetuning_experiments())
    for override in overrides:
        new = new_override(override, finetuning)
        if new is None:
            continue
        message = f"{override} is now {new}"
        if override.startswith("model/attention="):
            variant = override.partition("=")[2]
            message += (
                " (the attention group picks the backend only: "
                f"{', '.join(choices('model/attention'))}; in experiment=attention_ablation: "
                f"ablation/attention={variant})"
            )
        return message + ' (README: "Config overrides: old to new")'
    return None


def unknown_key_error(schema: type, key: str) -> str | None:
    """Why dotted `key` (e.g. ``model.n_layr``) is not a key of `schema`, listing the valid keys
    where it goes astray; None if it is one, or lies inside an open mapping."""
    node = schema
    parts = key.split(".")
    for depth, part in enumerate(parts):
        hints = typing.get_type_hints(node)
        if part not in hints:
            section = ".".join(parts[:depth]) or "the root config"
            return (
                f"{'.'.join(parts[: depth + 1])} is not a config key; the keys of {section} are: "
                f"{', '.join(f.name for f in dataclasses.fields(node))}"
            )
        hint = hints[part]
        if typing.get_origin(hint) is typing.Union:  # Optional[X]
            hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        if not dataclasses.is_dataclass(hint):
            return None
        node = hint
    return None


def override_error(args: Sequence[str], schema: type | None) -> str | None:
    """The error for the first moved override, or key unknown to `schema`, among `args`."""
    moved = moved_override_error(args)
    if moved is not None or schema is None:
        return moved
    for arg in args:
        key = arg.partition("=")[0].lstrip("+~")
        group_choice = "/" in key or (Path(CONFIG_DIR) / key).is_dir()
        if "=" not in arg or arg.startswith("-") or group_choice or key.split(".")[0] == "hydra":
            continue  # an option, a group choice (Hydra lists those), or Hydra's own settings
        error = unknown_key_error(schema, key)
        if error is not None:
            return f"{arg}: {error}"
    return None


def check_overrides(
    tool: str, schema: type | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a `@hydra.main` function: a moved override, or a key unknown to `schema`, on the
    command line stops the tool with ``<tool>: error: ...`` and exit status 1."""

    def decorate(main: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(main)
        def checked(*args: Any, **kwargs: Any) -> Any:
            with report_user_errors(tool):
                error = override_error(sys.argv[1:], schema)
                if error is not None:
                    raise ValueError(error)
            return main(*args, **kwargs)

        return checked

    return decorate
