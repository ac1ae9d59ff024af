"""report.json as strict JSON: no `NaN` / `Infinity` tokens, which Python's json module writes by
default and most other JSON readers (jq, JavaScript, Go, serde) refuse.

A non-finite figure is written as `null`, and the dict that holds it gains `<key>_reason` saying
what the value was (`"NaN"`, `"Infinity"`, `"-Infinity"`), so a reader can tell a figure that was
not measured (null alone) from one that could not be represented.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def _word(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def _is_bad(value) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def finite_only(data):
    """`data` with every non-finite float replaced by None; a dict holding one gains
    `<key>_reason` (for a list, the indices: `"NaN at [3], Infinity at [5]"`)."""
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            if _is_bad(value):
                out[key] = None
                out[f"{key}_reason"] = f"not finite: {_word(value)}"
                continue
            if isinstance(value, (list, tuple)) and any(_is_bad(v) for v in value):
                bad = [f"{_word(v)} at [{i}]" for i, v in enumerate(value) if _is_bad(v)]
                out[f"{key}_reason"] = f"not finite: {', '.join(bad[:8])}{' …' if len(bad) > 8 else ''}"
            out[key] = finite_only(value)
        return out
    if isinstance(data, (list, tuple)):
        return [None if _is_bad(v) else finite_only(v) for v in data]
    return data


def dumps(data, **kwargs) -> str:
    """Strict JSON text of `data` (non-finite floats as null + reason, `allow_nan=False`)."""
    return json.dumps(finite_only(data), allow_nan=False, **kwargs)


def write_atomic(path: Path, data, **kwargs) -> None:
    """Write `path` as strict JSON through a temporary file renamed over it (readers see the old
    or the new file, never a torn one)."""
    path = Path(path)
    text = dumps(data, **kwargs)
    hidden = path.name if path.name.startswith(".") else f".{path.name}"
    tmp = path.with_name(f"{hidden}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
