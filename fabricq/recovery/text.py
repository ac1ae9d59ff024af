"""The recovery's training text: windows of recovery.seq_len tokens from recovery.data.path, or
from the run's calibration source with its held-out split (never the evaluation text)."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from fabricq.data import prepare_text
from fabricq.errors import FabricqError
from fabricq.recovery.settings import RecoveryPlan


def recovery_text(tokenizer, cfg: DictConfig, s: RecoveryPlan, windows_needed: int) -> torch.Tensor:
    """`windows_needed` windows of recovery.seq_len tokens from recovery.data.path, or else from the
    run's calibration source with the run's held-out split (so never the evaluation text)."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    ev = OmegaConf.to_container(cfg.eval, resolve=True)
    path = s.data_path
    if path is not None and cfg.eval.path is not None and Path(path).resolve() == Path(cfg.eval.path).resolve():
        raise FabricqError(f"recovery.data.path is the evaluation text ({cfg.eval.path}): recover on other text")
    if path is not None and data.get("path") is not None and Path(path).resolve() == Path(data["path"]).resolve():
        path = None  # the calibration source itself: keep its held-out split
    held_out = path is None and ev["enabled"] and ev["path"] is None
    data.update(num_samples=windows_needed, seq_len=s.seq_len, **({"path": path} if path is not None else {}))
    ev["enabled"] = held_out
    if path is not None:  # a text of its own: all of it is recovery text (no documents held out for evaluation)
        ev["path"] = path
    try:
        return prepare_text(tokenizer, OmegaConf.create(data), OmegaConf.create(ev)).calibration
    except FabricqError as err:
        if not str(err).startswith("calibration text is too short"):  # unreadable or unusable text
            where = f"recovery.data.path={path}" if path is not None else f"data.path={data.get('path')}"
            raise FabricqError(f"recovery text ({where}): {err}") from None
        per_step = windows_needed // max(1, s.train.steps)
        source = "recovery.data.path" if path is not None else "data.path (its calibration part)"
        raise FabricqError(f"recovery text is too short: recovery.steps={s.train.steps} × {per_step} windows per step "
                           f"need {windows_needed} windows of recovery.seq_len={s.seq_len} from {source}; "
                           f"{err}") from None
