"""What `python -m fabricq.inspect` reports on a checkpoint: schemes per module group, size on
disk against the same model unquantized, each engine's verdict."""

from __future__ import annotations

from collections import defaultdict

import torch

from fabricq.checkpoint.engines import ENGINES, engine_verdict
from fabricq.checkpoint.load import checkpoint_dtype, dtype_name, load_checkpoint, specs_of


def inspect_checkpoint(path, engines=None, tp: int = 1) -> dict:
    """Everything the command prints, as a dict (`verdicts` as engines.Verdict objects)."""
    checkpoint = load_checkpoint(path)
    dtype = checkpoint_dtype(checkpoint)
    specs = specs_of(checkpoint)
    groups: dict[tuple, list[str]] = defaultdict(list)
    for spec in specs:
        groups[(spec.suffix, spec.bits, spec.symmetric, spec.group_size, spec.actorder)].append(spec.name)
    files = sorted(f for f in checkpoint.path.iterdir() if f.is_file())
    size = sum(f.stat().st_size for f in files)
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    params = remove_tied_weights_from_state_dict(checkpoint.meta_model.state_dict(), checkpoint.meta_model)
    unquantized = sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
                      for t in params.values())
    linear = [n for n, m in checkpoint.meta_model.named_modules() if isinstance(m, torch.nn.Linear)]
    return {
        "path": str(checkpoint.path),
        "format": checkpoint.fmt,
        "dtype": dtype_name(dtype),
        "quantized_modules": len(specs),
        "unquantized_linear": [n for n in linear if n not in checkpoint.quantized],
        "schemes": [{"modules": suffix, "count": len(names), "bits": bits, "symmetric": sym, "group_size": group,
                     "actorder": actorder} for (suffix, bits, sym, group, actorder), names in sorted(groups.items())],
        "tensors_checked": checkpoint.tensor_count,
        "size_bytes": size,
        "unquantized_bytes": unquantized,
        "ratio": size / unquantized if unquantized else float("nan"),
        "tp": tp,
        "verdicts": [engine_verdict(e, checkpoint.fmt, specs, dtype, tp) for e in (engines or ENGINES[1:])],
    }
