"""Resume checkpoints: each finished layer's results and next inputs go to the work directory."""

from __future__ import annotations

from fabricq.callbacks.base import Callback
from fabricq.resume import WorkDirectory


class CheckpointCallback(Callback):
    """After every complete layer, the next layer's inputs to the work directory; once a layer's
    quantized results are final (at once, or up to a solve window later: `gptq.final_through`),
    its results and commit marker (the results come from `gptq`, the GPTQCallback of the same
    loop)."""

    changes_layer_after_gates = False

    def __init__(self, work: WorkDirectory, gptq):
        self.work = work
        self.gptq = gptq
        self._batches: dict[int, int] = {}  # hidden states saved, commit pending: layer → batches
        self._next_commit: int | None = None

    def on_layer_complete(self, loop, index, next_inputs):
        self._batches[index] = self.work.save_hidden(index, next_inputs)
        if self._next_commit is None:  # the first layer this process calibrates
            self._next_commit = index
        first = self._next_commit
        while self._next_commit <= self.gptq.final_through(index):
            k = self._next_commit
            prefix = loop.layer_name(k) + "."
            results = {n: (qw, self.gptq.stats[n]) for n, qw in self.gptq.quantized.items() if n.startswith(prefix)}
            self.work.commit_layer(k, results, self._batches.pop(k))
            self._next_commit = k + 1
        if self._next_commit > first:
            self.work.release_older(first, self._next_commit - 1)
