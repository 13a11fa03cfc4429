"""Config sections as validated dataclasses.

Configs arrive as plain dicts, from Hydra or from a checkpoint's hyperparameters, and each section
(optimizer, scheduler, finetune, scaling, ...) becomes a dataclass that checks its values on
creation, so a bad value fails before the first training step.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any


def dataclass_from_dict(cls: type, values: dict[str, Any], section: str) -> Any:
    """Build dataclass `cls` from `values`, naming the config section on an unknown key."""
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(
            f"unknown key(s) {unknown} in config section '{section}'; "
            f"valid keys: {', '.join(sorted(valid))}"
        )
    return cls(**values)
