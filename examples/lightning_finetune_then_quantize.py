"""Fine-tune a Hugging Face causal LM with a Lightning Trainer, quantize it with GPTQ at the end of
fit (`fabricq.callbacks.GPTQ`), then validate the quantized model.

    python examples/lightning_finetune_then_quantize.py [--model DIR] [--text FILE] [--output DIR]
        [--steps 4] [--samples 8] [--seq-len 64] [--devices 1]

Defaults: ../shared/models/stories260k and ../shared/data/tinystories-sample.txt.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer

from fabricq.callbacks import GPTQ

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


class CausalLM(L.LightningModule):
    def __init__(self, path: str, lr: float):
        super().__init__()
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        self.lr = lr

    def training_step(self, batch, index):
        loss = self.model(**batch, labels=batch["input_ids"]).loss
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, index):
        self.log("val/loss", self.model(**batch, labels=batch["input_ids"]).loss, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def windows(tokenizer, text: str, length: int) -> list[dict]:
    """Non-overlapping windows of `length` tokens, as the dicts a tokenizer returns."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    rows = ids[: len(ids) // length * length].view(-1, length)
    return [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "models" / "stories260k"))
    parser.add_argument("--text", default=str(SHARED / "data" / "tinystories-sample.txt"))
    parser.add_argument("--output", default=None, help="checkpoint + report.json (default: quantize in place only)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = windows(tokenizer, Path(args.text).read_text(), args.seq_len)
    train, val = DataLoader(data[:-4], batch_size=4, shuffle=True), DataLoader(data[-4:], batch_size=4)
    module = CausalLM(args.model, args.lr)
    gptq = GPTQ(recipe="gptq_w4", num_samples=args.samples, seq_len=args.seq_len, output_dir=args.output,
                tokenizer=tokenizer, overrides=["data.batch_size=4"])
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", devices=args.devices, callbacks=[gptq],
                        strategy="ddp" if args.devices > 1 else "auto", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False)
    trainer.fit(module, train)  # fine-tune; at the end of fit the model is quantized in place
    loss = trainer.validate(module, val, verbose=False)[0]["val/loss"]  # the quantized model
    if trainer.global_rank == 0:
        print(f"{len(gptq.result.quantized)} modules quantized in {gptq.result.report['wall_s']:.1f} s; "
              f"validation of the quantized model: loss {loss:.3f}, perplexity {math.exp(loss):.2f}"
              + (f"; wrote {args.output}" if args.output else ""))


if __name__ == "__main__":
    main()
