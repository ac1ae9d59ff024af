"""The original model's evaluation, cached: computed once per model and evaluation, reused by
every later run and sweep job that evaluates the same thing.

An entry is a directory under `<FABRICQ_CACHE>/eval/` named by the hash of its key (`reference_key`:
the model's files, the evaluation windows, every eval setting that changes a result, the forward
dtype and device type, torch/transformers versions and `EVALUATOR_VERSION`). It holds one file per
window (`WindowResult`: summed NLL, tokens, the compact KL reference), so each rank reads and writes
only its own shard and any world size reads any other's entry.

Writes are atomic (a uniquely named temporary file, then a rename): concurrent writers of the same
window (ranks of two sweep jobs) each compute the identical result and the last rename wins; no
reader ever sees half a file. Each file carries the sha256 of its tensors; a file that does not
parse or does not match is reported and recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fabricq.checksums import tensors_sha256
from fabricq.evaluate import (
    EVALUATOR_VERSION,
    POSITION_CHUNK,
    TAIL_SAMPLES,
    WindowResult,
)
from fabricq.cachedir import cache_root
from fabricq.recovery.teacher import windows_digest

log = logging.getLogger("fabricq")

FORMAT = 1
REFERENCE_PARTS = ("indices", "logprobs", "rest", "tail_indices", "tail_logprobs")  # evaluate.compact_reference


def reference_key(model_identity: dict, windows: torch.Tensor, *, stride: int | None, kl_windows: int, top_k: int,
                  dtype: torch.dtype, device_type: str) -> dict:
    """Everything the original model's per-window results depend on (thread count aside: it only
    reorders float sums)."""
    import transformers

    return {
        "format": FORMAT, "evaluator": EVALUATOR_VERSION, "model": model_identity,
        "windows_sha256": windows_digest(windows), "windows_shape": list(windows.shape),
        "stride": stride, "kl_windows": min(kl_windows, len(windows)), "kl_top_k": top_k,
        "tail_samples": TAIL_SAMPLES, "position_chunk": POSITION_CHUNK,  # which tail tokens are drawn
        "dtype": str(dtype).removeprefix("torch."), "device": device_type,
        "torch": torch.__version__, "transformers": transformers.__version__,
    }


_content_sha256 = tensors_sha256  # the same checksum the resume state carries (fabricq.checksums)


class ReferenceCache:
    """One entry: `load(index)` / `store(index, result)` per evaluation window."""

    def __init__(self, key: dict, root: Path | None = None):
        self.key = key
        self.digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        self.path = Path(root or cache_root()) / "eval" / self.digest[:32]
        self._unwritable = False

    def _file(self, index: int) -> Path:
        return self.path / f"window-{index:06d}.safetensors"

    def load(self, index: int) -> WindowResult | None:
        """Window `index`'s stored result, or None when absent or unusable (with a warning)."""
        file = self._file(index)
        if not file.is_file():
            return None
        try:
            with safe_open(str(file), "pt") as handle:
                meta = handle.metadata() or {}
            tensors = load_file(file)
        except Exception as err:  # noqa: BLE001 - a torn or foreign file raises whatever safetensors raises
            log.warning("Evaluation cache: %s is unreadable (%s); recomputing it", file, str(err).splitlines()[0])
            return None
        if meta.get("key") != self.digest or meta.get("index") != str(index) or \
                meta.get("sha256") != _content_sha256(tensors):
            log.warning("Evaluation cache: %s does not match its checksum or key; recomputing it", file)
            return None
        nll, tokens, seconds = tensors["scalars"].tolist()
        reference = tuple(tensors[name] for name in REFERENCE_PARTS if name in tensors) or None
        return WindowResult(nll, int(tokens), reference, seconds)

    def store(self, index: int, result: WindowResult) -> None:
        """Write window `index` atomically; an unwritable cache costs only a recomputation later."""
        if self._unwritable:
            return
        tensors = {"scalars": torch.tensor([result.nll, result.tokens, result.seconds], dtype=torch.float64)}
        if isinstance(result.reference, tuple):
            for name, t in zip(REFERENCE_PARTS, result.reference):
                tensors[name] = t.contiguous()
        elif result.reference is not None:
            raise TypeError("the evaluation cache holds top-k references only")
        meta = {"key": self.digest, "index": str(index), "sha256": _content_sha256(tensors)}
        tmp = self.path / f".window-{index:06d}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            key_file = self.path / "key.json"
            if not key_file.is_file():  # for people reading the cache; never read back
                key_tmp = self.path / f".key.{uuid.uuid4().hex}.tmp"
                key_tmp.write_text(json.dumps(self.key, indent=1, sort_keys=True))
                os.replace(key_tmp, key_file)
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, self._file(index))
        except OSError as err:
            self._unwritable = True
            tmp.unlink(missing_ok=True)
            log.warning("Evaluation cache: cannot write %s (%s); continuing without it", self.path, err)


def reference_cache(eval_settings, model_identity: dict, windows: torch.Tensor, dtype: torch.dtype,
                    device: torch.device) -> ReferenceCache | None:
    """The cache entry of this run's reference evaluation, or None with `eval.cache=false`."""
    if not eval_settings.cache:
        return None
    key = reference_key(model_identity, windows, stride=eval_settings.stride, kl_windows=eval_settings.kl_windows,
                        top_k=eval_settings.kl_top_k, dtype=dtype, device_type=torch.device(device).type)
    return ReferenceCache(key)
