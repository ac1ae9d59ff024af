"""Hidden states between decoder layers, held within explicit memory budgets.

The calibration loop keeps, for every batch, the hidden states entering the current layer and
writes the ones entering the next layer. An `ActivationCache` holds them as `Stage`s (one ordered
sequence of batches each) in three tiers: compute-device memory up to a byte budget, host memory
up to a byte budget, and files (safetensors, one per batch) in a spill directory for the rest. A
batch is placed in the first tier with room when it is written and stays there until its stage
is released; reading a stage yields its batches on the compute device in order, the next one
fetched (disk → host → device) while the current one is in use.

Budgets count the batches the cache holds (resident). The batch in use and the one being fetched
(at most two, "in flight") are counted separately. When the compute device is the host (CPU)
there is one memory tier, the host budget.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fabricq.checksums import tensors_sha256
from fabricq.errors import FabricqError
from fabricq.sysmem import current_rss_bytes
from fabricq.calibration.transfer import Prefetcher, TransferStream

MIB = 1024 * 1024
TIERS = ("device", "host", "disk")


def mib(nbytes: float) -> float:
    return round(nbytes / MIB, 3)


def check_budgets(batch_bytes: int, device_mib: float | None, host_mib: float | None, batch_desc: str) -> None:
    """A budget must be unlimited (None) or hold at least one batch: anything smaller could never
    be used and is a mistake in the config. (Its type and sign are checked in fabricq.config.)"""
    for field, budget in (("cache.device_mib", device_mib), ("cache.host_mib", host_mib)):
        if budget is None:
            continue
        if budget * MIB < batch_bytes:
            raise FabricqError(
                f"{field}={budget} cannot hold one batch of hidden states ({batch_desc} = "
                f"{batch_bytes / MIB:.2f} MiB): raise it, lower data.batch_size, or set null (unlimited)"
            )


def _size(nbytes: int) -> str:
    """A byte count for messages: small needs are not rounded down to "0 MiB"."""
    if nbytes >= MIB:
        return f"{nbytes / MIB:.1f} MiB"
    return f"{-(-nbytes // 1024)} KiB" if nbytes >= 1024 else f"{nbytes} bytes"


def check_spill_dir(path: Path, need_bytes: int, owner: str | None = None) -> None:
    """The spill directory must be writable and have room for what may be spilled. `owner`: the
    setting that put it there, named in errors (the folder itself is internal). Probes by
    creating it, and removes it again if the probe created it (its parents stay: with several
    ranks, another rank may be creating its own spill directory beside it)."""
    created = [path] if not path.exists() else []
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-probe"
        probe.write_bytes(b"0")
        probe.unlink()
        free = shutil.disk_usage(path).free
    except OSError as err:
        where = f"{owner} cannot be written: " if owner else ""
        raise FabricqError(f"{where}cannot write spill files to {path}: {err.strerror or err}") from None
    finally:
        for p in created:
            try:
                p.rmdir()
            except OSError:
                pass
    if need_bytes > free:
        raise FabricqError(
            f"not enough free space for spilled hidden states in {owner or path}: up to {_size(need_bytes)} "
            f"needed, {_size(free)} free (raise cache.host_mib or free disk space)"
        )


@dataclass
class _Entry:
    tier: str
    nbytes: int
    tensor: torch.Tensor | None = None
    path: Path | None = None
    owned: bool = True  # False: a file the cache only reads (a resume snapshot)


class Stage:
    """The hidden states of every batch at one point of the model (e.g. entering layer 7)."""

    def __init__(self, cache: "ActivationCache", number: int):
        self.cache = cache
        self.number = number
        self.entries: list[_Entry] = []

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def append(self, hidden: torch.Tensor) -> None:
        self.entries.append(self.cache._place(hidden, self.number, len(self.entries)))

    def adopt_files(self, paths: list[Path]) -> None:
        """Batches stored in existing files (read, never deleted): a resumed run's snapshot."""
        for path in paths:
            with safe_open(str(path), "pt") as f:
                sl = f.get_slice("hidden")
                shape, dtype = sl.get_shape(), sl.get_dtype()
            numel = 1
            for s in shape:
                numel *= s
            itemsize = torch.empty(0, dtype=_SAFETENSORS_DTYPES[dtype]).element_size()
            self.entries.append(_Entry("disk", numel * itemsize, path=path, owned=False))

    def __iter__(self):
        """Each batch on the compute device, in order; batch b+1 is fetched while b is in use."""
        cache = self.cache
        if not self.entries:
            return
        pending = cache._prefetcher.submit(lambda e=self.entries[0]: cache._fetch(e))
        for b in range(len(self.entries)):
            transfer = pending.result()
            if b + 1 < len(self.entries):
                pending = cache._prefetcher.submit(lambda e=self.entries[b + 1]: cache._fetch(e))
            tensor = cache.transfer.wait(transfer)
            cache.peak_rss = max(cache.peak_rss, current_rss_bytes())
            yield tensor
            del tensor, transfer
            cache._inflight_done(self.entries[b])

    def save(self, folder: Path) -> None:
        """Write every batch to `folder/bNNNNN.safetensors` (hard links for batches already on disk)."""
        folder.mkdir(parents=True, exist_ok=True)
        for b, entry in enumerate(self.entries):
            target = folder / f"b{b:05d}.safetensors"
            if entry.tier == "disk":
                try:
                    os.link(entry.path, target)
                except OSError:
                    shutil.copyfile(entry.path, target)
            else:
                write_hidden(target, entry.tensor)

    def release(self) -> None:
        for entry in self.entries:
            self.cache._free(entry)
        self.entries = []


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
}


