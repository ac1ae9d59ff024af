"""Where a fabricq run's peak resident memory happens: RSS per phase of one `python -m fabricq` run.

The run happens in a child process with a sampling thread (RSS, anonymous and file-backed parts,
every 2 ms) and markers at the phase boundaries: imports, tokenizer, data (reading + tokenizing
the calibration text), model load, first-layer capture, the calibrated layers, export, and the
rest (report, publish). A phase's peak is the highest sample in it, or the kernel's high-water
mark (VmHWM) when that rose during the phase (it catches spikes between samples). The lifetime
peak is the kernel's (what `wait4`, the comparison with llm-compressor, and report.json see).

Several sources (fabricq checkouts, e.g. an older commit unpacked with `git archive`) can be
compared on the same job, repeats interleaved (A B A B). Prints a table, writes JSON to
benchmarks/results/peak-rss-<time>.json.

    python benchmarks/peak_rss.py                                       # 32 × 512, this checkout
    python benchmarks/peak_rss.py --num-samples 128                     # the full calibration set
    git archive main | tar -x -C /tmp/fabricq-main
    python benchmarks/peak_rss.py --source /tmp/fabricq-main --source . # before / after
    python benchmarks/peak_rss.py --timeline model.path=DIR              # a row per layer step too

With --timeline each layer's forward and each solve step (a gate's group, e.g. `layer 3 solve
down_proj`) is a phase of its own, and the highest ten are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CALIB = REPO.parent / "shared" / "data" / "c4-train-sample.jsonl"
PHASES = ["imports", "tokenizer", "data", "load model", "capture", "layers", "export", "report"]


# ---------------------------------------------------------------- the child (one measured run)


def _status() -> dict[str, float]:
    """The process's memory counters in MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 1024
    return out


