"""Folded act-order: permutations of a layer's hidden channels that leave its function unchanged,
chosen so that a module solved in act-order ends with contiguous groups.

Two places in a Llama-style decoder layer have input channels that can be reordered without
touching the residual stream:

- the MLP's intermediate channels: act(gate(x)) · up(x) is elementwise per channel, so permuting
  the rows of gate_proj and up_proj and the columns of down_proj by the same permutation gives
  the same output. down_proj is solved in its act-order with groups following the solve order
  (as `actorder=dynamic`); ordering its columns by group (`fold_permutation`) then makes the
  groups contiguous.
- the attention's value channels within a head: attention mixes tokens, never channels, so a
  permutation of head_dim applied to v_proj's rows of one KV head and to o_proj's columns of
  every query head reading that KV head (GQA) is exact. q/k cannot be permuted (RoPE pairs their
  channels). o_proj is solved in the order `head_order` gives, groups contiguous in that order.

Everything here is pure index arithmetic on tensors: no model, no framework.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fabricq.quant.gptq import PackedQuantizedWeight
from fabricq.quant.packing import pack_int32


@dataclass(frozen=True)
class HeadLayout:
    """How o_proj's input columns and v_proj's output rows are laid out in heads."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    def kv_head_of(self, head: int) -> int:
        # transformers' repeat_kv: KV head k serves query heads k·n … k·n + n - 1.
        return head // (self.num_heads // self.num_kv_heads)


def head_order(diagonal: torch.Tensor, layout: HeadLayout) -> torch.Tensor:
    """o_proj's solve order (num_heads · head_dim,): within every query head, its columns by
    descending importance, the same order for all query heads of a KV head: o_proj's Hessian
    diagonal summed over those heads (stable: ties keep their index order)."""
    hd = layout.head_dim
    per_head = diagonal.reshape(layout.num_heads, hd)
    order = torch.empty(layout.num_heads, hd, dtype=torch.long, device=diagonal.device)
    for kv in range(layout.num_kv_heads):
        heads = [h for h in range(layout.num_heads) if layout.kv_head_of(h) == kv]
        within = torch.argsort(per_head[heads].sum(0), descending=True, stable=True)
        for h in heads:
            order[h] = h * hd + within
    return order.reshape(-1)


def fold_permutation(g_idx: torch.Tensor) -> torch.Tensor:
    """The column order that makes a result's groups contiguous: columns sorted by group, in
    their index order within a group (a canonical choice: it depends on g_idx alone, so every
    rank and a resumed run derive the same one from the same result)."""
    return torch.argsort(g_idx.long().cpu(), stable=True)


def value_permutation(column_perm: torch.Tensor, layout: HeadLayout) -> torch.Tensor:
    """v_proj's row permutation (num_kv_heads · head_dim,) matching a permutation of o_proj's
    columns; ValueError unless that permutation keeps every head's block and is the same within
    all query heads of a KV head (only then is the fold exact)."""
    hd = layout.head_dim
    within = column_perm.reshape(layout.num_heads, hd) - torch.arange(layout.num_heads).unsqueeze(1) * hd
    if bool((within < 0).any() or (within >= hd).any()):
        raise ValueError("the permutation moves columns across heads")
    rows = torch.empty(layout.num_kv_heads, hd, dtype=torch.long)
    seen = [False] * layout.num_kv_heads
    for h in range(layout.num_heads):
        kv = layout.kv_head_of(h)
        if not seen[kv]:
            rows[kv], seen[kv] = within[h], True
        elif not torch.equal(rows[kv], within[h]):
            raise ValueError(f"query heads of KV head {kv} would need different permutations")
    return (rows + torch.arange(layout.num_kv_heads).unsqueeze(1) * hd).reshape(-1)


def contiguous_g_idx(columns: int, group_size: int) -> torch.Tensor:
    if group_size == -1:
        return torch.zeros(columns, dtype=torch.int32)
    return (torch.arange(columns) // group_size).to(torch.int32)


def permute_result_rows(result, perm: torch.Tensor):
    """A quantized weight with its output rows reordered: each row carries its own codes, scales
    and zero points, so this is exact (packed codes are packed along the columns: rows move whole)."""
    perm = perm.to(torch.long)
    if isinstance(result, PackedQuantizedWeight):
        return replace(result, packed_codes=result.packed_codes.index_select(0, perm),
                       scale=result.scale.index_select(0, perm), zero=result.zero.index_select(0, perm),
                       info=dict(result.info))
    return replace(result, codes=result.codes.index_select(0, perm), scale=result.scale.index_select(0, perm),
                   zero=result.zero.index_select(0, perm), info=dict(result.info))


def permute_result_columns(result, perm: torch.Tensor):
    """A quantized weight with its input columns reordered (codes and g_idx move; the per-group
    scales and zero points stay), in the form it came in (packed or not)."""
    perm = perm.to(torch.long)
    codes = result.codes.index_select(1, perm)
    g_idx = result.g_idx.index_select(0, perm)
    if isinstance(result, PackedQuantizedWeight):
        return replace(result, packed_codes=pack_int32(codes, result.scheme.bits), g_idx=g_idx, info=dict(result.info))
    return replace(result, codes=codes, g_idx=g_idx, info=dict(result.info))


def as_contiguous_groups(result, actorder: str = "static"):
    """`result` (its groups already contiguous) relabelled with `actorder`; ValueError if its
    g_idx is not contiguous groups of its group size."""
    columns = result.g_idx.numel()
    expected = contiguous_g_idx(columns, result.scheme.group_size)
    if not torch.equal(result.g_idx.to(torch.int32).cpu(), expected):
        raise ValueError("groups are not contiguous after the fold")
    return replace(result, g_idx=expected, scheme=replace(result.scheme, actorder=actorder), info=dict(result.info))
