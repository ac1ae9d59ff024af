"""Speed-up of data-parallel calibration: N ranks × T threads against 1 rank × T threads (or × S).

Runs `python -m fabricq` on the same model and data with trainer.devices=1 and =N, interleaved
(1, N, 1, N, ...) so that load from other processes hits both alike, and reports per run:

- end-to-end: the process's wall time (interpreter start to exit) and the run's own `wall_s`;
- calibration: `timings.quantize_s` (capture, forwards, Hessians, solves, error propagation);
- GPTQ phase: on one rank the wall time of the solve steps (`timings.solve_steps_s`: solves and
  installs of the quantized weights); on N ranks the sum over the solve steps (Hessian
  reduction, solves, result broadcast, installs), i.e. the critical path. A step's first wait,
  for the slowest rank to finish its forwards ("arrival"), is calibration imbalance: it is
  printed on its own and not counted here. Rank 0's split of the steps (arrival, reduce, solve,
  results, metadata, install) is in the JSON;
- bytes communicated (Hessian reductions to owners, result broadcasts, metadata).

    OMP_NUM_THREADS=1 python benchmarks/distributed.py                 # 128 × 512 C4, 2 ranks
    python benchmarks/distributed.py --single-threads 2 --no-eval       # 2 ranks × 1 thread vs 1 rank × 2
    python benchmarks/distributed.py --samples 32 --repeats 2           # shorter

Writes benchmarks/results/distributed-<time>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
C4 = REPO.parent / "shared" / "data" / "c4-train-sample.jsonl"


def run_once(ranks: int, args, out: Path) -> dict:
    threads = args.single_threads if ranks == 1 and args.single_threads else args.threads
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [
        sys.executable, "-m", "fabricq", f"+recipe={args.recipe}", f"data.path={args.data}",
        f"data.num_samples={args.samples}", f"data.seq_len={args.seq_len}", f"data.batch_size={args.batch_size}",
        f"eval.enabled={str(args.eval).lower()}", f"eval.max_windows={args.eval_windows}", f"eval.seq_len={args.eval_seq_len}",
        f"trainer.devices={ranks}", f"output_dir={out}", *args.extra,
    ]
    if args.model:
        cmd.append(f"model.path={args.model}")
    start = time.perf_counter()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=not args.verbose)
    process_s = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    report = json.loads((out / "report.json").read_text())
    if ranks == 1:
        # The solve steps' wall time (solves and installs), as on N ranks; older reports: the
        # modules' solve seconds (no installs).
        gptq_s = report["timings"].get("solve_steps_s") or sum(m["seconds"] for m in report["modules"].values())
        arrival_s, phases_s = 0.0, {}
        bytes_sent = {}
        balance = None
        cpu_per_rank = [cpu_s]
    else:
        layers = report["distributed"]["layers"]
        # From the moment every rank holds its Hessians: the wait for the slowest rank's forwards
        # (arrival) is calibration imbalance, reported on its own.
        arrival_s = sum(layer.get("phases_s", {}).get("arrival", 0.0) for layer in layers)
        gptq_s = sum(layer["wall_s"] for layer in layers) - arrival_s
        phases_s = {}
        for layer in layers:
            for key, seconds in layer.get("phases_s", {}).items():
                phases_s[key] = phases_s.get(key, 0.0) + seconds
        bytes_sent = report["distributed"]["bytes_sent"]
        cpu_per_rank = report["distributed"].get("cpu_s_per_rank")
        balance = sum(layer["achieved_makespan_s"] for layer in layers) / sum(
            sum(layer["achieved_per_rank_s"]) / ranks for layer in layers)
    return {
        "ranks": ranks, "process_s": process_s, "wall_s": report["wall_s"],
        "quantize_s": report["timings"]["quantize_s"], "gptq_s": gptq_s, "arrival_s": arrival_s,
        "gptq_phases_s_rank0": phases_s, "bytes_sent": bytes_sent,
        "solve_makespan_over_ideal": balance, "ppl_after": report.get("ppl_after"),
        "cpu_s_all_processes": cpu_s, "cpu_s_per_rank": cpu_per_rank,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="threads per rank")
    parser.add_argument("--single-threads", type=int, default=None,
                        help="threads of the 1-rank run (default --threads): e.g. 2 ranks × 1 thread against "
                             "1 rank × 2 threads, the same cores used either way")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--recipe", default="gptq_w4")
    parser.add_argument("--data", default=str(C4))
    parser.add_argument("--model", default=None, help="model folder (default: fabricq's default model)")
    parser.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--eval-seq-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("extra", nargs="*", help="more fabricq overrides")
    args = parser.parse_args()

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for ranks in (1, args.ranks):
                result = run_once(ranks, args, Path(tmp) / f"r{repeat}-{ranks}")
                runs.append(result)
                print(f"repeat {repeat} ranks {ranks}: process {result['process_s']:.1f} s, run {result['wall_s']:.1f} s, "
                      f"calibration {result['quantize_s']:.1f} s, GPTQ {result['gptq_s']:.1f} s", flush=True)

    def mean(key, ranks):
        values = [r[key] for r in runs if r["ranks"] == ranks]
        return sum(values) / len(values)

    rows = []
    for key, label in (("process_s", "end-to-end (process)"), ("wall_s", "end-to-end (run wall_s)"),
                       ("quantize_s", "calibration loop"), ("gptq_s", "GPTQ phase")):
        one, many = mean(key, 1), mean(key, args.ranks)
        rows.append({"phase": label, "one_rank_s": one, "ranks_s": many, "speedup": one / many})
    load = os.getloadavg()
    print(f"\n{args.ranks} ranks × {args.threads} thread(s) vs 1 rank × {args.single_threads or args.threads}; {args.samples} × {args.seq_len} "
          f"tokens of {Path(args.data).name}; {args.repeats} repeat(s); load average now {load[0]:.1f}\n")
    print(f"| phase | 1 rank (s) | {args.ranks} ranks (s) | speed-up |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['phase']} | {r['one_rank_s']:.1f} | {r['ranks_s']:.1f} | {r['speedup']:.2f}x |")
    multi = [r for r in runs if r["ranks"] == args.ranks][-1]
    single = [r for r in runs if r["ranks"] == 1][-1]
    # Under load from other processes, wall-clock ratios say how much CPU the runs were given; the
    # CPU seconds say how the work was split. (Rank 1..N-1 are not children this process reaps, so
    # the ranks' own accounting, taken before export, is used for them.)
    per_rank = multi["cpu_s_per_rank"] or []
    if per_rank:
        print(f"\nCPU seconds: 1 rank {single['cpu_s_all_processes']:.0f} (whole process); {args.ranks} ranks "
              f"{per_rank} (each rank, until export); 1-rank CPU / busiest rank's CPU = "
              f"{single['cpu_s_all_processes'] / max(per_rank):.2f}x — the speed-up if every rank had its own idle core "
              "and never waited (an upper estimate; the solve imbalance below and the export are on top)")
    total = sum(multi["bytes_sent"].values())
    print(f"\nbytes communicated per run: {total / 2**20:.1f} MiB ({', '.join(f'{k} {v / 2**20:.1f} MiB' for k, v in multi['bytes_sent'].items())}); "
          f"solve makespan / ideal {multi['solve_makespan_over_ideal']:.3f}")
    if multi["gptq_phases_s_rank0"]:
        print(f"rank 0's solve steps: {', '.join(f'{k} {v:.1f} s' for k, v in multi['gptq_phases_s_rank0'].items())} "
              f"(arrival = waiting for the slowest rank's forwards, not in the GPTQ phase above)")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = REPO / "benchmarks" / "results" / f"distributed-{stamp}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "runs": runs, "summary": rows, "loadavg": load}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
