"""`python -m fabricq.convert SRC DST --to gptq|compressed-tensors [--dtype D] [--overwrite]`

Converts a quantized checkpoint between compressed-tensors pack-quantized and the GPTQ format
without re-quantizing: the codes, scales and zero points are the same numbers in the other
layout (qweight is the transpose of weight_packed; zero points move to the v1 "minus one"
convention). Where the other format cannot hold them exactly, it refuses, naming the module:
scales not representable in float16 (GPTQ) or in the target dtype (compressed-tensors),
dynamic act-order g_idx (compressed-tensors >= 0.19 refuses it), shapes the GPTQ words do not fill.
compressed-tensors → GPTQ → compressed-tensors gives back the same files byte for byte.

Every other file of SRC (tokenizer, generation config, report) is copied. DST is written beside
itself and moved into place complete; a non-empty DST is refused unless --overwrite.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from fabricq.checkpoint.convert import to_compressed_tensors, to_gptq
from fabricq.checkpoint.engines import EXPORT_DTYPES, FORMAT_ALIASES
from fabricq.checkpoint.load import checkpoint_dtype, load_checkpoint
from fabricq.cli import ArgumentParser, run_command
from fabricq.errors import FabricqError
from fabricq.output import OutputClaim, check_inputs_outside

TARGETS = ("gptq", "compressed-tensors")
# Files of a checkpoint that the converter writes itself instead of copying.
WEIGHT_FILES = ("config.json", "quantize_config.json", "model.safetensors.index.json")


def _check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    """The main command's output rules (fabricq.output): DST may not be, contain or lie inside
    SRC, even with --overwrite; a non-empty DST only with --overwrite."""
    check_inputs_outside(dst, {"the source SRC": src}, name="destination", overwrite="--overwrite")
    if dst.is_symlink():  # replacing it would replace the link, not the folder it names
        raise FabricqError(f"destination {dst} is a symbolic link (to {os.readlink(dst)}): pass the directory itself")
    if dst.exists() and not dst.is_dir():
        raise FabricqError(f"destination {dst} is a file, not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise FabricqError(f"destination {dst} exists and is not empty: choose another directory or pass --overwrite")


def convert(src, dst, to: str, *, dtype: str = "auto", overwrite: bool = False) -> Path:
    """Convert checkpoint `src` into `dst` in format `to`; returns `dst`."""
    src, dst = Path(src), Path(dst)
    to = FORMAT_ALIASES.get(to, to)
    if to not in TARGETS:
        raise FabricqError(f"--to must be one of {TARGETS}, got {to!r}")
    if dtype != "auto" and dtype not in EXPORT_DTYPES:
        raise FabricqError(f"--dtype must be auto or one of {sorted(EXPORT_DTYPES)}, got {dtype!r}")
    _check_destination(src, dst, overwrite)
    checkpoint = load_checkpoint(src)
    if checkpoint.fmt == to:
        raise FabricqError(f"{src} is already in the {to} format")
    target_dtype = checkpoint_dtype(checkpoint) if dtype == "auto" else EXPORT_DTYPES[dtype]
    if dtype != "auto" and to == "gptq":
        checkpoint.tensors = {k: v.to(target_dtype) if v.is_floating_point() else v
                              for k, v in checkpoint.tensors.items()}
        checkpoint.config = {**checkpoint.config, "dtype": dtype}
    if to == "gptq" and checkpoint.config.get("dtype") is None:
        checkpoint.config = {**checkpoint.config, "dtype": str(target_dtype).removeprefix("torch.")}

    # As the main command writes its output (fabricq.output): locked, written into a staging folder
    # beside DST, swapped in complete; a crash leaves the old DST or the new one, never a mix.
    claim = OutputClaim(dst, overwrite, writer=True)
    claim.acquire()
    failed = True
    try:
        _check_destination(src, dst, overwrite)  # again, under the lock
        staging = claim.new_staging()
        if to == "gptq":
            to_gptq(checkpoint, staging)
        else:
            to_compressed_tensors(checkpoint, staging, target_dtype)
        for file in sorted(src.iterdir()):
            if file.is_file() and file.suffix != ".safetensors" and file.name not in WEIGHT_FILES:
                shutil.copy2(file, staging / file.name)
        claim.publish(staging)
        failed = False
    finally:
        claim.release(failed=failed)
    return dst


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m fabricq.convert", description=__doc__.split("\n\n")[1])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--to", required=True, help="gptq | compressed-tensors")
    parser.add_argument("--dtype", default="auto",
                        help="auto (the source's) | float16 | bfloat16 | float32: unquantized tensors (and "
                             "compressed-tensors scales, which must be exact in it)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    args = parser.parse_args(argv)

    def body() -> int:
        convert(args.src, args.dst, args.to, dtype=args.dtype, overwrite=args.overwrite)
        print(f"wrote {args.dst} ({FORMAT_ALIASES.get(args.to, args.to)})")
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
