"""The hook protocol of the calibration loop."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from fabricq.calibration.cache import Stage
    from fabricq.calibration.loop import CalibrationLoop


class Callback:
    """Hooks of the calibration loop. Return True from `on_layer_end` if the layer changed.

    `needs_activations`: whether the callback observes layer inputs. When no callback does
    (round-to-nearest), the loop runs no forward pass at all."""

    needs_activations = False
    # Whether `on_layer_end` may change a layer whose forward was gated (some callback returned
    # gates for it). When no callback may, the gated forward frees the layer's inputs as soon as
    # every batch has finished it, since no second forward will need them.
    changes_layer_after_gates = True

    def on_run_start(self, loop: "CalibrationLoop") -> None: ...

    def on_layer_start(self, loop: "CalibrationLoop", index: int, layer: nn.Module) -> None: ...

    def on_batch_end(self, loop: "CalibrationLoop", index: int, batch: int) -> None: ...

    def gates(self, loop: "CalibrationLoop", index: int, layer: nn.Module) -> list[str]:
        """Names of modules (in `layer`, full names) before which every batch's forward pauses
        until all batches have reached it; then `on_gate` fires. Asked after `on_layer_start`."""
        return []

    def on_gate(self, loop: "CalibrationLoop", index: int, layer: nn.Module, name: str) -> None:
        """Every batch has reached module `name` (its forward pre-hooks have run for all of them)
        and waits: the module may be changed now; the batches then run through it."""

    def on_layer_end(self, loop: "CalibrationLoop", index: int, layer: nn.Module) -> bool:
        return False

    def on_layer_complete(self, loop: "CalibrationLoop", index: int, next_inputs: Stage | None) -> None:
        """Layer `index` is final and `next_inputs` hold the next layer's inputs (None after the
        last layer, or when no callback needs activations)."""

    def on_run_end(self, loop: "CalibrationLoop") -> None: ...
