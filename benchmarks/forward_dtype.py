"""float32 vs bf16 calibration forwards on the default model (SmolLM2-135M, saved in float32): the
same command with `model.dtype=float32` (what `auto` does for a float32 model) and with
`model.dtype=bfloat16`, in one invocation, interleaved A B A B: process wall, CPU seconds, peak
RSS, and the report's perplexities and KL. Quality numbers do not depend on load; the timings do,
so compare CPU seconds where the machine was busy. The host's CPU flags go into the JSON.

    python benchmarks/forward_dtype.py --threads 1 --repeats 1

Prints a table, writes benchmarks/results/forward-dtype-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
# The every-host issue's setting: W4 g64 from 64 × 512 C4 tokens, 4 × 2048 WikiText-2 windows.
RUN = ["+recipe=gptq_w4", "quant.group_size=64", f"data.path={SHARED / 'c4-train-sample.jsonl'}",
       "data.num_samples=64", "data.seq_len=512", f"eval.path={SHARED / 'wikitext-2-raw-test.txt'}",
       "eval.seq_len=2048", "eval.max_windows=4", "eval.kl_windows=4", "eval.cache=false"]


def run_once(dtype: str, threads: int, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HYDRA_FULL_ERROR": "0"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "fabricq", *RUN, f"model.dtype={dtype}", f"output_dir={out}"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stderr = proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"model.dtype={dtype} failed:\n{stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"dtype": dtype, "wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024), "ppl_before": report["ppl_before"],
            "ppl_after": report["ppl_after"], "kl_after": report["kl_after"],
            "quantize_s": report.get("timings", {}).get("quantize_s"), "precision": report["precision"],
            "load_avg_after": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from fabricq.precision import cpu_flags, cpu_model, native_bf16_flags, read_cpuinfo

    info = read_cpuinfo()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for dtype in ("float32", "bfloat16"):
                rows.append({"repeat": repeat, **run_once(dtype, args.threads, Path(tmp) / f"{dtype}-{repeat}")})
                print(f"{dtype:9s} wall {rows[-1]['wall_s']:7.1f} s  cpu {rows[-1]['cpu_s']:7.1f} s  "
                      f"peak {rows[-1]['peak_rss_mib']:5d} MiB  ppl {rows[-1]['ppl_before']:.3f} → "
                      f"{rows[-1]['ppl_after']:.3f}  KL {rows[-1]['kl_after']:.4f}", flush=True)
    result = {"host": {"cpu": cpu_model(info), "flags": sorted(cpu_flags(info)),
                       "native_bf16_flags": native_bf16_flags(cpu_flags(info))},
              "threads": args.threads, "command": ["python", "-m", "fabricq", *RUN, "model.dtype=…"], "runs": rows}
    folder = REPO / "benchmarks" / "results"
    folder.mkdir(exist_ok=True)
    path = folder / f"forward-dtype-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
