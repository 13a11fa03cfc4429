"""The training callbacks, each named in configs/callbacks/ (or an experiment) by its module path.

- `periodic`: `EveryNStepsCallback`, the shape samples, diagnostics and task scores share: act
  every N optimizer steps and once more at the end of training.
- `samples`: `SampleGenerationCallback` (completions of fixed prompts) and
  `ResponseSampleCallback` (responses to held-out instructions), logged to TensorBoard.
- `progress`: `TrainingProgressBar`, the bar gptlab-train shows (redrawn at the logging
  interval, not every batch).
- `throughput`: `ThroughputCallback`, tokens/s and MFU against the device's measured peak.
- `guards`: `NonFiniteGuard`, which skips non-finite steps, stops a diverged run and reports
  loss spikes.
- `diagnostics`: `AttentionDiagnosticsCallback`, attention entropy, sink share and maps.
- `eval_tasks`: `EvalTasksCallback`, zero-shot task scores while training.
- `hparams`: `HParamsCallback`, the run's hyperparameters beside its final metrics.
- `step_checkpoints`: `CheckpointAtSteps`, resumable checkpoints at listed optimizer steps (the
  branch points of WSD decays).
- `scaling`: `ScalingRunCallback`, the N, D and C of a scaling-law run, and its record.
"""
