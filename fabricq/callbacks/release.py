"""Finished layers give up their dense quantized weights; restored for evaluation."""

from __future__ import annotations

import torch
from torch import nn

from fabricq.callbacks.base import Callback
from fabricq.callbacks.gptq import GPTQCallback
from fabricq.models import linear_modules
from fabricq.sysmem import drop_mapped_pages


class ReleaseFinishedWeights(Callback):
    """Frees the dense weights of quantized modules once their layer is complete (and, in a
    resumed run, those of the layers it restored): nothing reads them again before export, which
    takes the codes from `gptq.quantized` and only shapes and dtypes from the model. Each weight
    becomes a meta tensor of the same shape and dtype (a stray read fails loudly), and pages of
    the loader's memory map that held it leave resident memory (`drop_mapped_pages`). `restore`
    rebuilds the dense quantized weights, for an evaluation after calibration."""

    changes_layer_after_gates = False

    def __init__(self, gptq: GPTQCallback):
        self.gptq = gptq
        self._next = 0  # the first layer not released yet (a resumed run restored those before it)

    def on_layer_complete(self, loop, index, next_inputs):
        for i in range(self._next, index + 1):
            modules = linear_modules(loop.layers[i], loop.layer_name(i))
            released = [m for name, m in modules.items() if name in self.gptq.quantized]
            old = [m.weight.data for m in released]
            for m in released:
                m.weight = nn.Parameter(torch.empty(m.weight.shape, dtype=m.weight.dtype, device="meta"),
                                        requires_grad=False)
            drop_mapped_pages(old)
        self._next = index + 1

    def restore(self, model: nn.Module) -> None:
        modules = dict(model.named_modules())
        for name, result in self.gptq.quantized.items():
            module = modules[name]
            if module.weight.device.type == "meta":
                module.weight = nn.Parameter(result.dequantize().to(module.weight.dtype), requires_grad=False)
