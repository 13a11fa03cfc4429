#!/usr/bin/env bash
# The finetuning study of experiments/finetune/README.md. From the repository root, after
# pretraining the checkpoint that init_from=last finds (the README's main command):
#   gptlab-prepare && gptlab-train
# One thread per run: on 2 shared cores that was faster than two competing threads.
set -euo pipefail
run() { OMP_NUM_THREADS=1 nice -n 10 gptlab-train trainer.enable_progress_bar=false "$@"; }

run experiment=classify init_from=last
run experiment=classify init_from=last finetune.method=lora optimizer.lr=3e-3
run experiment=classify init_from=null
run experiment=sft init_from=last
run experiment=sft init_from=last finetune.method=lora optimizer.lr=3e-3
run experiment=sft init_from=null
run experiment=classify init_from=last finetune.freeze_blocks=3
python experiments/finetune/collect.py logs/classify logs/sft
