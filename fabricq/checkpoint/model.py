"""What a writer takes from the model: the quantized modules checked against it, the tensors
written as they are, and config.json."""

from __future__ import annotations

from collections import defaultdict

import torch

from fabricq.quant.gptq import QuantizedWeight


def validate(model, modules: dict, quantized: dict[str, QuantizedWeight], scale_dtype=None) -> None:
    """Each entry of `quantized` names a module of `model` with a weight of its shape, on its grid,
    with contiguous groups unless act-order is dynamic, scales exact in `scale_dtype` (default: the
    weight's dtype), and not tied to another tensor."""
    names_by_storage = defaultdict(list)
    for key, tensor in model.state_dict().items():
        if tensor.device.type != "meta":
            names_by_storage[(tensor.device, tensor.untyped_storage().data_ptr())].append(key)
    for name, qw in quantized.items():
        module = modules.get(name)
        if module is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
            raise KeyError(f"{name!r} is not a module with a weight in {type(model).__name__}")
        rows, cols = module.weight.shape
        scheme = qw.scheme
        if tuple(qw.shape) != (rows, cols):
            raise ValueError(f"{name}: codes {tuple(qw.shape)} vs weight {(rows, cols)}")
        if scheme.group_size != -1 and cols % scheme.group_size != 0:
            raise ValueError(
                f"{name}: group size {scheme.group_size} does not divide {cols} input columns; "
                "no compressed-tensors loader accepts that (use effective_group_size)"
            )
        groups = scheme.groups_for(cols)
        if tuple(qw.scale.shape) != (rows, groups) or tuple(qw.zero.shape) != (rows, groups):
            raise ValueError(f"{name}: scale/zero must be {(rows, groups)}, got {tuple(qw.scale.shape)}")
        # (Packed codes are on the grid by construction: b bits unpack to [qmin, qmax].)
        if isinstance(qw, QuantizedWeight) and (qw.codes.min() < scheme.qmin or qw.codes.max() > scheme.qmax):
            raise ValueError(f"{name}: codes outside [{scheme.qmin}, {scheme.qmax}]")
        if scheme.symmetric and bool((qw.zero != 0).any()):
            raise ValueError(f"{name}: symmetric scheme with non-zero zero points")
        if scheme.actorder != "dynamic":
            expected = torch.zeros(cols, dtype=torch.long) if scheme.group_size == -1 else (
                torch.arange(cols) // scheme.group_size
            )
            if not torch.equal(qw.g_idx.long().cpu(), expected):
                raise ValueError(f"{name}: groups must be contiguous unless actorder is 'dynamic'")
        dtype = scale_dtype or module.weight.dtype
        scale = qw.scale.float().cpu()
        if not torch.equal(scale.to(dtype).float(), scale):
            raise ValueError(
                f"{name}: scales are not representable in {dtype}, the dtype they are stored in "
                "(quantize with scale_dtype equal to the model's dtype)"
            )
        storage = (module.weight.device, module.weight.untyped_storage().data_ptr())
        other = [n for n in names_by_storage.get(storage, []) if n != f"{name}.weight"]
        if other:
            raise ValueError(f"{name}: a quantized weight may not be tied to {other}")


def unquantized_state_dict(model, quantized) -> dict[str, torch.Tensor]:
    """The model's state dict without the quantized weights, tied aliases removed like
    `save_pretrained` does (e.g. lm_head.weight when tied to the embeddings)."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state_dict = remove_tied_weights_from_state_dict(model.state_dict(), model)
    for name in quantized:
        state_dict.pop(f"{name}.weight")
    return {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}


def model_config(model, dtype: torch.dtype) -> dict:
    """config.json's content without any previous `quantization_config` (e.g. a GGUF one), with
    `dtype` as the checkpoint's dtype."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    return config
