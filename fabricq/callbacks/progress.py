"""Progress of the layer loop: a bar with an ETA."""

from __future__ import annotations

import logging
import time

from fabricq.callbacks.base import Callback

log = logging.getLogger("fabricq")


class ProgressCallback(Callback):
    """One log line per finished layer: `Layer 12/30 · 3.1 s · ETA 55 s`.

    A layer is finished once it is final and the next layer's inputs exist (`on_layer_complete`)."""

    changes_layer_after_gates = False

    def on_run_start(self, loop):
        self._run_start = self._layer_start = time.perf_counter()
        self._done = 0

    def on_layer_complete(self, loop, index, next_inputs):
        now = time.perf_counter()
        self._done += 1
        remaining = loop.num_layers - index - 1
        eta = (now - self._run_start) / self._done * remaining
        log.info("Layer %d/%d · %.1f s · ETA %.0f s", index + 1, loop.num_layers, now - self._layer_start, eta)
        self._layer_start = now
