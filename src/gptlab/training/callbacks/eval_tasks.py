"""In-loop evaluation: zero-shot task scores while training (`callbacks=eval_tasks`).

A thin schedule around `gptlab.eval.scoring`: the tasks and their scoring live in gptlab.eval,
which training imports only when the config asks for this callback.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import lightning as L
import torch
from tokenizers import Tokenizer

from gptlab.eval.builtin import builtin_tasks
from gptlab.eval.scoring import score_tasks
from gptlab.eval.tasks import Task, resolve_task, subsample
from gptlab.training.callbacks.periodic import EveryNStepsCallback
from gptlab.training.callbacks.samples import whole_model
from gptlab.training.tensorboard import tensorboard_writer

log = logging.getLogger(__name__)

# What is logged of each task's metrics (the others are counts, errors and speed).
LOGGED_METRICS = ("acc", "acc_norm", "acc_centred", "gold_bpb", "bpb", "ppl")


class EvalTasksCallback(EveryNStepsCallback):
    """Scores `tasks` on a fixed subsample (at most `max_examples` per task, the same every
    time) every `every_n_steps` and at the end of training, on rank 0.

    Each metric goes to TensorBoard as ``eval/<task>/<metric>`` and into
    `trainer.callback_metrics`, where the HParams callback finds the final values for its table
    (list them in its `metrics`). `seconds` is the wall time spent scoring, so its cost relative
    to training can be read off a run (logged as ``eval/seconds``, cumulative).
    `tasks`: "builtin" (made from the val split of `data_dir`), benchmark names or .jsonl files.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        tasks: Sequence[str] = ("builtin",),
        every_n_steps: int = 250,
        max_examples: int | None = 200,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__(every_n_steps)
        if "builtin" in tasks and data_dir is None:
            raise ValueError("EvalTasksCallback: the builtin tasks need data_dir (prepared data)")
        self.data_dir = data_dir
        self.task_names = list(tasks)
        self.max_examples = max_examples
        self.batch_size = batch_size
        self.seed = seed
        self.seconds = 0.0
        self.last: dict[str, dict[str, float]] = {}
        self._tasks: list[Task] | None = None

    def tasks(self) -> list[Task]:
        """The subsampled tasks, loaded on first use."""
        if self._tasks is None:
            tasks: list[Task] = []
            for name in self.task_names:
                if name == "builtin":
                    tasks += builtin_tasks(self.data_dir, self.seed)
                else:
                    tasks.append(resolve_task(name))
            self._tasks = [subsample(t, self.max_examples, self.seed) for t in tasks]
        return self._tasks

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.tasks()  # a missing file or bad task fails before the first step

    def on_scheduled_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.tokenizer_json is None:
            return
        model = whole_model(trainer, pl_module)  # all ranks join
        if not trainer.is_global_zero:
            return
        start = time.perf_counter()
        tokenizer = Tokenizer.from_str(pl_module.tokenizer_json)
        # A compiled forward would recompile for every batch shape; score eagerly.
        with torch.compiler.set_stance("force_eager"):
            self.last = score_tasks(model, tokenizer, self.tasks(), self.batch_size)
        self.seconds += time.perf_counter() - start
        scalars = {
            f"eval/{task}/{key}": float(value)
            for task, metrics in self.last.items()
            for key, value in metrics.items()
            if key in LOGGED_METRICS
        }
        # Read by HParamsCallback at the end of fitting, like the metrics LitGPT logs.
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in scalars.items()})
        writer = tensorboard_writer(trainer)
        if writer is not None:
            for name, value in scalars.items():
                writer.add_scalar(name, value, trainer.global_step)
            writer.add_scalar("eval/seconds", self.seconds, trainer.global_step)
        log.info(
            "step %d: %s (%.1f s)",
            trainer.global_step,
            ", ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in scalars.items()),
            self.seconds,
        )