def write_hidden(path: Path, tensor: torch.Tensor) -> None:
    """One batch to a safetensors file, under a temporary name first (a half-written file is
    never mistaken for a whole one), with the sha256 of its content in the metadata (a resume
    verifies it: fabricq.resume); a full disk becomes a clear error."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        hidden = {"hidden": tensor.detach().to("cpu").contiguous()}
        save_file(hidden, str(tmp), metadata={"sha256": tensors_sha256(hidden)})
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise FabricqError(f"disk full while writing hidden states to {path.parent}: free space and re-run "
                               "the same command to resume") from None
        raise FabricqError(f"cannot write hidden states to {path}: {err.strerror or err}") from None


class ActivationCache:
    """Budgets in bytes: None = unlimited. `spill_dir` is where batches beyond the memory budgets
    go (required as soon as a budget is finite)."""

    def __init__(self, device, *, device_bytes: int | None = None, host_bytes: int | None = None,
                 spill_dir: Path | None = None):
        self.device = torch.device(device)
        self.transfer = TransferStream(self.device)
        # On a CPU run the compute device is the host: one memory tier, the host budget.
        self.budget = {
            "device": 0 if self.device.type == "cpu" else device_bytes,
            "host": host_bytes,
            "disk": None,
        }
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self.used = dict.fromkeys(TIERS, 0)
        self.peak = dict.fromkeys(TIERS, 0)
        self.spilled_batches = 0
        self.inflight = 0
        self.peak_inflight = 0
        # The process's RSS, sampled whenever a batch is written or read: what calibration itself
        # peaks at (the lifetime peak also includes loading and export).
        self.peak_rss = current_rss_bytes()
        self._lock = threading.Lock()
        self._stages = 0
        self._prefetcher = Prefetcher("fabricq-prefetch")

    def new_stage(self) -> Stage:
        self._stages += 1
        return Stage(self, self._stages)

    def _fits(self, tier: str, nbytes: int) -> bool:
        budget = self.budget[tier]
        return budget is None or self.used[tier] + nbytes <= budget

    def _account(self, tier: str, nbytes: int) -> None:
        with self._lock:
            self.used[tier] += nbytes
            self.peak[tier] = max(self.peak[tier], self.used[tier])

    def _place(self, hidden: torch.Tensor, stage: int, batch: int) -> _Entry:
        nbytes = hidden.numel() * hidden.element_size()
        if self.device.type != "cpu" and self._fits("device", nbytes):
            entry = _Entry("device", nbytes, tensor=hidden.to(self.device))
        elif self._fits("host", nbytes):
            entry = _Entry("host", nbytes, tensor=self.transfer.pinned(hidden.to("cpu")))
        else:
            if self.spill_dir is None:
                raise RuntimeError("activation cache: memory budgets exceeded and no spill directory")
            path = self.spill_dir / f"stage{stage:05d}-b{batch:05d}.safetensors"
            write_hidden(path, hidden)
            entry = _Entry("disk", nbytes, path=path)
            self.spilled_batches += 1
        self._account(entry.tier, nbytes)
        self.peak_rss = max(self.peak_rss, current_rss_bytes())
        return entry

    def _fetch(self, entry: _Entry):
        """Runs on the prefetch thread: bring one batch to the compute device."""
        if entry.tier == "disk":
            with safe_open(str(entry.path), "pt") as f:
                host = f.get_tensor("hidden")
            self._inflight_add(entry.nbytes)
            return self.transfer.to_device(self.transfer.pinned(host))
        if entry.tier == "host":
            self._inflight_add(entry.nbytes if self.device.type != "cpu" else 0)
        return self.transfer.to_device(entry.tensor)

    def _inflight_add(self, nbytes: int) -> None:
        with self._lock:
            self.inflight += nbytes
            self.peak_inflight = max(self.peak_inflight, self.inflight)

    def _inflight_done(self, entry: _Entry) -> None:
        if entry.tier == "disk" or (entry.tier == "host" and self.device.type != "cpu"):
            with self._lock:
                self.inflight -= entry.nbytes

    def _free(self, entry: _Entry) -> None:
        if entry.owned:
            with self._lock:
                self.used[entry.tier] -= entry.nbytes
        if entry.path is not None and entry.owned:
            entry.path.unlink(missing_ok=True)
        entry.tensor = None

    def report(self) -> dict:
        """Peak use against budget per tier, in MiB (budget None = unlimited)."""
        out = {}
        for tier in TIERS:
            budget = self.budget[tier]
            if tier == "device" and self.device.type == "cpu":
                out[tier] = "the compute device is the host"
                continue
            out[tier] = {"budget_mib": None if budget is None else mib(budget), "peak_mib": mib(self.peak[tier])}
        out["disk"]["spilled_batches"] = self.spilled_batches
        out["peak_inflight_mib"] = mib(self.peak_inflight)
        out["peak_process_rss_mib"] = mib(self.peak_rss)
        return out

    def close(self) -> None:
        self._prefetcher.close()
        if self.spill_dir is not None and self.spill_dir.is_dir():
            shutil.rmtree(self.spill_dir, ignore_errors=True)


def hidden_batch_bytes(model_config: dict, cfg) -> tuple[int, str]:
    """Bytes of one batch of hidden states between layers, and how that number comes about."""
    dtype_name = cfg.model.dtype if cfg.model.dtype != "auto" else (
        model_config.get("dtype") or model_config.get("torch_dtype") or "float32")
    dtype = getattr(torch, str(dtype_name), None)
    itemsize = (dtype if isinstance(dtype, torch.dtype) else torch.float32).itemsize
    hidden = model_config["hidden_size"]
    shape = (cfg.data.batch_size, cfg.data.seq_len, hidden)
    return shape[0] * shape[1] * shape[2] * itemsize, f"{shape[0]} × {shape[1]} × {hidden} {dtype_name}"


def cache_from_config(cfg, model_config: dict, work, device) -> "ActivationCache":
    """The activation cache within the configured budgets; bad budgets or an unusable spill
    directory are reported here, before calibration. `cfg`: the run's config (cache, data,
    model.dtype); `work`: the run's WorkDirectory (where spilled batches go by default)."""
    if model_config.get("hidden_size"):
        batch_bytes, desc = hidden_batch_bytes(model_config, cfg)
        check_budgets(batch_bytes, cfg.cache.device_mib, cfg.cache.host_mib, desc)
    else:  # an architecture naming its width differently: budgets still hold, unchecked up front
        batch_bytes = 0
    budgets = [None if b is None else int(b * 1024 * 1024) for b in (cfg.cache.device_mib, cfg.cache.host_mib)]
    spill_dir = work.spill_dir if cfg.cache.spill_dir is None else (
        # A shared scratch directory: one subfolder per run (its work directory's path) and rank.
        Path(cfg.cache.spill_dir).expanduser()
        / f"fabricq-{hashlib.sha256(str(work.path.resolve()).encode()).hexdigest()[:12]}-rank{work.rank}")
    shutil.rmtree(spill_dir, ignore_errors=True)  # scratch of an earlier, crashed attempt
    stage = batch_bytes * -(-cfg.data.num_samples // cfg.data.batch_size)
    on_host = torch.device(device).type == "cpu"
    if budgets[1] is None or (not on_host and budgets[0] is None):
        memory = 2 * stage  # unlimited: nothing is spilled
    else:
        memory = budgets[1] + (0 if on_host else budgets[0])
    # Two stages resident (inputs and outputs of a layer) plus the resume snapshots.
    # The default spill folder lies in output_dir's hidden work directory `.NAME.work`.
    owner = (f"output_dir {work.path.with_name(work.path.name[1:].removesuffix('.work'))}"
             if cfg.cache.spill_dir is None else f"cache.spill_dir {cfg.cache.spill_dir}")
    check_spill_dir(spill_dir, max(0, 2 * stage - memory) + 2 * stage, owner)
    return ActivationCache(device, device_bytes=budgets[0], host_bytes=budgets[1], spill_dir=spill_dir)
