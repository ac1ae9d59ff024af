"""`recovery.merge=true`: the trained adapter folded into the base and re-quantized on the
exported grid, written as a compressed-tensors model of its own.

For every adapted module the merged weight is W_m = dequant(W_q) + s·B·A. It is quantized again
with the exported module's own grid: the same scales, zero points and groups (g_idx), only the
codes change, chosen by GPTQ (column by column, each column's rounding error spread over the
columns not yet quantized through the inverse Hessian's Cholesky factor, in the act-order the
export used). The Hessians are those of the EoRA start (`eora.layerwise_hessians`: the first
`recovery.eora_samples` calibration windows, one decoder layer at a time), taken here of the
inputs the merged model itself gives each layer: a layer is re-quantized, then forwarded again
for the next one (true-sequential, as the run's GPTQ).

Keeping the grid means the merged checkpoint differs from the run's in its codes alone, and a
code can move only where the adapter's correction, accumulated with the rounding errors before
it, crosses half a quantization step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from fabricq.quant.gptq import (
    PackedQuantizedWeight,
    QuantizedWeight,
    gptq_solve,
    prepare_hessian,
)
from fabricq.recovery.eora import layerwise_hessians

log = logging.getLogger("fabricq")

MERGED_DIR = "merged"
BLOCK = 128  # columns per lazy-update block, as the run's GPTQ


def requantize_on_grid(weight: torch.Tensor, grid: PackedQuantizedWeight | QuantizedWeight, hessian: torch.Tensor, *,
                       damp: float = 0.01) -> QuantizedWeight:
    """GPTQ of `weight` (rows, columns) on the fixed grid of `grid` (its scales, zero points and
    g_idx are kept; new codes): `gptq_solve` with `grid=`. The solve order is the grid's act-order
    (descending diag H unless it was solved in natural order); where no damping makes H positive
    definite, each weight is rounded to its nearest grid point."""
    order = "none" if grid.scheme.actorder == "none" else "dynamic"  # only the permutation is used
    scheme = replace(grid.scheme, actorder=order)
    prepared = prepare_hessian(hessian.float(), order, damp=damp)
    result = gptq_solve(weight, prepared, scheme, block_size=BLOCK, grid=(grid.scale, grid.zero, grid.g_idx))
    method = "gptq-merge" if prepared.upper is not None else "rtn-merge"
    return replace(result, scheme=grid.scheme, info={**result.info, "method": method})


@torch.no_grad()
def merge_adapters(model: nn.Module, modules: dict, grids: dict, windows: torch.Tensor, *, batch_size: int, device,
                   damp: float = 0.01, reduce=None) -> dict[str, PackedQuantizedWeight]:
    """Fold each adapter of `modules` (name → LoRALinear inside `model`) into its base and
    re-quantize it on the grid of `grids[name]`; afterwards every module computes with its merged
    codes and a zero adapter (the model is the merged model). Returns the merged codes by name."""
    merged: dict[str, PackedQuantizedWeight] = {}
    tick = time.perf_counter()

    def merge_layer(index: int, names: list[str], groups) -> bool:
        for group, hessian in groups:
            for name in group:
                module = modules[name]
                target = module.base_weight(torch.float32) + module.delta_weight().float()
                result = requantize_on_grid(target, grids[name], hessian, damp=damp).packed()
                module.set_base(result)
                module.set_adapter(torch.zeros_like(module.lora_A), torch.zeros_like(module.lora_B))
                merged[name] = result
        log.info("Merge: layer %d re-quantized · %.1f s", index + 1, time.perf_counter() - tick)
        return True  # the next layer's Hessians are of the merged layer's outputs

    layerwise_hessians(model, modules, windows, batch_size=batch_size, device=device, on_layer=merge_layer,
                       reduce=reduce)
    missing = sorted(set(modules) - set(merged))
    if missing:  # a module outside the decoder layers (never reached by the layer loop)
        raise RuntimeError(f"merge: {missing[0]} is not inside a decoder layer")
    return merged


def restore_linear(model: nn.Module, modules: dict, dtype: torch.dtype) -> None:
    """Put plain Linear modules back in place of the adapters (weight = the base's dequantized
    codes, in `dtype`), so the model is an ordinary transformers model the export writer reads."""
    for name, module in modules.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        linear.weight = nn.Parameter(module.base_weight(dtype).detach(), requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
        setattr(parent, child, linear)


def write_merged(model: nn.Module, merged: dict, folder: Path, tokenizer, export) -> list[str]:
    """The run's own writer (`fabricq.checkpoint.save.save_checkpoints`) into `folder`."""
    from fabricq.checkpoint.save import save_checkpoints

    return save_checkpoints(model, merged, folder, tokenizer, export)
