"""The calibration pipeline's modes side by side on one model and the same tokens: speed, memory and
the quality each costs. Repeats are interleaved (A B C A B C) so machine drift hits all alike.

  one-forward  quant.true_sequential=true (default): one gated forward per layer, true-sequential
  two-forward  quant.true_sequential=false: calibrate the layer, quantize, forward again

    python benchmarks/pipeline_modes.py --num-samples 32 --repeats 2 --max-windows 4

With --threads 1 every run's torch ops are single-threaded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize import DEFAULT_CALIB, DEFAULT_EVAL, REPO, machine_info, print_aligned, run_recipe  # noqa: E402

MODES = {
    "one-forward": ["quant.true_sequential=true"],
    "two-forward": ["quant.true_sequential=false"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Hugging Face model folder (default: fabricq's default model)")
    p.add_argument("--recipe", default="gptq_w4")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--calib", default=str(DEFAULT_CALIB) if DEFAULT_CALIB.is_file() else None)
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval", default=str(DEFAULT_EVAL) if DEFAULT_EVAL.is_file() else None)
    p.add_argument("--eval-seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path)
    p.add_argument("--extra", nargs="*", default=[], help="further Hydra overrides for every run")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = (args.out or REPO / "benchmarks" / "results" / f"pipeline_modes-{stamp}.json").resolve()
    run_dir = out.with_suffix("")
    run_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info(args.threads)
    print(f"# {machine['cpu']} · {machine['logical_cores']} cores · {args.threads} thread(s) · {out}", flush=True)
    runs: dict[str, list[dict]] = {mode: [] for mode in args.modes}
    for r in range(args.repeats):
        for mode in args.modes:
            # Quality from the first repeat; later ones skip evaluation, whose logits (vocab × 2048
            # per window) would otherwise set the peak RSS and double the time of each run.
            extra = MODES[mode] + (["eval.enabled=false"] if r else [])
            result = run_recipe(args, args.recipe, run_dir, label=f"{mode}-{r}", extra=extra)
            if "error" in result:
                print(f"{mode} failed: {result['error']}", file=sys.stderr)
                return 1
            report = result["report"]
            runs[mode].append({"wall_s": report["wall_s"], "quantize_s": report["timings"]["quantize_s"],
                               "peak_rss_mib": report["peak_rss_mib"], "ppl_after": report.get("ppl_after"),
                               "kl_after": report.get("kl_after"), "ppl_before": report.get("ppl_before")})

    base = args.modes[0]
    rows = {}
    for mode, items in runs.items():
        timed = items[1:] or items  # without evaluation when there are repeats
        rows[mode] = {
            "quantize_s": statistics.median(i["quantize_s"] for i in items),
            "wall_s": statistics.median(i["wall_s"] for i in timed),
            "peak_rss_mib": max(i["peak_rss_mib"] for i in timed),
            # Runs of one mode are deterministic (same threads): quality from the first.
            "ppl_after": items[0]["ppl_after"], "kl_after": items[0]["kl_after"], "ppl_before": items[0]["ppl_before"],
        }
    for mode, row in rows.items():
        row["quantize_vs_" + base] = row["quantize_s"] / rows[base]["quantize_s"]
        row["wall_vs_" + base] = row["wall_s"] / rows[base]["wall_s"]

    cells = [["mode", "wall s", "quantize s", f"quantize / {base}", "peak RSS MiB", "ppl after", "KL"]]
    for mode, row in rows.items():
        cells.append([mode, f"{row['wall_s']:.1f}", f"{row['quantize_s']:.1f}", f"{row['quantize_vs_' + base]:.3f}",
                      f"{row['peak_rss_mib']:.0f}",
                      "-" if row["ppl_after"] is None else f"{row['ppl_after']:.3f}",
                      "-" if row["kl_after"] is None else f"{row['kl_after']:.5f}"])
    print()
    print(f"{args.num_samples} × {args.seq_len} calibration tokens, {args.repeats} interleaved repeat(s); "
          "quantize s: median of all; wall and peak RSS: runs without evaluation (all but the first) when "
          f"repeated; ppl/KL: first run, ppl before {rows[base]['ppl_before']}")
    print_aligned(cells, rule=True)
    out.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                               "runs": runs, "summary": rows}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
