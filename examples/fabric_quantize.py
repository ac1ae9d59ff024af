"""The Python API inside a Fabric script: every rank loads the model and the same token windows,
`fabricq.quantize` shares the calibration out over the Fabric's ranks, rank 0 writes.

    python examples/fabric_quantize.py MODEL_DIR TEXT_FILE OUTPUT_DIR [--devices 2] [--bits 4]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from lightning.fabric import Fabric
from transformers import AutoModelForCausalLM, AutoTokenizer

import fabricq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model"), parser.add_argument("text"), parser.add_argument("output")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args()

    fabric = Fabric(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto")
    fabric.launch()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ids = tokenizer(Path(args.text).read_text(), return_tensors="pt").input_ids[0]
    need = (args.samples + 2) * args.seq_len
    if len(ids) < need:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than {need}")
    windows = ids[:need].view(-1, args.seq_len)
    calibration, evaluation = windows[: args.samples], windows[args.samples :]  # the last two held out

    result = fabricq.quantize(model, calibration, recipe="gptq_w4", overrides=[f"quant.bits={args.bits}", "data.batch_size=2"],
                              fabric=fabric, eval_ids=evaluation)
    result.save(args.output, tokenizer=tokenizer)
    report = result.report
    fabric.print(f"{len(result.quantized)} modules at {args.bits} bits on {fabric.world_size} rank(s): perplexity "
                 f"{report['ppl_before']:.2f} → {report['ppl_after']:.2f}; wrote {args.output}")


if __name__ == "__main__":
    main()
