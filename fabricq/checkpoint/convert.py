"""One checkpoint format into the other without re-quantizing: the codes, scales and zero points
are the same numbers in the other layout. Where the other format cannot hold them exactly, it
refuses, naming the module."""

from __future__ import annotations

from pathlib import Path

import torch

from fabricq.checkpoint.compressed_tensors import write_compressed
from fabricq.checkpoint.engines import gptq_layout_problem
from fabricq.checkpoint.files import make_readable
from fabricq.checkpoint.gptq import write_gptq
from fabricq.checkpoint.load import Checkpoint, specs_of
from fabricq.errors import FabricqError


def to_gptq(checkpoint: Checkpoint, out: Path) -> None:
    for spec in specs_of(checkpoint):
        problem = gptq_layout_problem(spec)
        if problem:
            raise FabricqError(f"cannot convert to the GPTQ format: {problem}")
    linear = [n for n, m in checkpoint.meta_model.named_modules() if isinstance(m, torch.nn.Linear)]
    write_gptq(out, checkpoint.config, checkpoint.tensors, checkpoint.quantized, linear)


def to_compressed_tensors(checkpoint: Checkpoint, out: Path, dtype: torch.dtype) -> None:
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in checkpoint.tensors.items()}
    quantized = {}
    for name, qw in sorted(checkpoint.quantized.items()):
        if qw.scheme.actorder == "dynamic":
            raise FabricqError(
                f"cannot convert {name} to compressed-tensors: its act-order groups (desc_act with g_idx) are "
                "refused by compressed-tensors >= 0.19 (actorder 'group' was removed)"
            )
        if not torch.equal(qw.scale.to(dtype).float(), qw.scale):
            raise FabricqError(
                f"cannot convert {name} to compressed-tensors in {str(dtype).removeprefix('torch.')}: its scales are "
                "not exactly representable there (pass --dtype float32, or the scales' own dtype)"
            )
        quantized[name] = qw
    config = {**checkpoint.config, "dtype": str(dtype).removeprefix("torch.")}
    write_compressed(out, config, state, quantized, checkpoint.meta_model, dtype)
    make_readable(out)
