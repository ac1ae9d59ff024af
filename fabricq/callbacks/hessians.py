"""Hessians of a decoder layer's Linear inputs, one per shared input (q/k/v, gate/up, ...)."""

from __future__ import annotations

import threading

import torch
from torch import nn

from fabricq.calibration.loop import StopLayerForward
from fabricq.errors import FabricqError
from fabricq.quant.hessian import HessianAccumulator


class SharedInputHessians:
    """One Hessian per distinct input of a layer's Linear modules.

    q/k/v (and gate/up) read the very same tensor, so they share one accumulator: which modules
    share is learnt from the first batch that reaches them (same tensor object → same group), for
    any architecture, or given up front as `groups` (learnt on an earlier layer of the same
    shape; each batch then checks that a follower reads its leader's very tensor). References to
    the learning batch's inputs are held until `end_batch` so a freed tensor's id cannot be
    reused by a different input within the batch.

    With `stop_early`, from the second batch on, once the last module (in call order) has given
    its input, the rest of the layer's calibration forward is skipped (`StopLayerForward`): its
    output would be discarded anyway, as the quantized layer is forwarded again for the next layer.

    `token_masks`: per batch, which positions are tokens (True) and which padding (False); padded
    positions are left out of the sums and the token counts. A leader's k-th call is batch k: both
    the plain and the gated forward run batches in order, and each module once per forward.
    """

    def __init__(self, modules: dict[str, nn.Linear], dtype: torch.dtype, stop_early: bool = True,
                 groups: list[list[str]] | None = None, token_masks: list[torch.Tensor] | None = None):
        self.modules = modules
        self.stop_early = stop_early
        self.dtype = dtype
        self.leader: dict[str, str] = {}  # module → module whose accumulator it uses
        self.preset = groups is not None
        for group in groups or []:
            for name in group:
                self.leader[name] = group[0]
        self.accumulators: dict[str, HessianAccumulator] = {}
        self._seen: dict[int, tuple[str, torch.Tensor]] = {}
        self._order: list[str] = []  # first calls, in call order
        self._calls_while_learning = 0
        self._batches_done = 0
        self._stop_after: str | None = None
        self._last_leader_input = threading.local()  # per batch forward (gated forwards: per thread)
        self.token_masks = token_masks
        self._leader_calls: dict[str, int] = {}  # leader → batches it has added
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in modules.items()]

    def _tokens_of(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """`x` without its padded positions (as it is when the batch has none)."""
        batch = self._leader_calls.get(name, 0)
        self._leader_calls[name] = batch + 1
        if self.token_masks is None:
            return x
        if batch >= len(self.token_masks):
            raise FabricqError(f"{name} was called more than once per forward: attention masks (padding) "
                               "cannot be applied to its calibration inputs; pass unpadded token windows")
        mask = self.token_masks[batch]
        if mask.all():
            return x
        if tuple(mask.shape) != tuple(x.shape[:-1]):
            raise FabricqError(f"{name}: the attention mask's shape {tuple(mask.shape)} does not match its input "
                               f"{tuple(x.shape[:-1])}")
        return x[mask.to(x.device)]

    def _hook(self, name: str):
        def observe(module, args):
            x = args[0]
            leader = self.leader.get(name)
            if self._batches_done == 0:
                self._calls_while_learning += 1
            if leader is None:  # the first call of this module: learn whom it shares an input with
                self._order.append(name)
                seen = self._seen.get(id(x))
                leader = seen[0] if seen is not None and seen[1] is x else name
                self.leader[name] = leader
                if leader == name:
                    self._seen[id(x)] = (name, x)
            elif self.preset and leader != name:
                last = getattr(self._last_leader_input, "value", None)
                if last is None or last[0] != leader or last[1] is not x:
                    raise FabricqError(
                        f"{name} does not read the same input as {leader} here, unlike in the layer its "
                        "grouping was learnt on: this model's layers differ; set quant.true_sequential=false"
                    )
            if leader == name:
                accumulator = self.accumulators.get(name)
                if accumulator is None:
                    accumulator = self.accumulators[name] = HessianAccumulator(x.shape[-1], self.dtype, x.device)
                accumulator.add(self._tokens_of(name, x))
                self._last_leader_input.value = (name, x)
            if name == self._stop_after:
                raise StopLayerForward

        return observe

    def end_batch(self) -> None:
        self._seen.clear()
        self._last_leader_input.value = None
        if self._batches_done == 0:
            once = self._calls_while_learning == len(self._order) == len(self.modules)
            if self.stop_early and once:
                self._stop_after = self._order[-1]  # every module runs once per forward
        self._batches_done += 1

    def hessian(self, name: str) -> torch.Tensor:
        return self.accumulators[self.leader[name]].mean()

    def groups(self) -> list[list[str]]:
        """Modules by shared input, each group led by its first-called member."""
        out: dict[str, list[str]] = {}
        for name in self.modules:
            if name in self.leader:
                out.setdefault(self.leader[name], []).append(name)
        return [[leader] + [n for n in members if n != leader] for leader, members in out.items()]

    def group_of(self, name: str) -> list[str]:
        leader = self.leader.get(name, name)
        return [n for g in self.groups() if g[0] == leader for n in g] or [name]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def learn_input_groups(loop, index: int, layer: nn.Module, modules: dict[str, nn.Linear]) -> list[list[str]] | None:
    """Modules by shared input (names relative to the layer), learnt before the layer's
    calibration forward from one forward of `layer` on a random batch with every other hook set
    aside: the same tensor object → the same group, as `SharedInputHessians` learns it. Knowing
    the groups up front, the first layer is gated group by group like the others, instead of
    module by module (which holds each batch's output of every module until its own gate:
    gate_proj's, four hidden widths per token, until up_proj's gate). None where some module is
    not called in this forward (e.g. routed experts): the calibration forward learns them then."""
    if not loop.kwargs or not modules:
        return None
    first = next(iter(modules.values())).weight
    batch, seq = loop.samples.split(loop.batch_size)[0].shape
    hidden_size = loop.model.config.get_text_config().hidden_size
    hidden = torch.randn(batch, seq, hidden_size, generator=torch.Generator().manual_seed(2)).to(first)
    leader: dict[str, str] = {}
    seen: dict[int, tuple[str, torch.Tensor]] = {}

    def learn(name: str):
        def observe(module, args):
            x = args[0]
            if name not in leader:
                known = seen.get(id(x))
                leader[name] = known[0] if known is not None and known[1] is x else name
                seen.setdefault(id(x), (name, x))
            if len(leader) == len(modules):
                raise StopLayerForward  # every module has its group: the rest of the forward is not needed

        return observe

    parts = list(layer.modules())
    saved = [(m._forward_pre_hooks, m._forward_hooks) for m in parts]
    for m in parts:
        m._forward_pre_hooks, m._forward_hooks = type(m._forward_pre_hooks)(), type(m._forward_hooks)()
    handles = [m.register_forward_pre_hook(learn(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            layer(hidden, **loop.kwargs[0])
    except StopLayerForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
        for m, (pre, post) in zip(parts, saved):
            m._forward_pre_hooks, m._forward_hooks = pre, post
    if len(leader) < len(modules):
        return None
    cut = len(loop.layer_name(index)) + 1
    groups: dict[str, list[str]] = {}
    for name, lead in leader.items():  # in call order: each group led by its first-called member
        groups.setdefault(lead, []).append(name[cut:])
    return list(groups.values())
