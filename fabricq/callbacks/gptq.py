"""The GPTQ (or round-to-nearest) callback of the calibration loop: per layer, Hessians of the
Linear inputs, solve steps handed to a `Solver`, and the quantized results."""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass

import torch
from torch import nn

from fabricq.callbacks.base import Callback
from fabricq.callbacks.hessians import SharedInputHessians, learn_input_groups
from fabricq.callbacks.solver import (
    GPTQSettings,
    LayerState,
    LocalSolver,
    ModuleOrder,
    Solver,
    held,
    quantize_and_install,
)
from fabricq.calibration.loop import CalibrationLoop
from fabricq.errors import FabricqError
from fabricq.models import linear_modules
from fabricq.quant.fold import (
    HeadLayout,
    as_contiguous_groups,
    fold_permutation,
    permute_result_columns,
    permute_result_rows,
    value_permutation,
)
from fabricq.quant.gptq import PackedQuantizedWeight, QuantizedWeight
from fabricq.quant.grid import effective_group_size
from fabricq.sysmem import release_freed_memory

log = logging.getLogger("fabricq")


class GPTQCallback(Callback):
    """Quantizes every Linear of each decoder layer: at the end of its calibration pass, or, with
    `true_sequential`, group by group at gates of a single forward — each group of modules
    sharing an input once every batch has reached it, so later groups are calibrated on the
    outputs of the quantized earlier ones. The groups are learnt on the first layer (gating
    every module there) and reused for layers with the same module names.

    Each solve step (the groups ready at a layer's end, or the group at a gate) goes to
    `solver`: `LocalSolver` by default (every group on this rank); see
    `fabricq.parallel.solvers.make_solver` for several ranks.

    Results: `quantized` (module name → QuantizedWeight, or PackedQuantizedWeight below 8 bits)
    and `stats` (per-module objective of GPTQ and of round-to-nearest on the same Hessian,
    seconds, damping, effective group size), both in module order.
    """

    changes_layer_after_gates = False  # with gates, every group is solved at its gate

    def __init__(self, settings: GPTQSettings, solver: Solver | None = None):
        self.settings = settings
        self.solver = solver if solver is not None else LocalSolver(settings)
        self.needs_activations = settings.method == "gptq"
        self.quantized: dict[str, QuantizedWeight | PackedQuantizedWeight] = {}
        self.stats: dict[str, dict] = {}
        self._layers: dict[int, LayerState] = {}  # layers started and not yet ended
        self._groupings: dict[tuple[str, ...], list[list[str]]] = {}  # layer shape → groups (relative names)
        # Wall seconds of the solve steps (everything between a gate or a layer's end and the
        # batches going on: solves, installs, and on several ranks the collectives).
        self.solve_steps_s = 0.0
        # Folded act-order: what folds, per layer shape (relative names), and per layer started.
        self._fold_plans: dict[tuple[str, ...], FoldPlan] = {}
        self._folds: dict[int, FoldPlan] = {}
        self._shared_storages: set[int] = set()

    def targets(self, loop: CalibrationLoop, index: int, layer: nn.Module) -> dict[str, nn.Linear]:
        ignore = [re.compile(p) for p in self.settings.ignore]
        modules = linear_modules(layer, loop.layer_name(index))
        return {n: m for n, m in modules.items() if not any(p.search(n) for p in ignore)}

    @property
    def _gated(self) -> bool:
        return self.settings.true_sequential and self.settings.method == "gptq"

    @staticmethod
    def _shape_key(loop, state: LayerState) -> tuple[str, ...]:
        cut = len(loop.layer_name(state.index)) + 1
        return tuple(name[cut:] for name in state.targets)

    @property
    def _folded(self) -> bool:
        return self.settings.scheme.actorder == "folded" and self.settings.method == "gptq"

    def on_run_start(self, loop):
        if self._folded:  # weights stored once and used in several places cannot be permuted alone
            seen: dict[int, int] = {}
            for _, param in loop.model.named_parameters(remove_duplicate=False):
                if param.device.type != "meta":
                    ptr = param.untyped_storage().data_ptr()
                    seen[ptr] = seen.get(ptr, 0) + 1
            self._shared_storages = {ptr for ptr, count in seen.items() if count > 1}

    def on_layer_start(self, loop, index, layer):
        state = self._layers[index] = LayerState(index, self.targets(loop, index, layer))
        if self._folded:
            key = self._shape_key(loop, state)
            if key not in self._fold_plans:
                self._fold_plans[key] = plan_fold(loop, index, layer, state.targets, self.settings, self._shared_storages)
            fold = self._folds[index] = self._fold_plans[key].for_layer(loop.layer_name(index) + ".")
            self.solver.quantizer.orders = fold.orders()
        if self.settings.method == "gptq":
            groups = None
            known = self._groupings.get(self._shape_key(loop, state)) if self._gated else None
            if known is None and self._gated:  # before the first forward, so it is gated by group too
                known = learn_input_groups(loop, index, layer, state.targets)
                if known is not None:
                    self._groupings[self._shape_key(loop, state)] = known
            if known is not None:
                prefix = loop.layer_name(index) + "."
                groups = [[prefix + n for n in group] for group in known]
            # The calibration forward may stop after the last module's input unless its outputs
            # are used (gated: they are the next layer's inputs).
            state.hessians = SharedInputHessians(
                state.targets, self.settings.hessian_dtype, stop_early=not self._gated, groups=groups,
                token_masks=getattr(loop, "token_masks", None))

    def gates(self, loop, index, layer) -> list[str]:
        state = self._layers[index]
        if not self._gated or not state.targets:
            return []
        if state.hessians.preset:  # one gate per group, at the member called first
            return [group[0] for group in state.hessians.groups()]
        return list(state.targets)  # grouping unknown yet: every module waits for all batches

    def on_gate(self, loop, index, layer, name):
        state = self._layers[index]
        if name not in state.targets:
            return
        group = state.hessians.group_of(name) if state.hessians.preset else [name]
        pending = [n for n in group if n not in state.solved]
        if pending:
            self.solve_step(state, [pending])

    def solve_step(self, state: LayerState, groups: list[list[str]]) -> None:
        """Quantize `groups` (lists of modules sharing a Hessian) of layer `state` with the solver
        and keep their results, in module order."""
        start = time.perf_counter()
        self.solver.solve(state, groups, self.install)
        names = [n for group in groups for n in group]
        for table in (self.quantized, self.stats):  # in module order, however they were installed
            for name in names:
                table[name] = table.pop(name)
        state.solved.update(names)
        self.solve_steps_s += time.perf_counter() - start

    def on_batch_end(self, loop, index, batch):
        hessians = self._layers[index].hessians
        if hessians is not None:
            hessians.end_batch()

    def on_layer_end(self, loop, index, layer) -> bool:
        state = self._layers[index]
        hessians = state.hessians
        if hessians is not None:
            hessians.remove()
            silent = [n for n in state.targets if n not in hessians.leader]
            if silent:
                raise FabricqError(f"{', '.join(silent)} received no calibration input in the forward pass")
            groups = hessians.groups()
            if self._gated and not hessians.preset:
                cut = len(loop.layer_name(index)) + 1
                self._groupings[self._shape_key(loop, state)] = [[n[cut:] for n in g] for g in groups]
        else:
            groups = [[name] for name in state.targets]
        pending = [[n for n in g if n not in state.solved] for g in groups]
        pending = [g for g in pending if g]
        if pending:
            self.solve_step(state, pending)
        if self.settings.scheme.actorder == "folded":
            # Every module is solved (on every rank: results solved elsewhere were installed): the
            # fold changes no function, so the layer's outputs (gated: already computed) stand.
            self._fold_layer(state, self._folds.pop(index, None))
        del self._layers[index]
        release_freed_memory()  # the layer's activations and Hessians, so they do not pile up in the heap
        return bool(pending)

    def close(self) -> None:
        """Release the solver's workers (a run that failed midway included)."""
        self.solver.close()

    def _fold_layer(self, state: LayerState, fold: FoldPlan | None) -> None:
        """Reorder the MLP's intermediate channels and the value channels by the groups of the
        modules solved in act-order (`fold_permutation` of their g_idx: the same on every rank
        and in a resumed run), in the model and in the held results; every result of the layer
        then has contiguous groups and is labelled static act-order."""
        for gate, up, down in fold.mlp if fold else ():
            perm = fold_permutation(self.quantized[down].g_idx)
            self._permute(gate, state.targets[gate], perm, rows=True)
            self._permute(up, state.targets[up], perm, rows=True)
            self._permute(down, state.targets[down], perm, rows=False)
        for value, out, layout in fold.attention if fold else ():
            perm = fold_permutation(self.quantized[out].g_idx)
            self._permute(out, state.targets[out], perm, rows=False)
            self._permute(value, state.targets[value], value_permutation(perm, layout), rows=True)
        for name in state.targets:
            if name in self.quantized:
                self.quantized[name] = as_contiguous_groups(self.quantized[name])
        self.solver.quantizer.orders = {}

    def _permute(self, name: str, module: nn.Linear, perm: torch.Tensor, *, rows: bool) -> None:
        """Module `name`'s weight rows (and bias) or columns in `perm` order, in the model and its result."""
        dim = 0 if rows else 1
        weight = module.weight.data
        weight.copy_(weight.index_select(dim, perm.to(weight.device)))
        if rows:
            result = permute_result_rows(self.quantized[name], perm)
            if module.bias is not None:
                module.bias.data.copy_(module.bias.data.index_select(0, perm.to(module.bias.device)))
                # A resumed run installs the result into the unpermuted model: `install` applies it.
                result.info["fold_rows"] = perm.tolist()
        else:
            result = permute_result_columns(self.quantized[name], perm)
        self.quantized[name] = result

    def quantize_group(self, names: list[str], modules: list[nn.Linear], hessians: SharedInputHessians | None) -> None:
        """Quantize and install, on this rank, modules that share one input (or a single module)."""
        quantize_and_install(self.solver.quantizer, names, modules, hessians, self.install)

    def install(self, name: str, module: nn.Linear, result: "QuantizedWeight | PackedQuantizedWeight", stats: dict,
                dequantized: torch.Tensor | None = None) -> None:
        """Put a module's quantized weight in place (also how a resumed run restores finished layers)."""
        if dequantized is None:
            dequantized = result.dequantize()
        if not all(math.isfinite(stats.get(k) or 0.0) for k in ("loss", "rtn_loss")) or not torch.isfinite(dequantized).all():
            raise FabricqError(f"{name}: quantization produced NaN/Inf (its Hessian, loss or scales): the layer's "
                               "calibration activations are not finite (float16 overflow?); try model.dtype=float32")
        weight = module.weight.data
        if "fold_rows" in result.info and module.bias is not None:  # restoring a folded layer (`_permute`)
            module.bias.data.copy_(module.bias.data[torch.tensor(result.info["fold_rows"], device=module.bias.device)])
        # In place: loaded weights are often a private memory map of the checkpoint file; writing
        # into them replaces those pages, where a new tensor would keep both resident.
        weight.copy_(dequantized.to(device=weight.device, dtype=weight.dtype))
        self.quantized[name] = held(result)  # kept until export
        self.stats[name] = stats


