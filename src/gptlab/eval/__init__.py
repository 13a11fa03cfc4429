"""What a model can do beyond its perplexity: zero-shot tasks scored by log-likelihood.

- `tasks`: the task schema (multiple choice, cloze) and loading from JSON lines or, through
  `datasets`, from the real benchmarks (HellaSwag, ARC-Easy, PIQA, LAMBADA).
- `builtin`: download-free tasks made from the held-out validation split of prepared data.
- `scoring`: batched log-likelihoods and the task metrics (acc, acc_norm, gold bits per byte,
  centred accuracy).
- `harness`: the `gptlab` model for lm-evaluation-harness (`pip install -e '.[eval]'`).
"""
