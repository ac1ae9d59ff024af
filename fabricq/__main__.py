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

    output_dir = Path(cfg.output_dir or HydraConfig.get().runtime.output_dir)
    try:
        run(cfg, output_dir)
    except FabricqError as err:
        print(f"fabricq: error: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    # Recipes are optional overlays, so Hydra only accepts `+recipe=NAME`; accept the plain
    # `recipe=NAME` users also type by rewriting it before Hydra parses the command line.
    sys.argv = [re.sub(r"^recipe=", "+recipe=", arg) for arg in sys.argv]
    _main()


if __name__ == "__main__":
    main()
