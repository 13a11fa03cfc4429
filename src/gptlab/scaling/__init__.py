"""Scaling-law studies: compute-budgeted training runs and the power-law fits over them.

- `plan`: a FLOP budget and a model width -> model shape, steps and LR schedule of one run;
  the hook `gptlab-train` uses to skip finished runs and record N, D and C with each run.
- `fit`: Chinchilla approaches 2 (isoFLOP parabolas) and 3 (parametric L(N, D), Huber + L-BFGS),
  Kaplan's L(N, D), bootstrap confidence intervals.
- `analyze`: `gptlab-scaling`, which reads a sweep's runs, fits, holds out the largest budget,
  plots, and writes the report.
"""
