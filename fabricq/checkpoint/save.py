"""The writer dispatch: the formats `export.format` names, in `export.dtype`; and the model
rounded to what they hold, for evaluating it."""

from __future__ import annotations

from pathlib import Path

import torch

from fabricq.checkpoint.engines import GPTQ_SUBDIR, resolve_export_dtype, written_formats


def save_checkpoints(model, quantized: dict, output_dir, tokenizer, export) -> list[str]:
    """Write the formats export.format names in export.dtype; returns the directories written
    (relative to output_dir). With `both`, compressed-tensors fills output_dir and the GPTQ copy
    goes to output_dir/gptq."""
    # Looked up when called: tests and benchmarks wrap the writers in their modules.
    from fabricq.checkpoint.compressed_tensors import save_compressed_checkpoint
    from fabricq.checkpoint.gptq import save_gptq_checkpoint

    output_dir = Path(output_dir)
    dtype = resolve_export_dtype(getattr(export, "dtype", "auto"), model.dtype)
    formats = written_formats(getattr(export, "format", "compressed-tensors"))
    written = []
    if "compressed-tensors" in formats:
        save_compressed_checkpoint(model, quantized, output_dir, tokenizer, dtype=dtype)
        written.append(".")
    if "gptq" in formats:
        target = output_dir / GPTQ_SUBDIR if len(formats) > 1 else output_dir
        save_gptq_checkpoint(model, quantized, target, tokenizer, dtype=dtype)
        written.append(str(target.relative_to(output_dir)))
    return written


def round_unquantized(model, quantized, dtype: torch.dtype) -> None:
    """Round, in place, the floating-point tensors the export writes as they are (all but the
    quantized weights) through `dtype`, so that evaluating the model measures the weights the
    checkpoint holds."""
    skip = {f"{name}.weight" for name in quantized}
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if key in skip or tensor.device.type == "meta":
                continue
            if tensor.is_floating_point() and tensor.dtype != dtype:
                tensor.copy_(tensor.to(dtype))
