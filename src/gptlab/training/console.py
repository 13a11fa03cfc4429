"""A console that shows gptlab's lines, the progress bar and real warnings only.

Lightning and torch print notices that tell a gptlab user nothing. Three on every run:

- an advertisement for Lightning's cloud logger (an info line of Lightning's rank-zero logger);
- torch's deprecation of `isinstance(treespec, LeafSpec)`, which Lightning's own `_pytree`
  helper triggers (nothing a user can change);
- "Your `IterableDataset` has `__len__` defined": Lightning's caution that a length can be wrong
  when loader workers duplicate data. gptlab's validation batches are split between workers by
  index (`gptlab.data.datamodule.ValBatches`), so their length is exact whatever the workers.

One on every rank of a tensor-parallel run that generates samples: DTensor's notice that a
weight sharded by FSDP2 over tensor parallel (a strided shard of the tensor-parallel shard) is
gathered by two all-gathers in a row ("non-ascending order"), which nothing can merge; the
whole weights are gathered for sample generation only (`parallel.gather_gpt_weights`).

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


# Log lines dropped by message: {logger name: text in the message}
LOG_NOTICES = {
    "lightning.pytorch.utilities.rank_zero": LIGHTNING_TIP,
    "torch.distributed.tensor._redistribute": "non-ascending order all_gather",
}


class _DropNotice(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_known_notices() -> None:
    """Silence the notices above, and nothing else; calling it again adds nothing."""
    for message, category in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, text in LOG_NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotice) for f in logger.filters):
            logger.addFilter(_DropNotice(text))
