"""Weight files against their config, before any weight is loaded: the tensors the config's model
holds (built on the meta device) against the safetensors headers, and every value finite.

transformers fills a tensor missing from the files with random values and drops extra ones, so a
truncated or mismatched checkpoint would otherwise be quantized and exported without a word.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from fabricq.errors import FabricqError

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# Elements read at once while scanning for NaN/Inf (a float32 chunk: 4 MiB). One buffer serves
# every chunk, so the scan holds a few chunks' worth of memory whatever the size of the files.
SCAN_ELEMENTS = 1 << 20
_LAYER_INDEX = re.compile(r"\.(\d+)\.")

Header = dict[str, tuple[str, tuple[int, ...], Path]]


def one_line(err: BaseException) -> str:
    """A library's multi-line error message as one line."""
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


def _meta_model(folder: Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config_file = folder / "config.json"
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as err:
        raise FabricqError(f"{config_file} cannot be read by transformers: {one_line(err)}") from None
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and layers <= 0:
        raise FabricqError(f"{config_file} declares num_hidden_layers={layers}: a model needs at least one layer")
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as err:
        raise FabricqError(f"{config_file} does not describe a model transformers can build: {one_line(err)}") from None


def _names_in_model(model, names) -> dict[str, tuple[str, bool]]:
    """file tensor name → (its name in the model, whether a converter reshapes it on load), by
    transformers' own checkpoint conversion rules (renamed norms, fused experts...)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        conversions = get_model_conversion_mapping(model)
    except Exception:  # a transformers without these rules: names as stored
        return {n: (n, False) for n in names}
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    meta = model.state_dict()
    out = {}
    for name in names:
        target, pattern = rename_source_key(name, renamings, converters, model.base_model_prefix, meta)
        out[name] = (target, pattern is not None)
    return out


def _layer_of(name: str) -> int | None:
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def _fields_equal_to(config: dict, values: set[int]) -> str:
    fields = [f"{k}={v}" for k, v in config.items() if isinstance(v, int) and not isinstance(v, bool) and v in values]
    return ", ".join(fields[:3])


def check_tensors_match_config(folder: Path, config: dict, headers: Header) -> None:
    """Every tensor the config's model holds is in the files with its shape and a matching kind
    of dtype, and the files hold nothing else (tied weights may be absent). One error naming the
    tensor and the config field."""
    model = _meta_model(folder)
    expected = model.state_dict()
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    may_miss = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or []]
    may_add = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    layers = getattr(model.config, "num_hidden_layers", None)
    in_files = {_layer_of(n) for n in headers} - {None}
    file_layers = max(in_files) + 1 if in_files else 0
    arch = f"model_type={config.get('model_type')}"

    mapped = _names_in_model(model, headers)
    extra = [n for n, (target, _) in mapped.items() if target not in expected and not any(p.search(n) for p in may_add)]
    if extra:
        name = min(extra, key=lambda n: (_layer_of(n) or 0, n))
        if isinstance(layers, int) and file_layers > layers:
            raise FabricqError(
                f"config.json num_hidden_layers={layers} but the weight files hold {file_layers} layers "
                f"({name} in {headers[name][2].name}): a model built from this config would drop layers; "
                "fix num_hidden_layers in config.json"
            )
        raise FabricqError(
            f"the weight files hold {len(extra)} tensor(s) the config.json model ({arch}) does not have, e.g. "
            f"{name} in {headers[name][2].name}: config.json does not describe these weights"
        )
    present = {target for target, _ in mapped.values()}
    missing = [n for n in expected if n not in present and n not in tied and not any(p.search(n) for p in may_miss)]
    if missing:
        name = min(missing, key=lambda n: (_layer_of(n) or 0, n))
        if isinstance(layers, int) and _layer_of(name) is not None and file_layers < layers:
            hint = f"config.json num_hidden_layers={layers} but the weight files hold {file_layers} layers"
        elif name.startswith("lm_head") and config.get("tie_word_embeddings") is False:
            hint = "config.json tie_word_embeddings=false: set it to true if the model shares its embeddings"
        else:
            hint = f"config.json ({arch}) needs it; transformers would fill it with random values"
        raise FabricqError(f"{name} is missing from the weight files in {folder} ({len(missing)} missing): {hint}")

    for name, (target, converted) in mapped.items():
        if converted:  # reshaped on load (e.g. experts fused): only present-or-not is comparable
            continue
        dtype, shape, file = headers[name]
        want = expected[target]
        if tuple(want.shape) != shape:
            differing = {w for w, s in zip(want.shape, shape) if w != s} if len(shape) == want.dim() else set(want.shape)
            fields = _fields_equal_to(config, differing)
            raise FabricqError(
                f"{name} has shape {list(shape)} in {file.name} but config.json builds {list(want.shape)}"
                f"{f' ({fields})' if fields else ''}: config.json does not match the weights"
            )
        if want.is_floating_point() != (dtype in FLOAT_DTYPES):
            kind = "quantized (float8)" if dtype.startswith("F8") else dtype
            raise FabricqError(
                f"{name} is stored as {kind} in {file.name} where the model holds {str(want.dtype).removeprefix('torch.')}: "
                "fabricq needs an unquantized checkpoint with floating-point weights"
            )
    _check_tied_copies(model, headers)


def _data_ranges(file: Path) -> dict[str, tuple[int, int]]:
    """name → (first byte, end byte) of each tensor's data in a safetensors file, from its header
    (8-byte little-endian header length, JSON header, then the data)."""
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    return {name: (8 + length + entry["data_offsets"][0], 8 + length + entry["data_offsets"][1])
            for name, entry in header.items() if name != "__metadata__"}


def _chunks(f, span: tuple[int, int], dtype: torch.dtype, buffer: bytearray):
    """The tensor stored in bytes `span` of the open file `f`, as consecutive flat chunks read
    into `buffer` (each valid until the next is read). Plain reads, not a memory map: the file's
    pages stay in the page cache, not in this process's resident memory."""
    size = dtype.itemsize
    step = len(buffer) // size * size
    view = memoryview(buffer)
    f.seek(span[0])
    position = span[0]
    while position < span[1]:
        want = min(step, span[1] - position)
        got = 0
        while got < want:
            n = f.readinto(view[got:want])
            if not n:
                raise FabricqError(f"{f.name} ends inside a tensor's data (truncated file?)")
            got += n
        position += got
        yield torch.frombuffer(buffer, dtype=dtype, count=got // size)


def _scan_buffer(dtype: torch.dtype) -> bytearray:
    return bytearray(SCAN_ELEMENTS * dtype.itemsize)


def _check_tied_copies(model, headers: Header) -> None:
    """A tied weight stored twice must be the same tensor: transformers keeps only one of them."""
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if target not in headers or source not in headers or headers[target][:2] != headers[source][:2]:
            continue
        dtype = TORCH_DTYPES.get(headers[target][0])
        if dtype is None:
            continue
        a_file, b_file = headers[target][2], headers[source][2]
        a_span, b_span = _data_ranges(a_file)[target], _data_ranges(b_file)[source]
        with open(a_file, "rb") as a, open(b_file, "rb") as b:
            pairs = zip(_chunks(a, a_span, dtype, _scan_buffer(dtype)), _chunks(b, b_span, dtype, _scan_buffer(dtype)))
            if not all(torch.equal(x, y) for x, y in pairs):
                raise FabricqError(
                    f"{target} differs from {source} in the weight files, but config.json ties them "
                    f"(tie_word_embeddings): the model would use {source} for both; set tie_word_embeddings=false"
                )


def check_finite(files: list[Path], headers: Header) -> None:
    """No NaN/Inf in any floating-point tensor (embeddings and norms included), read in chunks
    into one reused buffer so memory stays low."""
    buffers: dict[torch.dtype, bytearray] = {}
    for file in files:
        spans = _data_ranges(file)
        with open(file, "rb") as f:
            for name, span in sorted(spans.items(), key=lambda item: item[1]):  # in file order
                dtype = TORCH_DTYPES.get(headers[name][0])
                if dtype is None:
                    continue
                if dtype not in buffers:
                    buffers[dtype] = _scan_buffer(dtype)
                # count_nonzero: a bool tensor's sum() would first cast it to int64 (8× the mask).
                bad = sum(chunk.numel() - int(torch.count_nonzero(torch.isfinite(chunk)))
                          for chunk in _chunks(f, span, dtype, buffers[dtype]))
                if bad:
                    raise FabricqError(
                        f"weights of {name.removesuffix('.weight')} contain {bad} NaN/Inf values ({name} in "
                        f"{file.name}): refusing to quantize"
                    )
