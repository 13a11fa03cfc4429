#!/usr/bin/env bash
# Rerun both ablation sweeps (README.md, "Commands") and score every run's final checkpoint on
# the built-in tasks: results/<sweep>_tasks.md compares the task rankings with the loss ranking.
# About 40 minutes of wall time on 2 shared cores (the sweeps), plus a few minutes of scoring.
set -euo pipefail
cd "$(dirname "$0")/../.."
nice -n 10 gptlab-prepare
(OMP_NUM_THREADS=1 nice -n 10 gptlab-train experiment=attention_ablation &
 OMP_NUM_THREADS=1 nice -n 10 gptlab-train experiment=position_ablation & wait)
nice -n 10 python -m experiments.ablations.task_scores attention_ablation
nice -n 10 python -m experiments.ablations.task_scores position_ablation
