"""The default run, `python -m fabricq +recipe=gptq_w4`, of this checkout against a previous commit,
in one invocation on the same machine: process wall, CPU seconds, peak RSS and the report's phase
times. Each commit runs from its own `git archive` copy (so editing the tree during the run changes
nothing), with the given threads and a private FABRICQ_CACHE; `--warm` first runs this checkout
once so its evaluation cache holds the original model's reference (the "second run" of issue 17).
Prints a table, writes benchmarks/results/default-run-<time>.json.

    python benchmarks/default_run.py --baseline 71fd409 --warm --threads 2
    python benchmarks/default_run.py --baseline 71fd409 --cache /tmp/ab17/cache   # cache already warm
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def checkout(ref: str, into: Path) -> Path:
    """`ref`'s tree under `into` (the package finds its configs there as in a wheel)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", ref], cwd=REPO, check=True, capture_output=True).stdout
    with tempfile.TemporaryFile() as f:
        f.write(archive)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(into, filter="data")
    if (into / "conf").is_dir() and not (into / "fabricq" / "conf").exists():
        (into / "fabricq" / "conf").symlink_to("../conf")
    return into


def run(label: str, tree: Path, out: Path, cache: Path, threads: int, extra: list[str]) -> dict:
    env = {**os.environ, "FABRICQ_CACHE": str(cache), "OMP_NUM_THREADS": str(threads)}
    tick = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as log:
        child = subprocess.Popen([sys.executable, "-m", "fabricq", "+recipe=gptq_w4", f"output_dir={out}", *extra],
                                 cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own CPU time and peak RSS
        child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - tick
    if child.returncode:
        raise SystemExit(f"{label} failed ({child.returncode}): see {out.with_suffix('.log')}")
    report = json.loads((out / "report.json").read_text())
    return {"label": label, "process_wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "system_s": usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024, "run_wall_s": report["wall_s"],
            "timings": report["timings"],
            "ppl_before": report.get("ppl_before"), "ppl_after": report.get("ppl_after"),
            "kl_after": report.get("kl_after"), "eval_cached": report.get("eval", {}).get("cached"),
            "load_avg_after": os.getloadavg()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", required=True, help="git revision to compare against")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", help="FABRICQ_CACHE for this checkout (default: a fresh folder)")
    p.add_argument("--warm", action="store_true", help="run this checkout once first to fill its cache")
    p.add_argument("--work", help="scratch folder (default: a temporary one, removed)")
    p.add_argument("extra", nargs="*", help="overrides for both runs")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="fabricq-default-run-"))
    try:
        new = checkout("HEAD", work / "new")
        old = checkout(args.baseline, work / "old")
        cache = Path(args.cache) if args.cache else work / "cache"
        rows = []
        if args.warm:
            rows.append(run("this checkout, cache miss", new, work / "miss", cache, args.threads, args.extra))
        rows.append(run("this checkout, cache hit", new, work / "hit", cache, args.threads, args.extra))
        rows.append(run(f"baseline {args.baseline}", old, work / "old-run", work / "old-cache", args.threads,
                        args.extra))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    base = rows[-1]
    print("\n| run | process wall s | × baseline | CPU s | peak RSS MiB | eval before s | quantize s | eval after s |"
          "\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        t = r["timings"]
        print(f"| {r['label']} | {r['process_wall_s']:.1f} | {r['process_wall_s'] / base['process_wall_s']:.3f} "
              f"| {r['cpu_s']:.0f} | {r['peak_rss_mib']:.0f} | {t.get('eval_before_s', 0):.1f} "
              f"| {t.get('quantize_s', 0):.1f} | {t.get('eval_after_s', 0):.1f} |")
    from fabricq.precision import cpu_flags, read_cpuinfo

    flags = sorted(cpu_flags(read_cpuinfo()))
    record = {"baseline": args.baseline, "threads": args.threads, "rows": rows,
              "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                       "flags": [f for f in flags if f.startswith(("avx", "amx", "fma"))]}}
    out = REPO / "benchmarks" / "results" / f"default-run-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
