"""A console that shows gptlab's lines, the progress bar and real warnings only.

Lightning and torch print three notices on every run that tell a gptlab user nothing:

- an advertisement for Lightning's cloud logger (an info line of Lightning's rank-zero logger);
- torch's deprecation of `isinstance(treespec, LeafSpec)`, which Lightning's own `_pytree`
  helper triggers (nothing a user can change);
- "Your `IterableDataset` has `__len__` defined": Lightning's caution that a length can be wrong
  when loader workers duplicate data. gptlab's validation batches are split between workers by
  index (`gptlab.data.datamodule.ValBatches`), so their length is exact whatever the workers.

Each is dropped by its own message; every other warning and log line still shows.
"""

from __future__ import annotations

import logging
import warnings

LIGHTNING_TIP = "try installing [litlogger]"
WARNINGS = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    (r"Your `IterableDataset` has `__len__` defined", UserWarning),
)


class _DropLitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return LIGHTNING_TIP not in str(record.msg)


def quiet_known_notices() -> None:
    """Silence the three notices above, and nothing else; calling it again adds nothing."""
    for message, category in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropLitLoggerTip) for f in rank_zero_log.filters):
        rank_zero_log.addFilter(_DropLitLoggerTip())
