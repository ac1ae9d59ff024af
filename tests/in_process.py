"""Run the app inside the test process (no interpreter start-up, no re-imports): for checks that
stop before or shortly after loading a model, where a subprocess would cost seconds for nothing."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

from conftest import REPO_ROOT
from fabricq.config import recipe_spelling


def compose_config(*overrides: str):
    """The config `python -m fabricq OVERRIDES` would run with (`+recipe=` read as `recipe=`, as
    the command line does)."""
    with initialize_config_dir(version_base=None, config_dir=str(REPO_ROOT / "conf")):
        return compose(config_name="config", overrides=[recipe_spelling(o) for o in overrides])


def run_app(*overrides: str) -> dict:
    from fabricq.app import run

    cfg = compose_config(*overrides)
    return run(cfg, Path(cfg.output_dir))
