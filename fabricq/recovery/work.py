"""The recovery's work folder `<parent>/.<RUN_DIR name>.recovery/` and what it may be resumed for.

It holds the teacher's targets, the evaluation reference and the training checkpoints, all
derived from the quantized base (RUN_DIR's checkpoint), the teacher (the original model), the
recovery text and the recovery settings. `identity.json` records those, the way the main
command's resume directory records its run (`fabricq.resume`): files by size and a hash of
their content (`model_identity`), the recovery windows by sha256, the settings (with the rank
count and the adapted modules) as they are. A folder of another identity is never resumed from:
with resume=auto (the default) it is discarded with a warning that says what changed (its state
belongs to inputs that are gone or were changed on purpose, and no rerun could finish it onto
these); with resume=true the recovery refuses and offers resume=false; resume=false always
starts over.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from fabricq.errors import FabricqError
from fabricq.models import ModelSource
from fabricq.resume import data_identity, identity_differences, model_identity

log = logging.getLogger("fabricq")

FORMAT = 1
IDENTITY_FILE = "identity.json"
PARTS = {"base": "another quantized base (RUN_DIR's checkpoint changed)",
         "teacher": "another original model (model.path's files changed)",
         "data": "other recovery text", "settings": "other recovery settings", "format": "an earlier release"}
# Settings that cannot change the trained adapter: a recovery may be resumed with other values.
IGNORED_TRAIN = ("checkpoint_every", "log_every")
IGNORED_PLAN = ("data_path", "merge")  # the text is identified by its windows; a merge follows training


def recovery_work_dir(run_dir: Path) -> Path:
    return run_dir.parent / f".{run_dir.name}.recovery"


def recovery_identity(run_dir: Path, teacher, windows: torch.Tensor | None, plan, targets: list[str], world: int,
                      dtype: str) -> dict:
    """What a recovery's intermediate state depends on (see the module's docstring)."""
    settings = asdict(plan)
    for key in IGNORED_PLAN:
        settings.pop(key, None)
    for key in IGNORED_TRAIN:
        settings["train"].pop(key, None)
    settings.update(targets=list(targets), world_size=world, model_dtype=dtype)
    return {
        "format": FORMAT,
        "base": model_identity(ModelSource(Path(run_dir))),
        "teacher": model_identity(teacher),
        "data": None if windows is None else data_identity(windows),
        "settings": json.loads(json.dumps(settings, default=list)),  # tuples as lists, as read back
    }


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def changed_parts(old: dict | None, new: dict) -> list[str]:
    if old is None:
        return ["format"]
    return [part for part in new if old.get(part) != new[part]]


def describe(old: dict | None, new: dict) -> str:
    parts = changed_parts(old, new)
    words = [PARTS[p] for p in parts]
    if "settings" in parts and old is not None:
        # recovery.train.lr is spelled recovery.lr on the command line
        diff = [d.replace("recovery.train.", "recovery.", 1)
                for d in identity_differences(old.get("settings") or {}, new["settings"], "recovery.")]
        if diff:
            words[parts.index("settings")] += f" ({'; '.join(diff[:3])})"
    return ", ".join(words)


def has_state(work: Path) -> bool:
    return work.is_dir() and any(p.name != IDENTITY_FILE for p in work.iterdir())


def check_work(work: Path, identity: dict, resume) -> str | None:
    """Every rank: None when the work folder is new or of this identity; else why it is not,
    after refusing a resume=true that cannot resume. Nothing is changed."""
    if not has_state(work):
        return None
    old = _read(work / IDENTITY_FILE)
    if resume is False:
        return "resume=false"
    if old == identity:
        return None
    why = describe(old, identity)
    if resume is True:
        raise FabricqError(f"resume=true, but the unfinished recovery in {work} is of {why}: pass resume=false "
                           "(or leave resume=auto) to start it over")
    return why


def prepare_work(work: Path, identity: dict, discard_because: str | None) -> None:
    """Rank 0: empty the work folder when it is not to be resumed from, and record `identity`."""
    if discard_because is not None:
        if discard_because == "resume=false":
            log.info("Discarding the unfinished recovery in %s (resume=false)", work)
        else:
            log.warning("Starting the recovery over: the unfinished one in %s is of %s", work, discard_because)
        for child in work.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    work.mkdir(parents=True, exist_ok=True)
    tmp = work / f".{IDENTITY_FILE}.tmp"
    tmp.write_text(json.dumps(identity, indent=1, sort_keys=True))
    tmp.replace(work / IDENTITY_FILE)
