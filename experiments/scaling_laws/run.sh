#!/usr/bin/env bash
# The scaling-law study, end to end (see README.md here). Re-running skips finished runs.
set -euo pipefail
cd "$(dirname "$0")/../.."

# ~10 MB of text: the built-in corpus plus the docstrings of the installed packages.
gptlab-prepare corpus=builtin_site tokenizer.vocab_size=512

# Budgets x widths as a Hydra multirun, one run at a time, on one thread: on a busy 2-core
# machine a training step of the 33k-parameter model took 9 ms of CPU on one thread and 380 ms
# on two (the threads wait for each other at every op).
OMP_NUM_THREADS=1 gptlab-train -m experiment=scaling_law

# Fits, held-out test, plots and report into experiments/scaling_laws/.
gptlab-scaling