class PhaseSampler:
    """Samples memory on a thread; `mark(phase)` starts a new phase."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.phase = "imports"
        self.start = time.perf_counter()
        self.phases: dict[str, dict] = {}
        self._open(self.phase, _status())
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _open(self, phase: str, status: dict) -> None:
        self.phases[phase] = {"start_s": time.perf_counter() - self.start, "hwm_start": status["VmHWM"],
                              "peak_mib": status["VmRSS"], "anon_at_peak": status["RssAnon"],
                              "file_at_peak": status["RssFile"]}

    def _record(self, status: dict) -> None:
        entry = self.phases[self.phase]
        if status["VmRSS"] > entry["peak_mib"]:
            entry.update(peak_mib=status["VmRSS"], anon_at_peak=status["RssAnon"], file_at_peak=status["RssFile"])

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                self._record(_status())

    def mark(self, phase: str) -> None:
        if phase in self.phases:  # a phase entered again (a layer's second forward): its own row
            phase = f"{phase} #{sum(p == phase or p.startswith(phase + ' #') for p in self.phases) + 1}"
        with self._lock:
            status = _status()
            self._record(status)
            entry = self.phases[self.phase]
            entry["end_mib"] = status["VmRSS"]
            entry["end_s"] = time.perf_counter() - self.start
            if status["VmHWM"] > entry["hwm_start"]:  # a spike the samples may have missed
                entry["peak_mib"] = max(entry["peak_mib"], status["VmHWM"])
            self.phase = phase
            self._open(phase, status)

    def finish(self) -> dict:
        self.mark("done")
        self._stop.set()
        self._thread.join()
        del self.phases["done"]
        return {"phases": self.phases, "hwm_mib": _status()["VmHWM"]}


def _instrument(sampler: PhaseSampler) -> None:
    """Phase markers around the steps of `fabricq.app.run` (looked up by name, so older and newer
    checkouts work alike; a step a checkout lacks is simply not marked)."""
    import fabricq.calibration.loop as calibration
    from fabricq import app

    try:
        from fabricq.checkpoint import compressed_tensors as export
    except ImportError:  # checkouts before fabricq/checkpoint/
        from fabricq import export

    def around(module, name: str, phase: str, after: str) -> None:
        original = getattr(module, name, None)
        if original is None:
            return

        def wrapped(*args, **kwargs):
            sampler.mark(phase)
            try:
                return original(*args, **kwargs)
            finally:
                sampler.mark(after)

        setattr(module, name, wrapped)

    around(app, "load_tokenizer", "tokenizer", "data")
    around(app, "prepare_text", "data", "load model")
    around(app, "load_model", "load model", "capture")
    around(export, "save_compressed_checkpoint", "export", "report")
    capture = calibration.CalibrationLoop.capture

    def capture_marked(self, *args, **kwargs):
        sampler.mark("capture")
        try:
            return capture(self, *args, **kwargs)
        finally:
            sampler.mark("layers")

    calibration.CalibrationLoop.capture = capture_marked


def _instrument_layers(sampler: PhaseSampler) -> None:
    """Finer phases inside calibration: each layer's forwards and each solve step on its own
    (`--timeline`), to see which part of a layer sets the peak."""
    import fabricq.calibration.loop as calibration
    from fabricq.callbacks import gptq

    calibrate_layer = calibration.CalibrationLoop._calibrate_layer
    solve_step = gptq.GPTQCallback.solve_step

    def calibrate_layer_marked(self, index, *args, **kwargs):
        sampler.mark(f"layer {index} forward")
        return calibrate_layer(self, index, *args, **kwargs)

    def solve_step_marked(self, state, groups):
        short = "+".join(name.rsplit(".", 1)[-1] for group in groups for name in group)
        sampler.mark(f"layer {state.index} solve {short}")
        try:
            return solve_step(self, state, groups)
        finally:
            sampler.mark(f"layer {state.index} forward after {short}")

    calibration.CalibrationLoop._calibrate_layer = calibrate_layer_marked
    gptq.GPTQCallback.solve_step = solve_step_marked


def child(source: Path, result_path: Path, fabricq_args: list[str], timeline: bool = False) -> None:
    sampler = PhaseSampler()
    sys.path.insert(0, str(source))
    os.chdir(source)
    _instrument(sampler)
    if timeline:
        _instrument_layers(sampler)
    from fabricq.__main__ import main

    sys.argv = ["fabricq", *fabricq_args]
    main()
    result = sampler.finish()
    result_path.write_text(json.dumps(result, indent=2))


# ---------------------------------------------------------------- the parent


def run_once(args, source: Path, out: Path) -> dict:
    result_path = out.with_suffix(".json")
    fabricq_args = [f"+recipe={args.recipe}", f"quant.group_size={args.group_size}", f"data.path={args.calib}",
                    f"data.num_samples={args.num_samples}", f"data.seq_len={args.seq_len}",
                    f"data.batch_size={args.batch_size}", "eval.enabled=false", f"output_dir={out}",
                    "overwrite=true", "resume=false", *args.overrides]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(source), str(result_path),
           *(["--timeline"] if args.timeline else []), "--", *fabricq_args]
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(args.threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    print(f"$ [{source}] python -m fabricq", " ".join(fabricq_args), flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=source, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({source}):\n{stderr[-3000:]}")
    result = json.loads(result_path.read_text())
    report = json.loads((out / "report.json").read_text())
    shutil.rmtree(out)
    result_path.unlink()
    return {"source": str(source), "wall_s": wall, "quantize_s": report["timings"]["quantize_s"],
            "report_peak_rss_mib": report["peak_rss_mib"], **result}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sep = sys.argv.index("--")
        child(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[sep + 1 :], timeline="--timeline" in sys.argv[4:sep])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", action="append", type=Path,
                   help="a fabricq checkout to measure (repeatable; default: this one)")
    p.add_argument("--recipe", default="gptq_w4")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--calib", type=Path, default=DEFAULT_CALIB)
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeline", action="store_true",
                   help="also a row per layer forward and per solve step (the 10 highest are printed)")
    p.add_argument("overrides", nargs="*", help="more fabricq overrides")
    args = p.parse_args()
    sources = [s.resolve() for s in (args.source or [REPO])]
    args.calib = args.calib.resolve()

    stamp = time.strftime("%Y%m%d-%H%M%S")
    scratch = REPO / "benchmarks" / "results" / f"peak-rss-{stamp}"
    scratch.mkdir(parents=True, exist_ok=True)
    runs = [run_once(args, source, scratch / f"s{i}-r{r}")
            for r in range(args.repeats) for i, source in enumerate(sources)]
    shutil.rmtree(scratch, ignore_errors=True)

    def median(source, get):
        values = [get(run) for run in runs if run["source"] == str(source)]
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    def phase_peak(run, phase):  # a phase entered again is "phase #2"; --timeline splits "layers" into "layer N …"
        peaks = [v["peak_mib"] for k, v in run["phases"].items()
                 if k == phase or k.startswith(f"{phase} #") or (phase == "layers" and k.startswith("layer "))]
        return max(peaks) if peaks else None

    table = []
    for phase in PHASES:
        row = {"phase": phase}
        for source in sources:
            row[str(source)] = {
                "peak_mib": median(source, lambda run, phase=phase: phase_peak(run, phase)),
                "end_mib": median(source, lambda run, phase=phase: run["phases"].get(phase, {}).get("end_mib")),
            }
        table.append(row)
    totals = {str(s): {"hwm_mib": median(s, lambda run: run["hwm_mib"]),
                       "quantize_s": median(s, lambda run: run["quantize_s"])} for s in sources}

    names = [s.name or str(s) for s in sources]
    header = ["phase"] + [f"{n}: {col}" for n in names for col in ("peak MiB", "end MiB")]
    fmt = lambda v: "-" if v is None else f"{v:.0f}"
    cells = [header] + [[row["phase"]] + [fmt(row[str(s)][k]) for s in sources for k in ("peak_mib", "end_mib")]
                        for row in table]
    cells.append(["lifetime peak (VmHWM)"] + [x for s in sources for x in (fmt(totals[str(s)]["hwm_mib"]), "")])
    cells.append(["quantize s"] + [x for s in sources for x in (f"{totals[str(s)]['quantize_s']:.1f}", "")])
    if len(sources) > 1:
        base = totals[str(sources[0])]["hwm_mib"]
        cells.append(["peak vs first source"] + [x for s in sources for x in (f"{totals[str(s)]['hwm_mib'] / base:.3f}", "")])
    print(f"\n{args.num_samples} × {args.seq_len} tokens, batch {args.batch_size}, {args.threads} thread(s), "
          f"median of {args.repeats} interleaved repeat(s)")
    # Imported here, not at the top: the measured child imports this file.
    from quantize import print_aligned

    print_aligned(cells)
    if args.timeline:
        for run in runs[: len(sources)]:
            fine = sorted(((v["peak_mib"], k) for k, v in run["phases"].items() if k.startswith("layer ")), reverse=True)
            print(f"\nhighest calibration steps ({run['source']}, first repeat):")
            print_aligned([["step", "peak MiB", "end MiB"]] + [[k, f"{p:.0f}", f"{run['phases'][k].get('end_mib', 0):.0f}"]
                                                         for p, k in fine[:10]])
    out = REPO / "benchmarks" / "results" / f"peak-rss-{stamp}.json"
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "machine": platform.platform(),
                               "table": table, "totals": totals, "runs": runs}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
