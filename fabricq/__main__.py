"""`python -m fabricq +recipe=gptq_w4 [overrides]`: the Hydra entry point."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fabricq.errors import FabricqError


@hydra.main(version_base=None, config_path="conf", config_name="config")
def _main(cfg: DictConfig) -> None:
    from fabricq.app import run

    hydra_dir = Path(HydraConfig.get().runtime.output_dir)
    output_dir = Path(cfg.output_dir) if cfg.output_dir else hydra_dir
    try:
        run(cfg, output_dir)
    except FabricqError as err:
        print(f"fabricq: error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        # Hydra creates its run directory up front; drop it if the run put nothing there
        # (output went to output_dir, or the run failed).
        if hydra_dir.is_dir() and not any(hydra_dir.iterdir()):
            hydra_dir.rmdir()


def main() -> None:
    # Recipes are optional overlays, so Hydra only accepts `+recipe=NAME`; accept the plain
    # `recipe=NAME` users also type by rewriting it before Hydra parses the command line.
    sys.argv = [re.sub(r"^recipe=", "+recipe=", arg) for arg in sys.argv]
    _main()


if __name__ == "__main__":
    main()
