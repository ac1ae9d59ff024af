"""Which calibration text shape quantizes best: A/B of `data.sampling` (stream | documents) and
`data.bos` (BOS at the start of every window or not), all in one run, on one model.

Each variant is one `python -m fabricq` process (evaluation off) from the same calibration file;
every exported checkpoint is then reloaded and evaluated here on the SAME held-out windows, in the
tokenizer's own convention (BOS per window when its default encoding adds one), against the
unquantized model: perplexity and KL(original ‖ quantized). Variants that resolve to the same
windows on this tokenizer (BOS on and off, when it adds none) run once.

    OMP_NUM_THREADS=1 python benchmarks/calibration_text.py --model ../shared/models/stories260k \\
        --eval ../shared/data/tinystories-sample.txt --seq-len 256 --eval-seq-len 256 --seeds 0 1 2
    OMP_NUM_THREADS=1 python benchmarks/calibration_text.py --max-windows 4   # the default model
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize import (
    DEFAULT_CALIB,
    DEFAULT_EVAL,
    REPO,
    machine_info,
    print_aligned,
    run_recipe,
)

VARIANTS = {  # name: (data.sampling, data.bos)
    "stream, no BOS": ("stream", False),
    "stream, BOS": ("stream", "auto"),
    "documents, no BOS": ("documents", False),
    "documents, BOS": ("documents", "auto"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Hugging Face model folder (default: fabricq's default model)")
    p.add_argument("--recipe", default="gptq_w4")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--calib", default=str(DEFAULT_CALIB) if DEFAULT_CALIB.is_file() else None)
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval", default=str(DEFAULT_EVAL) if DEFAULT_EVAL.is_file() else None)
    p.add_argument("--eval-seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None, help="evaluation windows (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="data.seed of each repeat")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path)
    p.add_argument("--extra", nargs="*", default=[], help="further Hydra overrides for every run")
    args = p.parse_args(argv)
    if args.eval is None or args.calib is None:
        p.error("--calib and --eval are needed (../shared/data is absent)")
    return args


def load(args, folder: Path | None = None):
    """(model, tokenizer): a checkpoint folder, or the benchmarked original."""
    from transformers import AutoModelForCausalLM

    from fabricq.models import load_model, load_tokenizer, resolve_model_source

    if folder is not None:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), None
    source = resolve_model_source(args.model)
    return load_model(source, "float32").eval(), load_tokenizer(source)


def eval_windows(args, tokenizer) -> tuple[torch.Tensor, bool]:
    from fabricq.data import evaluation_windows, read_text, resolve_bos, tokenize_stream

    bos_id = resolve_bos(tokenizer, "auto")
    stream = tokenize_stream(tokenizer, [read_text(Path(args.eval))])
    return evaluation_windows(stream, args.eval_seq_len, args.max_windows, bos_id), bos_id is not None


def main(argv=None) -> int:
    from fabricq.data import resolve_bos
    from fabricq.evaluate import evaluate

    args = parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = (args.out or REPO / "benchmarks" / "results" / f"calibration_text-{stamp}.json").resolve()
    run_dir = out.with_suffix("")
    run_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info(args.threads)
    torch.set_num_threads(args.threads)
    print(f"# {machine['cpu']} · {args.threads} thread(s) · {out}", flush=True)

    original, tokenizer = load(args)
    adds_bos = resolve_bos(tokenizer, "auto") is not None
    variants, seen = [], set()
    for name in args.variants:
        sampling, bos = VARIANTS[name]
        key = (sampling, adds_bos and bos == "auto")
        if key not in seen:  # BOS auto == off on a tokenizer that adds none
            seen.add(key)
            variants.append(name)
    windows, eval_bos = eval_windows(args, tokenizer)
    print(f"# tokenizer adds BOS: {adds_bos}; evaluation: {tuple(windows.shape)} windows, BOS {eval_bos}", flush=True)
    reference = evaluate(original, windows, "cpu", keep=len(windows))
    ppl_fp = reference["ppl"]
    del original

    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for seed in args.seeds:
        for name in variants:
            sampling, bos = VARIANTS[name]
            label = f"{name.replace(', ', '-').replace(' ', '_')}-seed{seed}"
            extra = [f"data.sampling={sampling}", f"data.bos={str(bos).lower()}", f"data.seed={seed}",
                     "eval.enabled=false"]
            result = run_recipe(args, args.recipe, run_dir, label=label, extra=extra)
            if "error" in result:
                print(f"{name} failed: {result['error']}", file=sys.stderr)
                return 1
            model, _ = load(args, Path(result["output_dir"]))
            after = evaluate(model, windows, "cpu", reference=reference["logprobs"])
            runs[name].append({"seed": seed, "ppl": after["ppl"], "kl": after["kl"],
                               "quantize_s": result["report"]["timings"]["quantize_s"]})
            print(f"  {name} seed {seed}: ppl {after['ppl']:.4f} KL {after['kl']:.5f}", flush=True)
            del model

    rows = {name: {"ppl": statistics.mean(r["ppl"] for r in items), "kl": statistics.mean(r["kl"] for r in items),
                   "ppl_loss": statistics.mean(r["ppl"] for r in items) / ppl_fp - 1}
            for name, items in runs.items()}
    cells = [["variant", f"ppl (fp {ppl_fp:.4f})", "ppl loss", "KL", "runs"]]
    for name, row in rows.items():
        cells.append([name, f"{row['ppl']:.4f}", f"{100 * row['ppl_loss']:+.2f}%", f"{row['kl']:.5f}",
                      str(len(runs[name]))])
    print()
    print_aligned(cells, rule=True)
    best = min(rows, key=lambda n: rows[n]["kl"])
    print(f"lowest KL: {best}")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    out.write_text(json.dumps({
        "settings": settings, "machine": machine, "tokenizer_adds_bos": adds_bos,
        "eval_windows": list(windows.shape), "ppl_fp": ppl_fp, "summary": rows, "runs": runs,
        "lowest_kl": best,
    }, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v)))
    print(f"Wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
