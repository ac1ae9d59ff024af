"""Where fabricq keeps what it computes once and reuses across runs: `FABRICQ_CACHE`, by default
~/.cache/fabricq. It holds the default model converted from GGUF and the original models'
evaluation references (`fabricq.eval_cache`)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_FOLDER = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    return Path(os.environ.get("FABRICQ_CACHE") or Path.home() / ".cache" / "fabricq")


def default_model_cache() -> Path:
    """The Hugging Face folder the default (GGUF) model is converted into, once."""
    return cache_root() / DEFAULT_MODEL_FOLDER