# ---------------------------------------------------------------------------------------------
# Folded act-order: which modules of a layer fold (fabricq.quant.fold)
# ---------------------------------------------------------------------------------------------


@dataclass
class FoldPlan:
    """The folds of one layer: MLP (gate, up, down) and attention (v, o, head layout) names,
    relative to the layer (a plan learnt once per layer shape) or full (`for_layer`)."""

    mlp: list[tuple[str, str, str]]
    attention: list[tuple[str, str, HeadLayout]]

    def for_layer(self, prefix: str) -> FoldPlan:
        return FoldPlan([tuple(prefix + n for n in names) for names in self.mlp],
                        [(prefix + v, prefix + o, layout) for v, o, layout in self.attention])

    def orders(self) -> dict[str, ModuleOrder]:
        return {**{down: ModuleOrder("dynamic") for _, _, down in self.mlp},
                **{out: ModuleOrder("dynamic", layout) for _, out, layout in self.attention}}


def _head_layout(config) -> HeadLayout | None:
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(config, "num_attention_heads", None)
    if not heads:
        return None
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return HeadLayout(heads, kv, head_dim) if heads % kv == 0 else None


def plan_fold(loop, index: int, layer: nn.Module, targets: dict[str, nn.Linear], settings: GPTQSettings,
              shared_storages: set[int]) -> FoldPlan:
    """Which down_proj and o_proj of layer `index` fold, learnt from its module names, shapes and
    the model config, then checked: the layer's output with random folding permutations applied
    must equal its output without (so an architecture whose MLP or attention is not channel-wise
    where we assume it is falls back). Every module that does not fold is solved static, with
    one log line saying why."""
    cut = len(loop.layer_name(index)) + 1
    rel = {name[cut:]: module for name, module in targets.items()}
    all_linear = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
    layout = _head_layout(loop.model.config)
    mlp, attention, refused = [], [], {}

    def unusable(names: list[str]) -> str | None:
        for n in names:
            if n not in rel:
                return f"{n} is {'left unquantized' if n in all_linear else 'not in this layer (fused projection?)'}"
            if rel[n].weight.untyped_storage().data_ptr() in shared_storages:
                return f"{n}'s weight is shared with another parameter"
        return None

    for name, module in rel.items():
        base = name.rsplit(".", 1)[0] + "." if "." in name else ""
        if name.endswith("down_proj"):
            gate, up = base + "gate_proj", base + "up_proj"
            reason = unusable([gate, up, name])
            if reason is None and not (rel[gate].out_features == rel[up].out_features == module.in_features):
                reason = "gate/up/down widths differ"
            (refused.__setitem__(name, reason) if reason else mlp.append((gate, up, name)))
        elif name.endswith("o_proj"):
            value = base + "v_proj"
            reason = unusable([value, name])
            group = effective_group_size(settings.scheme.group_size, module.in_features)
            if reason is None and layout is None:
                reason = "the model config gives no head layout"
            elif reason is None and (module.in_features != layout.num_heads * layout.head_dim
                                     or rel[value].out_features != layout.num_kv_heads * layout.head_dim):
                reason = "o_proj/v_proj widths are not heads × head_dim"
            elif reason is None and group != -1 and layout.head_dim % group and group % layout.head_dim:
                reason = f"group size {group} and head_dim {layout.head_dim} do not divide one another"
            (refused.__setitem__(name, reason) if reason else attention.append((value, name, layout)))
    if mlp and not _fold_is_exact(loop, layer, _random_fold(rel, FoldPlan(mlp, []))):
        refused.update({down: "permuting its input channels changes the layer's output" for _, _, down in mlp})
        mlp = []
    if attention and not _fold_is_exact(loop, layer, _random_fold(rel, FoldPlan([], attention))):
        refused.update({out: "permuting its input channels changes the layer's output" for _, out, _ in attention})
        attention = []
    for name, reason in refused.items():
        log.info("folded act-order: %s solved with static act-order (%s)", name, reason)
    return FoldPlan(mlp, attention)


