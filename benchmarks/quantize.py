"""Quantize one model with several recipes and compare them: one `python -m fabricq` process per
recipe (so peak RSS and timings are per run), then a table and a JSON file with every report.

    python benchmarks/quantize.py --recipes gptq_w4 rtn_w4 --threads 1
    python benchmarks/quantize.py --max-windows 2 --num-samples 8 --recipes gptq_w4   # quick
    python benchmarks/quantize.py --dry-run    # print the Hydra commands and resolved config only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DEFAULT_CALIB = SHARED / "c4-train-sample.jsonl"
DEFAULT_EVAL = SHARED / "wikitext-2-raw-test.txt"


def hydra_value(value) -> str:
    """A Hydra override value: null, or a single-quoted string (safe for any path)."""
    if value is None:
        return "null"
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def overrides(args, recipe: str, output_dir: Path, extra: list[str] = ()) -> list[str]:
    result = [f"+recipe={recipe}", f"output_dir={hydra_value(output_dir)}", "overwrite=true"]
    if args.model:
        result.append(f"model.path={hydra_value(Path(args.model).resolve())}")
    if args.calib:
        result.append(f"data.path={hydra_value(Path(args.calib).resolve())}")
    if args.eval:
        result.append(f"eval.path={hydra_value(Path(args.eval).resolve())}")
    result += [
        f"data.num_samples={args.num_samples}",
        f"data.seq_len={args.seq_len}",
        f"eval.seq_len={args.eval_seq_len}",
        f"eval.max_windows={'null' if args.max_windows is None else args.max_windows}",
    ]
    return result + list(args.extra) + list(extra)


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    return env


def run_recipe(args, recipe: str, run_dir: Path, label: str | None = None, extra: list[str] = (),
               env: dict | None = None) -> dict:
    """Run fabricq once, streaming its log to the terminal and to run_dir/<label>.log (label:
    the recipe by default; `extra` overrides and `env` variables on top of args')."""
    label = label or recipe
    output_dir = run_dir / label
    cmd = [sys.executable, "-m", "fabricq", *overrides(args, recipe, output_dir, extra)]
    print("$", " ".join(cmd), flush=True)
    log_path = run_dir / f"{label}.log"
    start = time.perf_counter()
    with open(log_path, "w") as log, subprocess.Popen(
        cmd, cwd=REPO, env={**child_env(args.threads), **(env or {})}, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    ) as proc:
        for line in proc.stdout:
            log.write(line)
            log.flush()
            print(f"  [{label}] {line}", end="", flush=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        return {"recipe": recipe, "error": f"exit code {proc.returncode}, see {log_path}", "log": str(log_path)}
    report = json.loads((output_dir / "report.json").read_text())
    return {"recipe": recipe, "process_s": elapsed, "log": str(log_path), "output_dir": str(output_dir),
            "report": report}


def objective_ratio(modules: dict) -> float | None:
    """Mean over modules of GPTQ's layer objective / RTN's on the same Hessian (GPTQ runs only)."""
    ratios = [m["loss"] / m["rtn_loss"] for m in modules.values() if m.get("rtn_loss")]
    return sum(ratios) / len(ratios) if ratios else None


def summary(result: dict) -> dict:
    r = result.get("report", {})
    row = {
        "recipe": result["recipe"],
        "method": r.get("method"),
        "wall_s": r.get("wall_s"),
        "quantize_s": r.get("timings", {}).get("quantize_s"),
        "peak_rss_mib": r.get("peak_rss_mib"),
        "ppl_before": r.get("ppl_before"),
        "ppl_after": r.get("ppl_after"),
        "kl_after": r.get("kl_after"),
        "objective_ratio": objective_ratio(r.get("modules", {})),
    }
    if row["ppl_before"] and row["ppl_after"]:
        row["ppl_ratio"] = row["ppl_after"] / row["ppl_before"]
    return row


COLUMNS = [  # (key, header, format)
    ("recipe", "recipe", "{}"), ("wall_s", "wall s", "{:.1f}"), ("quantize_s", "quantize s", "{:.1f}"),
    ("peak_rss_mib", "peak RSS MiB", "{:.0f}"), ("ppl_before", "ppl before", "{:.3f}"),
    ("ppl_after", "ppl after", "{:.3f}"), ("ppl_ratio", "after/before", "{:.4f}"),
    ("kl_after", "KL", "{:.5f}"), ("objective_ratio", "GPTQ/RTN obj", "{:.4f}"),
]


def print_aligned(cells: list[list[str]], rule: bool = False) -> None:
    """Rows of text cells as columns: the first left-aligned, the rest right-aligned; `rule`
    underlines the first row (the header)."""
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    for n, r in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if rule and n == 0:
            print("  ".join("-" * w for w in widths))


def print_table(rows: list[dict]) -> None:
    cells = [[h for _, h, _ in COLUMNS]]
    for row in rows:
        cells.append([fmt.format(row[k]) if row.get(k) is not None else "-" for k, _, fmt in COLUMNS])
    print_aligned(cells, rule=True)


def ratios(rows: list[dict]) -> dict:
    """Each recipe against the first RTN recipe: wall, quantize time, ppl after, KL."""
    base = next((r for r in rows if r["method"] == "rtn"), None)
    out = {}
    for row in rows:
        if base is None or row is base or row["method"] is None:
            continue
        key = f"{row['recipe']}/{base['recipe']}"
        out[key] = {k: row[k] / base[k] for k in ("wall_s", "quantize_s", "ppl_after", "kl_after", "peak_rss_mib")
                    if row.get(k) is not None and base.get(k)}
    return out


def machine_info(threads: int) -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return {
        "cpu": model,
        "logical_cores": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": threads,
        "python": platform.python_version(),
        "torch": version("torch"),
        "transformers": version("transformers"),
        "fabricq_commit": commit.stdout.strip() or None,
        "host": platform.node(),
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Hugging Face model folder (default: fabricq's default model)")
    p.add_argument("--recipes", nargs="+", default=["gptq_w4", "rtn_w4"])
    p.add_argument("--calib", default=str(DEFAULT_CALIB) if DEFAULT_CALIB.is_file() else None,
                   help="calibration text (default: %(default)s; built-in text if absent)")
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval", default=str(DEFAULT_EVAL) if DEFAULT_EVAL.is_file() else None,
                   help="evaluation text (default: %(default)s; held-out calibration documents if absent)")
    p.add_argument("--eval-seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None, help="evaluation windows (default: all)")
    p.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of each run")
    p.add_argument("--out", type=Path, help="results JSON (default: benchmarks/results/quantize-<timestamp>.json)")
    p.add_argument("--extra", nargs="*", default=[], help="further Hydra overrides, e.g. quant.damp=0.05")
    p.add_argument("--dry-run", action="store_true", help="print each run's resolved config, run nothing")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = (args.out or REPO / "benchmarks" / "results" / f"quantize-{stamp}.json").resolve()
    run_dir = out.with_suffix("")  # checkpoints and logs next to the JSON
    if args.dry_run:
        for recipe in args.recipes:
            cmd = [sys.executable, "-m", "fabricq", *overrides(args, recipe, run_dir / recipe), "--cfg", "job"]
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, cwd=REPO, check=True)
        return 0

    run_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info(args.threads)
    print(f"# {machine['cpu']} · {machine['logical_cores']} cores · torch {machine['torch']} · "
          f"{args.threads} thread(s) · results in {out}", flush=True)
    results = [run_recipe(args, recipe, run_dir) for recipe in args.recipes]
    rows = [summary(r) for r in results]
    ratio = ratios(rows)

    print()
    print_table(rows)
    for key, values in ratio.items():
        print(f"{key}: " + ", ".join(f"{k} ×{v:.3f}" for k, v in values.items()))
    for r in results:
        if "error" in r:
            print(f"{r['recipe']}: FAILED, {r['error']}")

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": settings, "machine": machine, "summary": rows, "ratios": ratio,
                               "runs": results}, indent=2))
    print(f"Wrote {out}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
