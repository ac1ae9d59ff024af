"""The trained adapters as a PEFT LoRA adapter folder, and the loading path that serves it.

`OUTPUT/adapter/` holds `adapter_config.json` (written by peft's own `LoraConfig`) and
`adapter_model.safetensors` with `base_model.model.<module>.lora_A.weight` (rank, in) and
`….lora_B.weight` (out, rank) for every adapted module, module names as in the exported
checkpoint. `target_modules` is the list of module-name suffixes (`q_proj`, …) when those select
exactly the adapted modules among the model's Linear modules (the usual form, and the one vLLM
matches against its own layer names), else the full names.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from fabricq.recovery.lora import LoRALinear

ADAPTER_DIR = "adapter"
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."


def target_modules_for(adapted: list[str], linear_names: list[str]) -> list[str]:
    """Suffixes when they select exactly `adapted` among `linear_names`, else the full names."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    chosen = {n for n in linear_names if n.rsplit(".", 1)[-1] in suffixes}
    return suffixes if chosen == set(adapted) else sorted(adapted)


def peft_tensors(modules: dict[str, LoRALinear], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in modules.items():
        out[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().to(dtype).contiguous().cpu()
        out[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().to(dtype).contiguous().cpu()
    return out


def save_peft_adapter(folder: Path, modules: dict[str, LoRALinear], linear_names: list[str], *,
                      base_model: str | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write `folder` as a PEFT LoRA adapter of `modules` (all with one rank/alpha/dropout)."""
    from peft import LoraConfig

    first = next(iter(modules.values()))
    dropout = first.dropout.p if isinstance(first.dropout, torch.nn.Dropout) else 0.0
    alpha = int(first.alpha) if float(first.alpha).is_integer() else first.alpha  # PEFT's field is an int
    config = LoraConfig(
        r=first.rank, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
        target_modules=target_modules_for(list(modules), linear_names), base_model_name_or_path=base_model,
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file(peft_tensors(modules, dtype), folder / WEIGHTS_NAME, metadata={"format": "pt"})
    return folder


def decompress_loaded(model) -> None:
    """Dequantize a compressed-tensors model transformers loaded packed. transformers 5 with
    compressed-tensors 0.20 leaves the packed Linear modules without a `weight` until a hook on
    the first forward decompresses them, and peft cannot wrap such a module (it reads
    `module.weight`): so decompress first, with the quantizer's own compressor."""
    quantizer = getattr(model, "hf_quantizer", None)
    compressor = getattr(quantizer, "compressor", None)
    if compressor is not None and any(hasattr(m, "weight_packed") for m in model.modules()):
        compressor.decompress_model(model)


def load_served(output_dir: Path, dtype=None):
    """A compressed-tensors model folder as a user loads it: `AutoModelForCausalLM.from_pretrained`,
    decompressed (`decompress_loaded`), in eval mode."""
    from transformers import AutoModelForCausalLM

    kwargs = {} if dtype is None else {"dtype": dtype}
    model = AutoModelForCausalLM.from_pretrained(Path(output_dir), **kwargs)
    decompress_loaded(model)
    return model.eval()


def load_with_adapter(output_dir: Path, adapter_dir: Path | None = None, dtype=None):
    """The exported compressed-tensors model with its adapter, as a user loads it:
    `AutoModelForCausalLM.from_pretrained(OUTPUT)`, decompressed (`decompress_loaded`), then
    `peft.PeftModel.from_pretrained(model, OUTPUT/"adapter")`; in eval mode."""
    from peft import PeftModel

    output_dir = Path(output_dir)
    model = load_served(output_dir, dtype)
    return PeftModel.from_pretrained(model, str(adapter_dir or output_dir / ADAPTER_DIR)).eval()
