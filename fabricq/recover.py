"""`python -m fabricq.recover RUN_DIR +recovery=lora [overrides]`: recovery fine-tuning of an existing
fabricq output (LoRA / QLoRA adapters over its quantized weights, or the EoRA start alone).

The run's own resolved config (RUN_DIR/fabricq_config.yaml) says which model, text and
evaluation it used; `+recovery=NAME` picks a recovery config from conf/recovery/, and any other
override (`recovery.steps=400`, `trainer.devices=2`) replaces the run's value. Without
`+recovery=`, the run's own `recovery` section is used (a run started with `+recovery=…`).
The adapter goes to RUN_DIR/adapter/ and report.json gains a `recovery` section.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fabricq.cli import debugging, os_error_message
from fabricq.errors import FabricqError

log = logging.getLogger("fabricq")

USAGE = "usage: python -m fabricq.recover RUN_DIR [+recovery=lora|qlora|eora] [key=value ...]"
# Fabric's launcher re-runs the command line for the other ranks with the output folder appended;
# here the folder is RUN_DIR, so that override carries nothing.
IGNORED_KEYS = ("output_dir",)


def _conf_dir() -> str:
    from importlib.resources import files

    return str(files("fabricq.conf"))


def _parse(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except Exception as err:  # hydra's OverrideParseException
        raise FabricqError(f"cannot parse the overrides: {err}".splitlines()[0]) from None


def _drop_removed_keys(cfg: DictConfig) -> None:
    """Outputs of earlier releases saved settings that have since been removed or moved; none of
    them bears on recovery, so they are dropped instead of refused."""
    from fabricq.config import REMOVED

    for key in REMOVED:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if isinstance(node, DictConfig) and leaf in node:
            del node[leaf]


def compose_config(run_dir: Path, overrides: list[str]) -> DictConfig:
    """The run's config with the recovery section and the overrides applied."""
    from hydra import compose, initialize_config_dir

    from fabricq.recovery.base import check_run_dir

    check_run_dir(run_dir)
    try:
        run_cfg = OmegaConf.load(run_dir / "fabricq_config.yaml")
    except Exception as err:  # yaml's own errors (several lines: the first says what), bad bytes
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise FabricqError(f"RUN_DIR {run_dir} is corrupted: fabricq_config.yaml does not parse ({reason}); "
                           "rerun the quantization to rewrite it") from None
    if (not isinstance(run_cfg, DictConfig) or not isinstance(run_cfg.get("model"), DictConfig)
            or not isinstance(run_cfg.get("data"), DictConfig)):
        raise FabricqError(f"RUN_DIR {run_dir} is corrupted: fabricq_config.yaml is not a fabricq config "
                           "(no model and data sections)")
    parsed = _parse(overrides)
    picks_group = any(o.key_or_group == "recovery" for o in parsed)
    if not picks_group:
        method = OmegaConf.select(run_cfg, "recovery.method")
        if method is None:
            raise FabricqError(f"no recovery config: add +recovery=lora, +recovery=qlora or +recovery=eora ({USAGE})")
        overrides = [f"+recovery={method}", *overrides]
    try:
        with initialize_config_dir(version_base=None, config_dir=_conf_dir()):
            composed = compose(config_name="config", overrides=overrides)
    except Exception as err:  # hydra's ConfigCompositionException and friends
        options = getattr(err, "options", None)
        missing = getattr(err, "missing_cfg_file", None) or ""
        if options and missing.startswith("recovery/"):
            raise FabricqError(f"+recovery={missing.removeprefix('recovery/')}: there is no such recovery config "
                               f"(available: {', '.join(sorted(options))})") from None
        raise FabricqError(f"bad override: {str(err).splitlines()[0]}") from None
    try:
        cfg = OmegaConf.create(OmegaConf.to_container(run_cfg, resolve=True))
    except Exception as err:  # an interpolation that does not resolve
        raise FabricqError(f"RUN_DIR {run_dir} is corrupted: fabricq_config.yaml: {str(err).splitlines()[0]}") from None
    OmegaConf.set_struct(cfg, False)
    _drop_removed_keys(cfg)
    cfg.recovery = composed.recovery if picks_group else run_cfg.recovery
    for o in parsed:
        key = o.key_or_group
        if o.is_sweep_override():
            raise FabricqError(f"sweeps are not supported by fabricq.recover: {o.input_line}")
        if key == "recovery" or key in IGNORED_KEYS or key.startswith("hydra"):
            continue
        OmegaConf.update(cfg, key, OmegaConf.select(composed, key), merge=False, force_add=True)
    return cfg


