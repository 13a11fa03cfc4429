"""gptlab-scaling: fit scaling laws to a sweep's runs, test them on a held-out budget, and plot.

    gptlab-scaling                        # logs/scaling_law/default -> experiments/scaling_laws
    gptlab-scaling sweep_dir=logs/scaling_law/mine out_dir=elsewhere bootstrap=500
    gptlab-scaling runs_csv=experiments/scaling_laws/runs.csv     # refit the committed runs
    gptlab-scaling sweep_dir=logs/scaling_law_mup/mup_wsd/runs n_params=both out_dir=...

A sweep point may have several runs (seeds): each is a point of the fits, and the held-out
budget is compared with each point's mean over its seeds (gptlab.scaling.analyze).

Writes into `out_dir`: runs.csv (one row per finished run), fits.json, report.md, and the plots
isoflop.png, optimal.png, predicted.png and kaplan.png (with n_params=both, the second
convention's plots carry its name: isoflop_non_embedding.png, ...); the report and plots also go
to TensorBoard under `tensorboard_dir`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from gptlab.cli import CONFIG_DIR
from gptlab.cli.errors import report_user_errors
from gptlab.scaling.analyze import analyze


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="scaling")
def main(cfg: DictConfig) -> None:
    with report_user_errors("gptlab-scaling"):
        analyze(cfg)


if __name__ == "__main__":
    main()
