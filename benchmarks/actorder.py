"""Act-order modes on one model: static, dynamic and folded, at W4 g128 and W3 g128 (one
`python -m fabricq` process per run, as benchmarks/quantize.py runs them), WikiText-2 perplexity
and KL against the unquantized model, then a table and a JSON file with every report.

    python benchmarks/actorder.py                       # W4 and W3, 4 evaluation windows
    python benchmarks/actorder.py --bits 4 --num-samples 64
    python benchmarks/actorder.py --dry-run             # the commands only

`dynamic` stores a g_idx per column, which compressed-tensors refuses: its runs export the GPTQ
format (desc_act) instead; every run is evaluated in memory after quantization, the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize import (  # beside this script
    DEFAULT_CALIB,
    DEFAULT_EVAL,
    REPO,
    machine_info,
    print_aligned,
    run_recipe,
    summary,
)

RECIPES = {3: "gptq_w3", 4: "gptq_w4"}
ACTORDERS = ("static", "dynamic", "folded")


def extras(actorder: str, group_size: int) -> list[str]:
    out = [f"quant.actorder={actorder}", f"quant.group_size={group_size}"]
    return out + (["export.format=gptq"] if actorder == "dynamic" else [])


def table(rows: list[dict]) -> list[list[str]]:
    cells = [["bits", "actorder", "ppl after", "× static ppl", "KL", "× static KL", "GPTQ/RTN obj", "quantize s"]]
    for row in rows:
        base = next(r for r in rows if r["bits"] == row["bits"] and r["actorder"] == "static")
        cells.append([
            str(row["bits"]), row["actorder"], f"{row['ppl_after']:.3f}", f"{row['ppl_after'] / base['ppl_after']:.4f}",
            f"{row['kl_after']:.5f}", f"{row['kl_after'] / base['kl_after']:.4f}",
            f"{row['objective_ratio']:.4f}", f"{row['quantize_s']:.0f}",
        ])
    return cells


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3], choices=sorted(RECIPES))
    p.add_argument("--actorders", nargs="+", default=list(ACTORDERS), choices=ACTORDERS)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--model", default=None, help="model folder (default: the config's model)")
    p.add_argument("--calib", default=str(DEFAULT_CALIB) if DEFAULT_CALIB.is_file() else None)
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval", default=str(DEFAULT_EVAL) if DEFAULT_EVAL.is_file() else None)
    p.add_argument("--eval-seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--extra", nargs="*", default=[], help="further Hydra overrides for every run")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--dry-run", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.out) / f"actorder-{stamp}"
    runs = [(bits, actorder) for bits in args.bits for actorder in args.actorders]
    if args.dry_run:
        for bits, actorder in runs:
            print(RECIPES[bits], " ".join(extras(actorder, args.group_size)))
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    rows, results = [], []
    for bits, actorder in runs:
        result = run_recipe(args, RECIPES[bits], run_dir, label=f"w{bits}_{actorder}",
                            extra=extras(actorder, args.group_size))
        if "error" in result:
            print(f"w{bits} {actorder}: {result['error']}", file=sys.stderr)
            continue
        results.append(result)
        rows.append({**summary(result), "bits": bits, "actorder": actorder})
        (run_dir / "actorder.json").write_text(json.dumps(
            {"machine": machine_info(args.threads), "args": vars(args), "rows": rows,
             "reports": [r["report"] for r in results]}, indent=2) + "\n")
    if rows and all(any(r["bits"] == row["bits"] and r["actorder"] == "static" for r in rows) for row in rows):
        print_aligned(table(rows), rule=True)
    print(f"results: {run_dir / 'actorder.json'}")


if __name__ == "__main__":
    main()
