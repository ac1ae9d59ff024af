"""Resume checkpoints: each finished layer's results and next inputs go to the work directory."""

from __future__ import annotations

from fabricq.callbacks.base import Callback
from fabricq.resume import WorkDirectory


class CheckpointCallback(Callback):
    """After every complete layer: the next layer's inputs, the layer's quantized results (from
    `gptq`, the GPTQCallback of the same loop) and its commit marker, to the work directory."""

    changes_layer_after_gates = False

    def __init__(self, work: WorkDirectory, gptq):
        self.work = work
        self.gptq = gptq

    def on_layer_complete(self, loop, index, next_inputs):
        batches = self.work.save_hidden(index, next_inputs)
        prefix = loop.layer_name(index) + "."
        results = {n: (qw, self.gptq.stats[n]) for n, qw in self.gptq.quantized.items() if n.startswith(prefix)}
        self.work.commit_layer(index, results, batches)
        self.work.release_older(index)
