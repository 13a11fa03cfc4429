"""Scaling-law studies: compute-budgeted training runs and the power-law fits over them.

- `plan`: a FLOP budget and a model width -> model shape, steps and LR schedule of one run, a
  pure function of the config and the data's manifest that `gptlab-train` applies before
  building anything; and the run's record (skip finished runs, record N, D and C).
- `fit`: Chinchilla approaches 2 (isoFLOP parabolas) and 3 (parametric L(N, D), Huber + L-BFGS),
  Kaplan's L(N, D), bootstrap confidence intervals.
- `analyze`: what `gptlab-scaling` (gptlab.cli.scaling) does: read a sweep's runs, fit, hold
  out the largest budget, plot, and write the report.
"""
