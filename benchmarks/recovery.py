"""Recovery fine-tuning on the default model: how much of the W3 / W4 gap it closes, how long it
takes against the GPTQ phase, and its peak RSS against the quantization's.

For each recipe: one `python -m fabricq` run (C4 calibration, WikiText-2 test evaluation), then
each recovery on a copy of its output with `python -m fabricq.recover COPY +recovery=NAME`
(one process each, so peak RSS and timings are per recovery), optionally also on 2 ranks.

    python benchmarks/recovery.py                                  # W3 and W4, eora + lora, 1 rank
    python benchmarks/recovery.py --recipes gptq_w4 --recoveries eora lora qlora --ranks 1 2
    python benchmarks/recovery.py --reuse DIR                      # recover existing outputs DIR/<recipe>
    python benchmarks/recovery.py --max-windows 2 --num-samples 16 --extra recovery.steps=8   # quick

Each quantization runs twice when --rss is given: once with evaluation (perplexity before/after)
and once without, whose lifetime peak RSS is the quantization phase's alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from quantize import (DEFAULT_CALIB, DEFAULT_EVAL, child_env, hydra_value, machine_info,  # noqa: E402
                      print_aligned)


def stream(cmd: list[str], log_path: Path, label: str, env: dict) -> tuple[int, float]:
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log, subprocess.Popen(cmd, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                                                      stderr=subprocess.STDOUT) as proc:
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if "it/s]" not in line and "step/s" not in line:
                print(f"  [{label}] {line}", end="", flush=True)
    return proc.returncode, time.perf_counter() - start


def quantize(args, recipe: str, out: Path, evaluate: bool = True) -> dict:
    cmd = [sys.executable, "-m", "fabricq", f"recipe={recipe}", f"output_dir={hydra_value(out)}", "overwrite=true",
           f"data.num_samples={args.num_samples}", f"data.seq_len={args.seq_len}",
           f"eval.seq_len={args.eval_seq_len}", f"eval.max_windows={args.max_windows}", f"eval.enabled={str(evaluate).lower()}"]
    if args.calib:
        cmd.append(f"data.path={hydra_value(Path(args.calib).resolve())}")
    if args.eval:
        cmd.append(f"eval.path={hydra_value(Path(args.eval).resolve())}")
    code, elapsed = stream(cmd + list(args.quant_extra), out.with_suffix(".log"), recipe, child_env(args.threads))
    if code != 0:
        raise SystemExit(f"{recipe}: exit code {code}, see {out.with_suffix('.log')}")
    report = json.loads((out / "report.json").read_text())
    return {"process_s": elapsed, "report": report}


def recover(args, source: Path, name: str, ranks: int) -> dict:
    label = f"{source.name}-{name}-{ranks}r"
    target = source.parent / label
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("adapter"))
    cmd = [sys.executable, "-m", "fabricq.recover", str(target), f"+recovery={name}", *args.extra]
    if ranks > 1:
        cmd += [f"trainer.devices={ranks}", "trainer.accelerator=cpu", "trainer.strategy=ddp"]
        if name != "eora":  # equal global batch: the one-rank runs accumulate over as many micro-batches
            cmd.append("recovery.grad_accum=1")
    elif name != "eora" and 2 in args.ranks:
        cmd.append("recovery.grad_accum=2")
    code, elapsed = stream(cmd, target.with_suffix(".log"), label, child_env(args.threads))
    if code != 0:
        return {"label": label, "error": f"exit code {code}, see {target.with_suffix('.log')}"}
    section = json.loads((target / "report.json").read_text())["recovery"]
    return {"label": label, "recipe": source.name, "recovery": name, "ranks": ranks, "process_s": elapsed,
            "section": section}


COLUMNS = [("label", "{}"), ("ppl_before", "{:.3f}"), ("ppl_after", "{:.3f}"), ("ppl_after_recovery", "{:.3f}"),
           ("ppl_gap_closed", "{:.1%}"), ("kl_after", "{:.4f}"), ("kl_after_recovery", "{:.4f}"),
           ("kl_gap_closed", "{:.1%}"), ("wall_s", "{:.0f}"), ("train_s", "{:.0f}"), ("gptq_s", "{:.0f}"),
           ("peak_rss_mib", "{:.0f}"), ("quant_rss_mib", "{:.0f}")]


def row(result: dict, runs: dict) -> dict:
    s = result.get("section", {})
    run = runs.get(result.get("recipe"), {})
    return {**s, "label": result["label"], "train_s": s.get("timings", {}).get("train_s"),
            "gptq_s": run.get("quantize_s"), "quant_rss_mib": run.get("quant_rss_mib")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=["gptq_w3", "gptq_w4"])
    p.add_argument("--recoveries", nargs="+", default=["eora", "lora"])
    p.add_argument("--ranks", nargs="+", type=int, default=[1])
    p.add_argument("--calib", default=str(DEFAULT_CALIB) if DEFAULT_CALIB.is_file() else None)
    p.add_argument("--eval", default=str(DEFAULT_EVAL) if DEFAULT_EVAL.is_file() else None)
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="OMP threads of each process (rank)")
    p.add_argument("--reuse", type=Path, help="a folder with finished outputs <recipe>/ to recover instead of quantizing")
    p.add_argument("--rss", action="store_true", help="also quantize without evaluation for the phase's peak RSS")
    p.add_argument("--out", type=Path, help="results JSON (default: benchmarks/results/recovery-<timestamp>.json)")
    p.add_argument("--extra", nargs="*", default=[], help="overrides for every recovery, e.g. recovery.steps=32")
    p.add_argument("--quant-extra", nargs="*", default=[], help="overrides for every quantization")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = (args.out or REPO / "benchmarks" / "results" / f"recovery-{stamp}.json").resolve()
    work = args.reuse.resolve() if args.reuse else out.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    machine = machine_info(args.threads)
    print(f"# {machine['cpu']} · {machine['logical_cores']} cores · {args.threads} thread(s) per process · {work}")
    runs, results = {}, []
    for recipe in args.recipes:
        source = work / recipe
        if not args.reuse:
            quantize(args, recipe, source)
        report = json.loads((source / "report.json").read_text())
        runs[recipe] = {"quantize_s": report.get("timings", {}).get("quantize_s"), "wall_s": report.get("wall_s"),
                        "peak_rss_mib": report.get("peak_rss_mib"), "ppl_before": report.get("ppl_before"),
                        "ppl_after": report.get("ppl_after"), "kl_after": report.get("kl_after")}
        if args.rss:
            quiet = quantize(args, recipe, work / f"{recipe}-noeval", evaluate=False)["report"]
            runs[recipe]["quant_rss_mib"] = quiet.get("peak_rss_mib")
        for name in args.recoveries:
            for ranks in args.ranks if name != "eora" else [1]:
                results.append(recover(args, source, name, ranks))
    rows = [row(r, runs) for r in results if "section" in r]
    cells = [[k for k, _ in COLUMNS]] + [[fmt.format(r[k]) if r.get(k) is not None else "-" for k, fmt in COLUMNS]
                                         for r in rows]
    print_aligned(cells, rule=True)
    speedups = {}
    for r in rows:
        if r.get("world_size") == 2:
            one = next((o for o in rows if o.get("world_size") == 1 and o["label"].replace("-1r", "") ==
                        r["label"].replace("-2r", "")), None)
            if one and one.get("train_s") and r.get("train_s"):
                speedups[r["label"]] = {"train": one["train_s"] / r["train_s"], "wall": one["wall_s"] / r["wall_s"]}
    if speedups:
        print("2 ranks vs 1:", json.dumps(speedups))
    out.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
                               "results": results, "speedups": speedups}, indent=2))
    print(f"wrote {out}")
    return 0 if all("section" in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
