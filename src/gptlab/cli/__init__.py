"""Command-line tasks. Each is a plain function over a composed config (tests call it directly)
plus a thin `@hydra.main` wrapper that the console scripts in pyproject.toml point at."""

from pathlib import Path

# The configs live at the repository's top level (configs/), next to src/.
CONFIG_DIR = str(Path(__file__).resolve().parents[3] / "configs")
