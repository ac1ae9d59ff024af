"""`python -m fabricq recipe=gptq_w4 [overrides]`: the Hydra entry point, and where every error a
user causes becomes one line `fabricq: error: …` with exit code 2 (a traceback only with
FABRICQ_DEBUG=1)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from fabricq.sysmem import huge_pages_for_large_tensors, import_without

huge_pages_for_large_tensors()  # before anything imports torch

from hydra import version  # noqa: E402
from hydra._internal.utils import _run_hydra, get_args_parser  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.errors import HydraException, MissingConfigException, OverrideParseException  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException  # noqa: E402

from fabricq.cli import debugging, fail  # noqa: E402
from fabricq.config import recipe_spelling, unknown_key_message  # noqa: E402
from fabricq.errors import FabricqError  # noqa: E402
from fabricq.output import check_resume_has_output_dir  # noqa: E402

DOCS_OVERRIDES = "https://hydra.cc/docs/advanced/override_grammar/basic"


def _task(cfg: DictConfig) -> None:
    from fabricq.config import load_settings

    hydra = HydraConfig.get()
    hydra_dir = Path(hydra.runtime.output_dir)
    try:
        check_one_scheme(hydra.runtime.choices)
        settings = load_settings(cfg)  # before the heavy imports: a config error is reported at once
        check_resume_has_output_dir(settings.resume, settings.output_dir, hydra_dir)
        import_without("lightning_fabric", ("torchmetrics",))  # before fabricq.runtime imports it
        import_without("transformers.modeling_utils", ("scipy",))  # before fabricq.models imports it
        from fabricq.app import run
        from fabricq.runtime import run_multirun_job_in_subprocess

        output_dir = Path(settings.output_dir) if settings.output_dir else hydra_dir
        if not run_multirun_job_in_subprocess(settings, hydra_dir, output_dir):
            run(cfg, output_dir, settings)
    except FabricqError as err:
        if debugging():  # main() lets it through with its traceback
            raise
        fail(f"{launched_rank_label()}{err}")
    except Exception as err:
        _task_errors.append(err)  # not Hydra's: main() lets it through with its traceback
        if launched_rank_label():  # several ranks: say which one failed (the others stop at their next collective)
            print(f"fabricq: error: {launched_rank_label()}failed: {type(err).__name__}: {err}", file=sys.stderr)
        raise
    finally:
        # Hydra creates its run directory (outputs/<time>) up front; drop it and the parents it
        # created if the run put nothing there (output went to output_dir, or the run failed).
        # Ranks may race to do it.
        cwd, folder = Path(hydra.runtime.cwd).resolve(), hydra_dir.resolve()
        while folder != cwd:
            try:
                folder.rmdir()  # only if empty
            except OSError:
                break
            folder = folder.parent
            if cwd not in folder.parents:
                break


def launched_rank_label() -> str:
    """'rank R/W: ' once ranks exist (fabricq.runtime is imported by then); a config error comes
    before that, and importing torch only to say so would delay every such error."""
    if "fabricq.runtime" not in sys.modules:
        return ""
    from fabricq.runtime import rank_label as label

    return label()


_task_errors: list[BaseException] = []


def check_one_scheme(choices) -> None:
    recipe, quant = choices.get("recipe"), choices.get("quant")
    if recipe is not None and recipe != quant:
        raise FabricqError(f"recipe={recipe} and quant={quant} choose different schemes: pass only one of them")


def hydra_error_line(err: BaseException) -> str:
    """Hydra's multi-line composition and parse errors, as one line that says what to do."""
    cause = err.__cause__
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options:
        group, _, name = err.missing_cfg_file.rpartition("/")
        return f"{group}={name}: there is no such {group} (available: {', '.join(err.options)})"
    if isinstance(err, OverrideParseException):
        key, _, value = err.override.partition("=")
        if not err.override.isascii():
            return (f"cannot read the override {err.override}: quote a value with non-ASCII characters, "
                    f"as {key}='{value}' (in a shell: \"{key}='{value}'\")")
        reason = str(cause).splitlines()[0] if cause else str(err).splitlines()[0]
        return (f"cannot read the override {err.override} ({reason}): quote a value with special characters, "
                f"as {key}='{value}' (see {DOCS_OVERRIDES})")
    full_key = getattr(cause, "full_key", None)
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and full_key and not full_key.startswith("hydra."):
        return unknown_key_message(full_key)
    if str(err).startswith("Multiple values for "):
        group = str(err).split()[3].rstrip(".")
        return f"{group} is already chosen in the defaults: write {group}=NAME, without the +"
    line = str(err).splitlines()[0]
    if isinstance(cause, OmegaConfBaseException):
        line += f": {full_key + ': ' if full_key else ''}{str(cause).splitlines()[0]}"
    return line


def main() -> None:
    version.setbase(None)
    parser = get_args_parser()
    args = parser.parse_args()
    if args.experimental_rerun is not None:
        fail("--experimental-rerun is not supported: run the same overrides again")
    args.overrides = [recipe_spelling(o) for o in args.overrides]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors instead of printing them: we do
    try:
        # What hydra.main does after reading sys.argv itself.
        _run_hydra(args=args, args_parser=parser, task_function=_task,
                   config_path="pkg://fabricq.conf", config_name="config")
    except (HydraException, OmegaConfBaseException) as err:
        if err in _task_errors or debugging():
            raise
        fail(hydra_error_line(err))
    finally:
        # A -m sweep that stopped at a failed job never reaches the summary callback's
        # on_multirun_end: summarize the jobs it did run (failed ones as failed rows).
        if "fabricq.summary" in sys.modules:  # imported only when Hydra instantiated the callback
            sys.modules["fabricq.summary"].summarize_interrupted_sweep()


if __name__ == "__main__":
    main()
