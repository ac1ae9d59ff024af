"""The heap policy during an evaluation: freed blocks reused (`sysmem.reusing_freed_blocks`, what
`fabricq.evaluate.evaluate` does) against every large block mapped afresh (the run's
`cache.heap=compact` policy left as it is), on the default model and its first evaluation windows.

Each measurement is its own child process set up as `python -m fabricq` sets itself up (huge pages
for large tensors, `return_large_blocks_to_os`), alternating A B A B; a child loads the model,
resets the kernel's RSS high-water mark, evaluates, and reports wall, CPU and page faults of the
evaluation alone. Prints a table, writes benchmarks/results/eval-heap-<time>.json.

    python benchmarks/eval_heap.py --windows 3 --repeats 2 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("mapped", "reused")


def child(mode: str, windows: int) -> dict:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # before torch, as python -m fabricq
    import torch
    from hydra import compose, initialize_config_dir

    import fabricq.evaluate
    from fabricq.config import load_settings
    from fabricq.data import prepare_text
    from fabricq.models import load_model, load_tokenizer, resolve_model_source
    from fabricq.sysmem import return_large_blocks_to_os

    assert return_large_blocks_to_os()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        config = load_settings(compose("config"))
    source = resolve_model_source(config.model.path)
    text = prepare_text(load_tokenizer(source), config.data, config.eval)
    model = load_model(source, "float32").eval()
    if mode == "mapped":
        fabricq.evaluate.reusing_freed_blocks = contextlib.nullcontext
    Path("/proc/self/clear_refs").write_text("5")
    usage, tick = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    result = fabricq.evaluate.evaluate(model, text.evaluation[:windows], "cpu")
    wall, after = time.perf_counter() - tick, resource.getrusage(resource.RUSAGE_SELF)
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM"))
    return {"mode": mode, "windows": windows, "threads": torch.get_num_threads(), "wall_s": wall,
            "user_s": after.ru_utime - usage.ru_utime, "system_s": after.ru_stime - usage.ru_stime,
            "minor_faults": after.ru_minflt - usage.ru_minflt, "peak_rss_mib": peak, "ppl": result["ppl"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.windows)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    rows = []
    for _ in range(args.repeats):
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--windows", str(args.windows)],
                                 env=env, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    print("\n| heap during evaluation | wall s | user s | system s | minor faults | peak RSS MiB | ppl |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['mode']} | {r['wall_s']:.1f} | {r['user_s']:.1f} | {r['system_s']:.1f} | {r['minor_faults']} "
              f"| {r['peak_rss_mib']:.0f} | {r['ppl']:.6f} |")
    mean = {m: sum(r["wall_s"] for r in rows if r["mode"] == m) / args.repeats for m in MODES}
    print(f"\nreused / mapped wall: {mean['reused'] / mean['mapped']:.3f}")
    from fabricq.precision import cpu_flags, read_cpuinfo

    flags = sorted(cpu_flags(read_cpuinfo()))
    record = {"rows": rows, "ratio_wall": mean["reused"] / mean["mapped"], "load_avg": os.getloadavg(),
              "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                       "flags": [f for f in flags if f.startswith(("avx", "amx", "fma"))]}}
    out = REPO / "benchmarks" / "results" / f"eval-heap-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
