"""fabricq: fast GPTQ compression of large language models with Lightning Fabric and Hydra.

`fabricq.quantize(model, calibration_ids, recipe=..., overrides=[...], fabric=...)` is the Python
API (`fabricq.api`), loaded on first use: `python -m fabricq` reports a bad config before torch
is imported."""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("quantize", "QuantizeResult"):
        from fabricq import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
