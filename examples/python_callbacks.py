"""Quantize a Hugging Face model from Python with fabricq's layer loop and GPTQ callback (no CLI,
no Hydra): calibrate on your own token windows, then write a compressed-tensors checkpoint.

    python examples/python_callbacks.py MODEL_DIR TEXT_FILE OUTPUT_DIR [--bits 4] [--group-size 64]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fabricq.calibration.loop import CalibrationLoop
from fabricq.callbacks.gptq import GPTQCallback, GPTQSettings
from fabricq.callbacks.progress import ProgressCallback
from fabricq.checkpoint.compressed_tensors import load_dequantized_state_dict, save_compressed_checkpoint
from fabricq.quant.grid import QuantScheme


def token_windows(tokenizer, text: str, count: int, length: int) -> torch.Tensor:
    """`count` non-overlapping windows of `length` tokens from the start of `text`."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if len(ids) < count * length:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than {count} × {length}")
    return ids[: count * length].view(count, length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model"), parser.add_argument("text"), parser.add_argument("output")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    samples = token_windows(tokenizer, Path(args.text).read_text(), args.samples, args.seq_len)

    # One GPTQ callback on the layer loop: it observes each layer's Linear inputs, solves GPTQ for
    # every shared-input group and writes the dequantized weights back into the model in place.
    gptq = GPTQCallback(GPTQSettings(scheme=QuantScheme(args.bits, args.group_size, True, "static"),
                                     true_sequential=True))
    loop = CalibrationLoop(model, samples, device=torch.device("cpu"), batch_size=4,
                           callbacks=[gptq, ProgressCallback()])
    loop.run()
    gptq.close()

    save_compressed_checkpoint(model, gptq.quantized, Path(args.output), tokenizer)
    written = load_dequantized_state_dict(args.output)
    losses = [stats["loss"] / max(stats["rtn_loss"], 1e-30) for stats in gptq.stats.values()]
    print(f"{len(gptq.quantized)} modules quantized to {args.bits} bits; "
          f"GPTQ/RTN objective ratio: mean {sum(losses) / len(losses):.3f}; "
          f"checkpoint {args.output} ({len(written)} tensors)")


if __name__ == "__main__":
    main()
