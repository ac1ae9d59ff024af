"""`python -m fabricq +recipe=gptq_w4 [overrides]`: the Hydra entry point."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from fabricq.sysmem import huge_pages_for_large_tensors

huge_pages_for_large_tensors()  # before anything imports torch

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from fabricq.errors import FabricqError  # noqa: E402


@hydra.main(version_base=None, config_path="pkg://fabricq.conf", config_name="config")
def _main(cfg: DictConfig) -> None:
    from fabricq.app import run
    from fabricq.runtime import rank_label, run_multirun_job_in_subprocess

    hydra_dir = Path(HydraConfig.get().runtime.output_dir)
    output_dir = Path(cfg.output_dir) if cfg.output_dir else hydra_dir
    try:
        if not run_multirun_job_in_subprocess(cfg, hydra_dir, output_dir):
            run(cfg, output_dir)
    except FabricqError as err:
        print(f"fabricq: error: {rank_label()}{err}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        if not rank_label():
            raise
        # Several ranks: say which one failed (the others stop at their next collective).
        print(f"fabricq: error: {rank_label()}failed: {type(err).__name__}: {err}", file=sys.stderr)
        raise
    finally:
        # Hydra creates its run directory up front; drop it if the run put nothing there
        # (output went to output_dir, or the run failed). Ranks may race to do it.
        if hydra_dir.is_dir() and not any(hydra_dir.iterdir()):
            try:
                hydra_dir.rmdir()
            except OSError:
                pass


def main() -> None:
    # Recipes are optional overlays, so Hydra only accepts `+recipe=NAME`; accept the plain
    # `recipe=NAME` users also type by rewriting it before Hydra parses the command line.
    sys.argv = [re.sub(r"^recipe=", "+recipe=", arg) for arg in sys.argv]
    _main()


if __name__ == "__main__":
    main()