def _random_fold(rel: dict[str, nn.Linear], plan: FoldPlan) -> dict[str, tuple[int, torch.Tensor]]:
    """Parameter name (relative to the layer) → (dim, permutation): random folding permutations."""
    generator = torch.Generator().manual_seed(0)  # not the global RNG: a resumed run restores that
    out = {}

    def put(module_name: str, dim: int, perm: torch.Tensor):
        out[f"{module_name}.weight"] = (dim, perm)
        if dim == 0 and rel[module_name].bias is not None:
            out[f"{module_name}.bias"] = (0, perm)

    for gate, up, down in plan.mlp:
        perm = torch.randperm(rel[down].in_features, generator=generator)
        put(gate, 0, perm), put(up, 0, perm), put(down, 1, perm)
    for value, out_name, layout in plan.attention:
        hd = layout.head_dim
        within = [torch.randperm(hd, generator=generator) for _ in range(layout.num_kv_heads)]
        put(value, 0, torch.cat([kv * hd + p for kv, p in enumerate(within)]))
        put(out_name, 1, torch.cat([h * hd + within[layout.kv_head_of(h)] for h in range(layout.num_heads)]))
    return out


@torch.no_grad()
def _fold_is_exact(loop, layer: nn.Module, perms: dict[str, tuple[int, torch.Tensor]]) -> bool:
    """Whether `layer` computes the same output on a random input with `perms` applied to its
    parameters, up to the rounding of sums taken in another order (every hook set aside)."""
    from torch.func import functional_call

    from fabricq.calibration.gated import layer_output

    if not loop.kwargs:
        return False
    params = dict(layer.named_parameters())
    first = params[next(iter(perms))]
    batch, seq = loop.samples.split(loop.batch_size)[0].shape
    hidden_size = loop.model.config.get_text_config().hidden_size
    hidden = torch.randn(batch, seq, hidden_size, generator=torch.Generator().manual_seed(1)).to(first)
    permuted = {n: params[n].index_select(dim, p.to(first.device)) for n, (dim, p) in perms.items()}
    parts = list(layer.modules())
    saved = [(m._forward_pre_hooks, m._forward_hooks) for m in parts]
    for m in parts:
        m._forward_pre_hooks, m._forward_hooks = type(m._forward_pre_hooks)(), type(m._forward_hooks)()
    try:
        plain = layer_output(layer(hidden, **loop.kwargs[0])) - hidden
        folded = layer_output(functional_call(layer, permuted, (hidden,), loop.kwargs[0])) - hidden
    finally:
        for m, (pre, post) in zip(parts, saved):
            m._forward_pre_hooks, m._forward_hooks = pre, post
    tolerance = 1e-3 if first.dtype in (torch.float32, torch.float64) else 5e-2
    scale = plain.abs().max().float().clamp_min(1e-30)
    return bool(((folded - plain).abs().max().float() / scale) <= tolerance)
