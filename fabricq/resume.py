"""Resume after a crash: a work directory beside the output, written after every finished layer.

Layout of `<parent>/.<output name>.work/` (a hidden name: it never looks like a finished output):

    run.json                      what run this is: config hash (+ the config, for messages), model
                                  identity, calibration-data hash, world size
    layers/L00007.safetensors     quantized results of layer 7 (codes, scales, zeros, g_idx) with
                                  scheme, solver info and stats in the metadata (rank 0 writes it)
    hidden/L00007.rank0/b*.safetensors   this rank's hidden states entering layer 8
    state/L00007.rank0.json       commit marker of layer 7 for rank 0: batches, RNG state, threads
    spill/rank0/                  the activation cache's spilled batches (scratch, not resumed from)
    lock.rank0                    held (flock) by the running process of rank 0

Every file is written under a temporary name and renamed; a layer counts as finished for a rank
only once its state file exists, which is written last. Every file carries the sha256 of its
content (safetensors metadata, a "sha256" field of the JSON files: fabricq.checksums), verified
when a resume reads it: a damaged file stops the run with one line naming it and offering
resume=false, never a silently different checkpoint. A resumed run loads the quantized results
of layers 0…k into the freshly loaded model, rebuilds the per-batch keyword arguments (position
embeddings: cheap, deterministic) and continues at layer k+1 from the saved hidden states, so its
checkpoint is bit-identical to an uninterrupted run's (same machine, same thread count).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from fabricq.calibration.cache import ActivationCache, Stage
from fabricq.checksums import json_sha256, tensors_sha256, with_json_sha256
from fabricq.errors import FabricqError
from fabricq.models import ModelSource
from fabricq.output import apply_umask
from fabricq.quant.gptq import PackedQuantizedWeight, QuantizedWeight
from fabricq.quant.grid import QuantScheme
from fabricq.quant.packing import pack_int32, unpack_int32

log = logging.getLogger("fabricq")

FORMAT = 2  # 2: every file checksummed
# Fields that cannot change the checkpoint: a run may be resumed with other values.
IGNORED_FIELDS = ("output_dir", "overwrite", "resume", "cache", "eval", "distributed", "pipeline.solve_threads",
                  "model.path")
# (model.path: the model is identified by its files instead, so a moved folder still resumes)
SAMPLE_BYTES = 4 * 1024 * 1024


def work_dir_for(output_dir: Path) -> Path:
    return output_dir.parent / f".{output_dir.name}.work"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config_identity(cfg: DictConfig) -> dict:
    """The resolved config without the fields that cannot change the result."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for dotted in IGNORED_FIELDS:
        *parents, leaf = dotted.split(".")
        node = container
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return container


def _file_identity(path: Path) -> dict:
    """Size and a hash of the first, middle and last 4 MiB: catches a different model without
    reading a 140 GB checkpoint in full (weights of equal-shaped models differ everywhere)."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for offset in sorted({0, max(0, size // 2 - SAMPLE_BYTES // 2), max(0, size - SAMPLE_BYTES)}):
            f.seek(offset)
            digest.update(f.read(SAMPLE_BYTES))
    return {"size": size, "sampled_sha256": digest.hexdigest()}


def model_identity(source: ModelSource) -> dict:
    """The model's files by name and content, not by where they are: a moved or renamed folder
    still resumes, a changed weight or config does not."""
    folder = source.folder
    if source.gguf_file:
        return {"name": source.name, "files": {source.gguf_file: _file_identity(folder / source.gguf_file)}}
    files = sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin"), folder / "config.json"])
    return {"files": {f.name: _file_identity(f) for f in files}}


def data_identity(calibration: torch.Tensor) -> str:
    """sha256 of the calibration token windows as int64: the resume check and report.json's
    `calibration.sha256` (which other tools compare against to be fed the same tokens)."""
    return _sha256(calibration.to(torch.int64).contiguous().numpy().tobytes())


def identity_differences(old, new, prefix="") -> list[str]:
    """'field: old → new' for every leaf where two identities differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += identity_differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} → {new!r}"]


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(with_json_sha256(data), indent=1))
    os.replace(tmp, path)