def recover_after_run(cfg: DictConfig, output_dir: Path, report: dict) -> dict:
    """The recovery step of `python -m fabricq … +recovery=NAME`, once the run's output is
    published: `python -m fabricq.recover OUTPUT` in a fresh process tree (the run's ranks are
    gone, and the recovery launches its own from `trainer.*`), which reads the recovery section
    from the run's saved config. Returns the run's report with the `recovery` section."""
    import json

    if cfg.get("recovery") is None:
        return report
    from fabricq.recovery.publish import LOCK_HELD_ENV

    command = [sys.executable, "-m", "fabricq.recover", str(Path(output_dir).resolve())]
    log.info("Recovery: %s", " ".join(command[1:]))
    # This run still holds the output's lock: the recovery works under it (fabricq.recovery.publish).
    completed = subprocess.run(command, env={**os.environ, LOCK_HELD_ENV: str(os.getpid())})
    if completed.returncode != 0:
        raise FabricqError(f"recovery of {output_dir} failed (exit code {completed.returncode}); the quantized "
                           f"output is complete: rerun it with python -m fabricq.recover {output_dir}")
    return json.loads((Path(output_dir) / "report.json").read_text())


def main(argv: list[str] | None = None) -> None:
    from fabricq.sysmem import huge_pages_for_large_tensors

    huge_pages_for_large_tensors()  # before torch is imported, as `python -m fabricq` does
    from fabricq.runtime import rank_label

    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(f"{USAGE}\n\n{__doc__.strip()}")
        return
    positional = [a for a in args if "=" not in a and not a.startswith("-")]
    overrides = [a for a in args if a not in positional]
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        options = [a for a in overrides if a.startswith("-") and "=" not in a]
        if options:
            raise FabricqError(f"unknown option {options[0]}: fabricq.recover takes RUN_DIR and key=value overrides "
                               f"({USAGE})")
        if len(positional) != 1:
            raise FabricqError(f"expected one RUN_DIR, got {len(positional)} ({USAGE})")
        run_dir = Path(positional[0]).expanduser()
        cfg = compose_config(run_dir, overrides)
        from fabricq.sysmem import import_without

        # As `python -m fabricq`: what Fabric's version checks and transformers import and fabricq
        # never calls stays out (memory, and start-up time each further rank adds in series).
        import_without("lightning_fabric", ("torchmetrics",))
        import_without("transformers.modeling_utils", ("scipy",))
        from fabricq.recovery.run import recover

        recover(run_dir, cfg)
    except FabricqError as err:
        if debugging():
            raise
        print(f"fabricq: error: {rank_label()}{err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if debugging():
            raise
        print(f"fabricq: error: {rank_label()}interrupted: nothing was published; rerun the same command to continue "
              "from the last recovery checkpoint", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        # What the user's system refuses (permissions, a full disk, a read-only file system): one
        # line that names the path, as every fabricq command says it (fabricq.cli); anything else
        # is a bug and keeps its traceback.
        from fabricq.output import out_of_space

        if debugging():
            raise
        if isinstance(err, OSError) and err.errno in USER_ERRNOS:
            message = os_error_message(err)
        elif out_of_space(err):  # a library's own error type around ENOSPC (safetensors, torch.save)
            message = "no space left on device: free space and rerun (the recovery resumes from its last checkpoint)"
        else:
            raise
        print(f"fabricq: error: {rank_label()}{message}", file=sys.stderr)
        sys.exit(2)


USER_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG, errno.ELOOP,
               errno.ENOTDIR, errno.EISDIR}


if __name__ == "__main__":
    main()
