"""Copies onto the compute device ahead of use.

On CUDA a `TransferStream` owns a side stream: host tensors are pinned and copied with
`non_blocking=True` on that stream, and the consumer waits on an event before it uses the copy
(and marks the copy as used on its own stream so the caching allocator does not recycle it early).
On any other device (the CPU here) the very same calls run with a no-op stream: the copy is a
plain synchronous `.to(device)` (free when the tensor is already there) and there is nothing to
wait for. Work that overlaps on every device — reading spilled batches from disk — runs on a
background thread (`Prefetcher`).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class Transfer:
    """A tensor on the compute device and the event its copy will have finished at (None: ready)."""

    tensor: torch.Tensor
    event: Any = None


class TransferStream:
    def __init__(self, device):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @property
    def asynchronous(self) -> bool:
        return self.stream is not None

    def pinned(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` in page-locked host memory when copies are asynchronous (else unchanged)."""
        if self.stream is not None and tensor.device.type == "cpu" and not tensor.is_pinned():
            return tensor.pin_memory()
        return tensor

    def to_device(self, tensor: torch.Tensor) -> Transfer:
        if self.stream is None or tensor.device == self.device:
            return Transfer(tensor.to(self.device))
        source = self.pinned(tensor)
        with torch.cuda.stream(self.stream):
            copy = source.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return Transfer(copy, event)

    def wait(self, transfer: Transfer) -> torch.Tensor:
        """The transferred tensor, safe to use on the current stream."""
        if transfer.event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(transfer.event)
            transfer.tensor.record_stream(current)
        return transfer.tensor

    def module_to_device(self, module: nn.Module) -> list[Transfer]:
        """Start copying every parameter and buffer of `module` to the device (swapped in place)."""
        transfers = []
        for sub in module.modules():
            for name, param in sub.named_parameters(recurse=False):
                t = self.to_device(param.data)
                param.data = t.tensor
                transfers.append(t)
            for name, buf in list(sub.named_buffers(recurse=False)):
                t = self.to_device(buf)
                sub._buffers[name] = t.tensor
                transfers.append(t)
        return transfers

    def wait_all(self, transfers: list[Transfer]) -> None:
        for t in transfers:
            self.wait(t)


class Prefetcher:
    """Runs loads one step ahead on a background thread: `submit(fn)` returns its Future."""

    def __init__(self, name: str):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def submit(self, fn: Callable[[], Any]) -> Future:
        return self._pool.submit(fn)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