def damaged(path: Path, why: str) -> FabricqError:
    """The one-line error for a resume file that is not what was written."""
    return FabricqError(f"the resume state {path} is damaged ({why}): pass resume=false to discard the unfinished "
                        "run and start over")


def _read_json(path: Path, expect_format: int | None = None) -> dict:
    """A JSON file of the work directory, checked against its checksum (`expect_format`: run.json's
    format, checked first: an older fabricq's files have no checksums)."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise damaged(path, "missing") from None
    except ValueError as err:  # not UTF-8, not JSON (cut short)
        raise damaged(path, f"not valid JSON: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise damaged(path, "not a JSON object")
    if expect_format is not None and data.get("format") != expect_format:
        raise FabricqError(
            f"{path.parent} holds an unfinished run written by another fabricq version (resume format "
            f"{data.get('format')!r}, this one reads {expect_format}): pass resume=false to discard it and start over"
        )
    if "sha256" not in data:
        raise damaged(path, "no checksum")
    if data["sha256"] != json_sha256(data):
        raise damaged(path, "its content does not match its sha256 checksum")
    return data


def check_hidden_file(path: Path) -> None:
    """A saved batch of hidden states must hold what was written (calibration.cache.write_hidden
    stores its checksum beside it)."""
    try:
        with safe_open(str(path), "pt") as f:
            expected = (f.metadata() or {}).get("sha256")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # noqa: BLE001 - a torn or foreign file raises whatever safetensors raises
        raise damaged(path, f"unreadable: {' '.join(str(err).split())[:200]}") from None
    if expected is None:
        raise damaged(path, "no checksum")
    if list(tensors) != ["hidden"] or tensors_sha256(tensors) != expected:
        raise damaged(path, "its content does not match its sha256 checksum")


class WorkDirectory:
    """One rank's view of a run's work directory."""

    def __init__(self, path: Path, rank: int = 0, world_size: int = 1):
        self.path = Path(path)
        self.rank = rank
        self.world_size = world_size
        self._lock_file = None
        self._identity: dict = {}

    @property
    def spill_dir(self) -> Path:
        return self.path / "spill" / f"rank{self.rank}"

    def _layer_file(self, k: int) -> Path:
        return self.path / "layers" / f"L{k:05d}.safetensors"

    def _hidden_dir(self, k: int) -> Path:
        return self.path / "hidden" / f"L{k:05d}.rank{self.rank}"

    def _state_file(self, k: int) -> Path:
        return self.path / "state" / f"L{k:05d}.rank{self.rank}.json"

    # -- opening -------------------------------------------------------------------------------

    def prepare(self, mode, identity: dict) -> bool:
        """Check that an unfinished run in the work directory is this very run (same config,
        model and data). Returns True when there is progress to resume from. Nothing is created
        until the first layer is committed, so a run that fails early leaves nothing behind."""
        self._identity = identity
        run_file = self.path / "run.json"
        progress = run_file.is_file() and self.latest_finished_layer() is not None
        if mode is True and not progress:
            raise FabricqError(f"resume=true but there is no unfinished run to resume in {self.path}")
        if progress and mode is not False:
            self._lock()
            try:
                old = _read_json(run_file, expect_format=FORMAT)
            except FabricqError:
                self.close()  # refused: the lock is not this run's to keep
                raise
            if old.get("identity_sha256") != identity_hash(identity):
                diff = identity_differences(old.get("identity", {}), identity)
                what = ("a different model" if any(d.startswith("model.") for d in diff) else
                        "different calibration data" if any(d.startswith("data_sha256") for d in diff) else
                        "a different config")
                self.close()  # refused: the lock is not this run's to keep
                raise FabricqError(
                    f"{self.path} holds an unfinished run of {what} "
                    f"({'; '.join(diff[:3]) or 'unknown format'}): re-run it with its own settings to finish it, "
                    "pass resume=false to discard it, or choose another output_dir"
                )
            return True
        if self.path.exists() and self.rank == 0:  # resume=false, or nothing finished: start over
            self._lock()
            if progress:
                log.info("Discarding the unfinished run in %s (resume=false)", self.path)
            for child in self.path.iterdir():
                if not child.name.startswith("lock"):
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        return False

    def _create(self) -> None:
        """On the first commit: the directories, the lock, and run.json (rank 0)."""
        self._lock()
        for sub in ("layers", "hidden", "state"):
            (self.path / sub).mkdir(exist_ok=True)
        run_file = self.path / "run.json"
        if self.rank == 0 and not run_file.is_file():
            _write_json(run_file, {"format": FORMAT, "identity_sha256": identity_hash(self._identity),
                                   "identity": self._identity})

    def _lock(self) -> None:
        if self._lock_file is not None:
            return
        import fcntl

        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.path / f"lock.rank{self.rank}", "a")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            self._lock_file = None
            raise FabricqError(f"another fabricq run is using {self.path}") from None

    def remove(self) -> None:
        """The run is published: its work directory is no longer needed."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.close()

    def close(self) -> None:
        """Release the lock (the process exiting does the same)."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # -- progress ------------------------------------------------------------------------------

    def latest_finished_layer(self) -> int | None:
        """The last layer whose state this rank committed and whose results are on disk."""
        finished = []
        for f in (self.path / "state").glob(f"L?????.rank{self.rank}.json"):
            k = int(f.name[1:6])
            if all(self._layer_file(i).is_file() for i in range(k + 1)):
                finished.append(k)
        return max(finished) if finished else None

    def save_hidden(self, index: int, next_inputs: Stage | None) -> int:
        """This rank's hidden states entering layer index+1 (None after the last layer); returns
        the number of batches saved, which `commit_layer` records."""
        self._create()
        if next_inputs is None:
            return 0
        final = self._hidden_dir(index)
        tmp = final.with_name(".tmp-" + final.name)
        for stale in (tmp, final):
            shutil.rmtree(stale, ignore_errors=True)
        next_inputs.save(tmp)
        for path in [tmp, *tmp.iterdir()]:  # safetensors writes 0600; a resume may run as another user
            apply_umask(path)
        os.replace(tmp, final)
        return len(next_inputs)

    def commit_layer(self, index: int, results: dict[str, tuple[QuantizedWeight, dict]], batches: int) -> None:
        """Layer `index` is final: its results (rank 0) and this rank's commit marker, which names
        the `batches` hidden-state files `save_hidden` wrote for it."""
        self._create()
        if self.rank == 0:
            save_results(self._layer_file(index), results)
        state = {"layer": index, "batches": batches, "threads": torch.get_num_threads(),
                 "rng": torch.get_rng_state().numpy().tobytes().hex()}
        if torch.cuda.is_available():
            state["cuda_rng"] = [s.numpy().tobytes().hex() for s in torch.cuda.get_rng_state_all()]
        _write_json(self._state_file(index), state)

    def release_older(self, index: int) -> None:
        """After layer `index` was committed: delete this rank's markers and hidden states that no
        resume can need. Alone, all but this layer's. With several ranks, the layer before it
        stays too: a peer may still be one layer behind (not more: the collectives of the next
        layer wait for it), and ranks resume from the layer every one of them finished."""
        keep_from = index if self.world_size == 1 else index - 1
        for marker in (self.path / "state").glob(f"L?????.rank{self.rank}.json"):
            if int(marker.name[1:6]) < keep_from:
                marker.unlink(missing_ok=True)
        for hidden in (self.path / "hidden").glob(f"L?????.rank{self.rank}"):
            if int(hidden.name[1:6]) < keep_from:
                shutil.rmtree(hidden, ignore_errors=True)

    def restore(self, layer: int, model, gptq, cache: ActivationCache) -> Stage | None:
        """Load layers 0…`layer` into `model` and `gptq`; restore RNG; the hidden states entering
        layer+1 as a cache stage reading the saved files (None if none were saved)."""
        state = _read_json(self._state_file(layer))
        if state["threads"] != torch.get_num_threads():
            log.warning("Resuming with %d threads where the run used %d: results may differ in the last bits",
                        torch.get_num_threads(), state["threads"])
        modules = dict(model.named_modules())
        for k in range(layer + 1):
            for name, (result, stats) in load_results(self._layer_file(k)).items():
                gptq.install(name, modules[name], result, stats)
        torch.set_rng_state(torch.frombuffer(bytearray.fromhex(state["rng"]), dtype=torch.uint8))
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(
                [torch.frombuffer(bytearray.fromhex(s), dtype=torch.uint8) for s in state["cuda_rng"]]
            )
        if not state["batches"]:
            return None
        files = sorted(self._hidden_dir(layer).glob("b*.safetensors"))
        if len(files) != state["batches"]:
            raise FabricqError(f"{self._hidden_dir(layer)} is incomplete: pass resume=false to start over")
        for file in files:
            check_hidden_file(file)
        stage = cache.new_stage()
        stage.adopt_files(files)
        return stage


def identity_hash(identity: dict) -> str:
    return _sha256(json.dumps(identity, sort_keys=True).encode())


def save_results(path: Path, results: dict[str, tuple[QuantizedWeight, dict]]) -> None:
    tensors, meta = {}, {}
    for name, (qw, stats) in results.items():
        # Codes packed like the exported checkpoint (a 4-bit layer of Llama-3-70B: 0.4 GB, not 0.8).
        tensors[f"{name}.codes_packed"] = (qw.packed_codes.to("cpu").contiguous() if isinstance(qw, PackedQuantizedWeight)
                                           else pack_int32(qw.codes.detach().to("cpu"), qw.scheme.bits))
        for part in ("scale", "zero", "g_idx"):
            tensors[f"{name}.{part}"] = getattr(qw, part).detach().to("cpu").contiguous()
        meta[name] = {"scheme": asdict(qw.scheme), "info": qw.info, "stats": stats}
    modules = json.dumps(meta)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"modules": modules, "sha256": tensors_sha256(tensors, modules)})
    apply_umask(tmp)
    os.replace(tmp, path)


def load_results(path: Path) -> dict[str, tuple[QuantizedWeight | PackedQuantizedWeight, dict]]:
    """The results of one layer file, in the form a run holds them (packed below 8 bits), checked
    against the checksum `save_results` stored."""
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # noqa: BLE001 - a torn or foreign file raises whatever safetensors raises
        raise damaged(path, f"unreadable: {' '.join(str(err).split())[:200]}") from None
    if "sha256" not in metadata or "modules" not in metadata:
        raise damaged(path, "no checksum")
    if tensors_sha256(tensors, metadata["modules"]) != metadata["sha256"]:
        raise damaged(path, "its content does not match its sha256 checksum")
    out = {}
    meta = json.loads(metadata["modules"])
    for name, m in meta.items():
        scheme = QuantScheme(**m["scheme"])
        parts = {p: tensors[f"{name}.{p}"] for p in ("scale", "zero", "g_idx")}
        packed, columns = tensors[f"{name}.codes_packed"], parts["g_idx"].numel()
        if scheme.bits < 8:
            qw = PackedQuantizedWeight(packed, columns, **parts, scheme=scheme, info=m["info"])
        else:
            qw = QuantizedWeight(unpack_int32(packed, scheme.bits, columns), **parts, scheme=scheme, info=m["info"])
        out[name] = (qw, m["stats"])
    return out
