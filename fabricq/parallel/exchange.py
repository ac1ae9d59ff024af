"""Collectives of a multi-rank run: Hessian payloads, result buffers and broadcasts, gathered totals."""

from __future__ import annotations

import math

import torch

from fabricq.quant.gptq import PackedQuantizedWeight, QuantizedWeight
from fabricq.quant.packing import packed_width


def _triu_indices(n: int, device) -> torch.Tensor:
    return torch.triu_indices(n, n, device=device)


def pack_upper(matrix: torch.Tensor) -> torch.Tensor:
    """The upper triangle (with diagonal) of a square matrix as a flat vector."""
    i, j = _triu_indices(matrix.shape[0], matrix.device)
    return matrix[i, j]


def unpack_upper(flat: torch.Tensor, n: int) -> torch.Tensor:
    """Symmetric matrix from `pack_upper`'s vector (the lower triangle mirrors the upper)."""
    i, j = _triu_indices(n, flat.device)
    out = torch.empty(n, n, dtype=flat.dtype, device=flat.device)
    out[i, j] = flat
    out[j, i] = flat
    return out


def reduction_payload(acc, upper_triangle: bool) -> torch.Tensor:
    """What a rank sends of a Hessian accumulator: its raw sum (reduced in place), or with
    `upper_triangle` only one triangle of it. The raw sum is exact on and below the diagonal, so
    the triangle sent is the lower one, read as the upper triangle of the transpose."""
    return pack_upper(acc.raw.T) if upper_triangle else acc.raw


def groups_of(scheme, in_features: int) -> int:
    return 1 if scheme.group_size == -1 else math.ceil(in_features / scheme.group_size)


def result_buffers(rows: int, cols: int, groups: int, device, packed_bits: int | None = None) -> dict[str, torch.Tensor]:
    """Receive buffers of one module's result; `packed_bits`: its codes travel packed as held."""
    if packed_bits:
        codes = {"packed_codes": torch.empty(rows, packed_width(cols, packed_bits), dtype=torch.int32, device=device)}
    else:
        codes = {"codes": torch.empty(rows, cols, dtype=torch.int8, device=device)}
    return {
        **codes,
        "scale": torch.empty(rows, groups, dtype=torch.float32, device=device),
        "zero": torch.empty(rows, groups, dtype=torch.float32, device=device),
        "g_idx": torch.empty(cols, dtype=torch.int32, device=device),
    }


def held_result_parts(qw) -> dict[str, torch.Tensor]:
    """What travels of a result as `GPTQCallback.install` holds it (codes packed below 8 bits:
    half the bytes, and no unpacking)."""
    codes = {"packed_codes": qw.packed_codes} if isinstance(qw, PackedQuantizedWeight) else {"codes": qw.codes}
    return {**codes, "scale": qw.scale, "zero": qw.zero, "g_idx": qw.g_idx}


def result_from(parts: dict[str, torch.Tensor], cols: int, scheme, info: dict):
    cpu = {k: v.cpu() for k, v in parts.items()}
    if "packed_codes" in cpu:
        return PackedQuantizedWeight(cpu["packed_codes"], cols, cpu["scale"], cpu["zero"], cpu["g_idx"], scheme, info)
    return QuantizedWeight(cpu["codes"], cpu["scale"], cpu["zero"], cpu["g_idx"], scheme, info)


def gather_totals(fabric, callback) -> dict:
    """Bytes sent, summed over ranks (reduce payloads to other owners, broadcasts a rank sourced,
    metadata), and each rank's CPU seconds so far (how evenly the work was shared)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    mine = {"bytes": callback.bytes, "cpu_s": usage.ru_utime + usage.ru_stime}
    parts = [None] * fabric.world_size
    torch.distributed.all_gather_object(parts, mine)
    return {
        "bytes_sent": {k: sum(p["bytes"][k] for p in parts) for k in parts[0]["bytes"]},
        "cpu_s_per_rank": [round(p["cpu_s"], 2) for p in parts],
    }


def agreed_finished_layer(finished: int | None, device) -> int | None:
    """With several ranks: the last layer that every rank finished (a peer is at most one commit
    step behind, and each rank keeps the markers and hidden states from the layer before its
    latest step on: `WorkDirectory.release_older`)."""
    value = torch.tensor([-1 if finished is None else finished], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    agreed = int(value.item())
    return None if agreed < 0 else agreed
