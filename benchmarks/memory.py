"""Memory and transfer benchmark of the calibration loop: peak RSS with a small host budget (the
activation cache spills to disk) against an unlimited one, and the wall time of both (prefetch is always on).
Two RSS numbers: the process's lifetime peak (includes loading the model and export) and the peak
sampled during calibration, at every read and write of the activation cache.

One `python -m fabricq` process per run (so peak RSS is per run), variants interleaved
(A B C D A B C D …) so drifting machine load hits all of them alike; evaluation is off so the
numbers are calibration's. Prints a table of medians and ratios and writes every report to
benchmarks/results/memory-<time>.json.

    OMP_NUM_THREADS=1 python benchmarks/memory.py                    # default model, 2 repeats
    python benchmarks/memory.py --num-samples 32 --repeats 1         # quick
    # solve only v_proj (the cache's work is the same, the runs are 5x shorter):
    python benchmarks/memory.py --num-samples 32 "quant.ignore=['q_proj','k_proj','o_proj','mlp']"
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from quantize import REPO, child_env, hydra_value, print_aligned


def variants(batch_mib: float) -> dict[str, list[str]]:
    small = f"{2 * batch_mib:.3f}"  # two batches resident in host memory, the rest on disk
    # Budgets need the two-forward mode (true-sequential holds a layer's activations of every batch).
    layer_mode = "quant.true_sequential=false"
    return {
        "unlimited": ["cache.host_mib=null", layer_mode],
        f"host {small} MiB": [f"cache.host_mib={small}", layer_mode],
    }


def run_once(args, name: str, extra: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "fabricq", f"+recipe={args.recipe}", f"output_dir={hydra_value(out)}",
           "overwrite=true", "resume=false", "eval.enabled=false", f"data.num_samples={args.num_samples}",
           f"data.seq_len={args.seq_len}", f"data.batch_size={args.batch_size}", *extra, *args.overrides]
    if args.model:
        cmd.append(f"model.path={hydra_value(Path(args.model).resolve())}")
    print("$", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(args.threads), capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    shutil.rmtree(out)  # only the report is kept
    return {"variant": name, "process_s": elapsed, "report": report}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder (default: SmolLM2-135M)")
    p.add_argument("--recipe", default="gptq_w4")
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=576, help="of the model (sizes the small budget)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("overrides", nargs="*", help="more fabricq overrides, e.g. \"quant.ignore=['mlp']\"")
    args = p.parse_args()

    batch_mib = args.batch_size * args.seq_len * args.hidden_size * 4 / 2**20
    stamp = time.strftime("%Y%m%d-%H%M%S")
    scratch = REPO / "benchmarks" / "results" / f"memory-{stamp}"
    runs = []
    for r in range(args.repeats):
        for i, (name, extra) in enumerate(variants(batch_mib).items()):
            runs.append(run_once(args, name, extra, scratch / f"v{i}-r{r}"))

    rows = []
    for name in variants(batch_mib):
        mine = [x["report"] for x in runs if x["variant"] == name]
        cache = mine[-1]["cache"]
        rows.append({
            "variant": name,
            "peak_rss_mib": statistics.median(m["peak_rss_mib"] for m in mine),
            "calibration_rss_mib": statistics.median(m["cache"]["peak_process_rss_mib"] for m in mine),
            "quantize_s": statistics.median(m["timings"]["quantize_s"] for m in mine),
            "cache_host_peak_mib": cache["host"]["peak_mib"],
            "cache_disk_peak_mib": cache["disk"]["peak_mib"],
            "spilled_batches": cache["disk"]["spilled_batches"],
        })
    base = rows[0]
    for row in rows:
        row["rss_vs_unlimited"] = row["peak_rss_mib"] / base["peak_rss_mib"]
        row["calibration_rss_vs_unlimited"] = row["calibration_rss_mib"] / base["calibration_rss_mib"]
        row["time_vs_unlimited"] = row["quantize_s"] / base["quantize_s"]

    header = ["variant", "peak RSS MiB", "× RSS", "calibration RSS MiB", "× cal. RSS", "quantize s", "× time",
              "cache host MiB", "disk MiB", "spilled"]
    cells = [header] + [[r["variant"], f"{r['peak_rss_mib']:.0f}", f"{r['rss_vs_unlimited']:.3f}",
                         f"{r['calibration_rss_mib']:.0f}", f"{r['calibration_rss_vs_unlimited']:.3f}",
                         f"{r['quantize_s']:.1f}", f"{r['time_vs_unlimited']:.3f}",
                         f"{r['cache_host_peak_mib']:.1f}", f"{r['cache_disk_peak_mib']:.1f}",
                         str(r["spilled_batches"])] for r in rows]
    print(f"\n{args.num_samples} × {args.seq_len} tokens, batch {args.batch_size}, {args.threads} thread(s), "
          f"median of {args.repeats} interleaved repeats {' '.join(args.overrides)}")
    print_aligned(cells)

    out = REPO / "benchmarks" / "results" / f"memory-{stamp}.json"
    out.write_text(json.dumps({"args": vars(args), "machine": platform.platform(), "rows": rows, "runs": runs}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
