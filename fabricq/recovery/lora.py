"""LoRA on a quantized Linear: y = dequant(W_q)·x + s·B·(A·x), s = alpha / rank; the base is
frozen, only A (rank, in) and B (out, rank) train.

Two ways to hold the base, the same arithmetic: `lora` keeps the dequantized weight; `qlora`
keeps the packed codes, scales, zero points and groups as exported and dequantizes inside every
forward and again inside the backward (`_PackedLinear`), so no dense weight outlives one module's
product (base weights at about bits/16 of their dense size, the QLoRA memory profile). The adapter
path follows PEFT's `lora.Linear` (dropout on its input, then A, then B, times s), so an adapter
trained here behaves the same once PEFT loads it.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from fabricq.errors import FabricqError
from fabricq.quant.gptq import PackedQuantizedWeight, QuantizedWeight
from fabricq.quant.grid import dequantize_groups
from fabricq.quant.packing import unpack_int32

MODES = ("lora", "qlora")


class _PackedLinear(torch.autograd.Function):
    """x·dequant(W)ᵀ whose backward dequantizes W again instead of keeping it from the forward:
    autograd would otherwise hold every module's dense weight until the backward reaches it."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        return F.linear(x, module.base_weight(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.module.base_weight(grad.dtype), None


class LoRALinear(nn.Module):
    """A quantized Linear (codes, scale, zero, g_idx) with a trainable low-rank correction."""

    def __init__(self, quantized: QuantizedWeight | PackedQuantizedWeight, *, rank: int, alpha: float,
                 dropout: float = 0.0, mode: str = "lora", dtype: torch.dtype = torch.float32,
                 bias: torch.Tensor | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.out_features, self.in_features = quantized.shape
        self.mode, self.rank, self.alpha, self.dtype = mode, rank, float(alpha), dtype
        self.scaling = float(alpha) / rank
        self.bits = quantized.scheme.bits
        self.set_base(quantized)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.lora_A = nn.Parameter(torch.zeros(rank, self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def set_base(self, quantized: QuantizedWeight | PackedQuantizedWeight) -> None:
        """Hold `quantized` as the frozen base, as `mode` says (a merge replaces it)."""
        if tuple(quantized.shape) != (self.out_features, self.in_features):
            raise ValueError(f"base of shape {tuple(quantized.shape)} for a {self.out_features}×{self.in_features} module")
        if self.mode == "lora":
            self.register_buffer("weight", quantized.dequantize().to(self.dtype), persistent=False)
        else:
            packed = quantized.packed() if isinstance(quantized, QuantizedWeight) else quantized
            self.register_buffer("packed_codes", packed.packed_codes.contiguous(), persistent=False)
            self.register_buffer("scale", packed.scale.float().contiguous(), persistent=False)
            self.register_buffer("zero", packed.zero.float().contiguous(), persistent=False)
            self.register_buffer("g_idx", packed.g_idx.to(torch.int32).contiguous(), persistent=False)

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """dequant(W_q) (out, in), never a leaf of the autograd graph."""
        dtype = dtype or self.dtype
        if self.mode == "lora":
            return self.weight.to(dtype)
        codes = unpack_int32(self.packed_codes, self.bits, self.in_features)
        return dequantize_groups(codes, self.scale, self.zero, self.g_idx).to(dtype)

    def delta_weight(self) -> torch.Tensor:
        """s·B·A: what the adapter adds to the base weight."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def reset_adapter(self, generator: torch.Generator) -> None:
        """PEFT's default start: A Kaiming-uniform (a = √5, as nn.Linear), B zero, so the output is
        the base's until B moves."""
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=√5) on a (rank, in) matrix
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound, generator=generator)
            self.lora_B.zero_()

    def set_adapter(self, a: torch.Tensor, b: torch.Tensor) -> None:
        with torch.no_grad():
            self.lora_A.copy_(a)
            self.lora_B.copy_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "lora":
            y = F.linear(x, self.weight.to(x.dtype))
        elif torch.is_grad_enabled() and x.requires_grad:
            y = _PackedLinear.apply(x, self)
        else:
            y = F.linear(x, self.base_weight(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        a, b = self.lora_A, self.lora_B
        update = F.linear(F.linear(self.dropout(x).to(a.dtype), a), b) * self.scaling
        return y + update.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha:g}, mode={self.mode}, bits={self.bits}")


def _matches(name: str, pattern: str) -> bool:
    """PEFT's rule for a list of target names (the name itself or its last dotted parts), or a
    regular expression over the whole name with a `re:` prefix (compressed-tensors' spelling)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def select_targets(quantized: dict, patterns, other_linear: list[str] = ()) -> list[str]:
    """The quantized modules `patterns` select (None: all of them), in model order; every pattern
    must select at least one, and a pattern naming only unquantized modules is refused."""
    names = list(quantized)
    if patterns is None:
        return names
    if isinstance(patterns, str):
        patterns = [patterns]
    selected = set()
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise FabricqError(f"recovery.target_modules entries must be module names or re: patterns, got {pattern!r}")
        try:
            hits = {n for n in names if _matches(n, pattern)}
        except re.error as err:
            raise FabricqError(f"recovery.target_modules: {pattern!r} is not a valid regular expression: {err}") from None
        if not hits:
            unquantized = [n for n in other_linear if _matches(n, pattern)]
            why = (f"it names unquantized modules only ({', '.join(unquantized[:3])}); adapters go on quantized "
                   "Linear modules" if unquantized else f"no quantized Linear module matches (e.g. {names[0]})")
            raise FabricqError(f"recovery.target_modules: {pattern!r} matches nothing: {why}")
        selected |= hits
    return [n for n in names if n in selected]


def check_rank(rank: int, quantized: dict, targets: list[str]) -> None:
    """A rank above a module's smaller dimension adds parameters and no expressiveness: refused,
    naming the narrowest target. `quantized`: name → quantized weight, or its (out, in) shape."""
    def shape(name):
        return tuple(getattr(quantized[name], "shape", quantized[name]))

    name = min(targets, key=lambda n: min(shape(n)))
    width = min(shape(name))
    if rank > width:
        raise FabricqError(f"recovery.rank={rank} is larger than {name}'s width {width} "
                           f"(shape {shape(name)}): choose a rank of at most {width}")


def check_recovery_plan(recovery, model: nn.Module, targets: list[str], ignore) -> None:
    """`python -m fabricq … +recovery=NAME`, before quantizing: the recovery that will follow
    must be able to run on the modules this run quantizes (`targets` less `ignore`, regexes
    searched in the names as the quantization applies them) — the rank, recovery.target_modules
    and recovery.seq_len — so that a bad value is refused now, not after the whole quantization."""
    modules = dict(model.named_modules())
    patterns = [re.compile(p) for p in ignore or ()]
    shapes = {n: (modules[n].out_features, modules[n].in_features) for n in targets
              if not any(p.search(n) for p in patterns)}
    other = [n for n, m in modules.items() if isinstance(m, nn.Linear) and n not in shapes]
    chosen = select_targets(shapes, recovery.target_modules, other)
    check_rank(recovery.rank, shapes, chosen)
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(max_positions, int) and recovery.seq_len > max_positions:
        raise FabricqError(f"recovery.seq_len={recovery.seq_len} exceeds the model's context length {max_positions}")


def attach_lora(model: nn.Module, quantized: dict, targets: list[str], *, rank: int, alpha: float,
                dropout: float = 0.0, mode: str = "lora", seed: int = 0) -> dict[str, LoRALinear]:
    """Replace each target module of `model` by a LoRALinear over its quantized weight (codes from
    `quantized`), freeze everything else, and start every adapter the PEFT way (seeded by
    `seed`, module by module in `targets` order). Returns the new modules by name."""
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    attached = {}
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        bias = getattr(old, "bias", None)
        dtype = old.weight.dtype if isinstance(getattr(old, "weight", None), torch.Tensor) else torch.float32
        module = LoRALinear(quantized[name], rank=rank, alpha=alpha, dropout=dropout, mode=mode, dtype=dtype,
                            bias=bias)
        module.reset_adapter(generator)
        setattr(parent, child, module)
        attached[name] = module
    return attached


def adapter_tensors(modules: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    """`NAME.lora_A` / `NAME.lora_B` of every adapter (detached float32 copies)."""
    out = {}
    for name, m in modules.items():
        out[f"{name}.lora_A"] = m.lora_A.detach().float().clone()
        out[f"{name}.lora_B"] = m.lora_B.detach().float().clone()
    return out


def load_adapter_tensors(modules: dict[str, LoRALinear], tensors: dict[str, torch.Tensor]) -> None:
    for name, m in modules.items():
        m.set_adapter(tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"])
