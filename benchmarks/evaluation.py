"""Evaluation before/after quantization: the previous evaluator (HEAD's fabricq/evaluate.py, or
--old-ref) against this checkout's chunked, top-k, cached one, on the default model and its
default evaluation windows, each in its own child process.

Each child loads the model, resets the kernel's RSS high-water mark (so the peak is the
evaluation's own, with the model resident), evaluates the original model (keeping its KL
reference), rounds every decoder Linear to 4 bits (RTN, groups of 128: a stand-in for the
quantized model; the same weights for both evaluators), evaluates again with the KL, and reports
wall times, ppl, KL and the peak. Runs: old · new (cache empty: a miss) · new again (a hit) · new
with this checkout's default kl_windows. Prints a table, writes benchmarks/results/evaluation-<time>.json.

`--topk` instead measures how the top-k KL approaches the full-vocabulary KL on the same model
and weights (how eval.kl_top_k's default was chosen).

    python benchmarks/evaluation.py                  # A/B + cache hit
    python benchmarks/evaluation.py --topk --windows 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _setup(windows: int | None):
    """Default config's model (in the dtype a default run picks) and evaluation windows."""
    import torch
    from hydra import compose, initialize_config_dir

    from fabricq.config import load_settings
    from fabricq.data import prepare_text
    from fabricq.models import (
        load_model,
        load_tokenizer,
        resolve_model_source,
        saved_dtype,
    )
    from fabricq.precision import decide_precision
    from fabricq.resume import model_identity

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("config")
    config = load_settings(cfg)
    source = resolve_model_source(config.model.path)
    text = prepare_text(load_tokenizer(source), config.data, config.eval)
    evaluation = text.evaluation if windows is None else text.evaluation[:windows]
    precision = decide_precision(config.model.dtype, saved_dtype(source))
    model = load_model(source, precision.forward_dtype).eval()
    torch.set_grad_enabled(False)
    return config, source, model, evaluation, model_identity


def _quantize_rtn(model) -> None:
    """Every decoder Linear replaced by its 4-bit RTN rounding (groups of 128), in place."""
    import torch

    from fabricq.models import decoder_layers
    from fabricq.quant.gptq import rtn_quantize
    from fabricq.quant.grid import QuantScheme

    scheme = QuantScheme(4, 128, True, "none")
    for layer in decoder_layers(model):
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.data = rtn_quantize(module.weight.data, scheme).dequantize().to(module.weight.dtype)


def _old_module(old_ref: str, scratch: Path):
    source = subprocess.run(["git", "show", f"{old_ref}:fabricq/evaluate.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = scratch / "previous_evaluate.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("previous_evaluate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def child(args) -> dict:
    """One measured evaluation pair (before, after) in this process."""
    _, source, model, windows, model_identity = _setup(args.windows)
    rss_loaded = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on: the evaluation's
    kl_windows = args.kl_windows
    if args.impl == "old":
        module = _old_module(args.old_ref, Path(args.scratch))
        tick = time.perf_counter()
        before = module.evaluate(model, windows, "cpu", keep=kl_windows)
        before_s = time.perf_counter() - tick
        cached = False
    else:
        from fabricq.eval_cache import ReferenceCache, reference_key
        from fabricq.evaluate import evaluate

        key = reference_key(model_identity(source), windows, stride=None, kl_windows=kl_windows, top_k=args.top_k,
                            dtype=model.dtype, device_type="cpu")
        cache = ReferenceCache(key, Path(args.cache_dir))
        tick = time.perf_counter()
        before = evaluate(model, windows, "cpu", keep=kl_windows, top_k=args.top_k, cache=cache)
        before_s = time.perf_counter() - tick
        cached = before["cached_windows"] == before["windows"]
        evaluate_after = evaluate
    reference = before.pop("logprobs")
    _quantize_rtn(model)
    tick = time.perf_counter()
    if args.impl == "old":
        after = module.evaluate(model, windows, "cpu", reference=reference)
    else:
        after = evaluate_after(model, windows, "cpu", reference=reference)
    after_s = time.perf_counter() - tick
    return {"impl": args.impl, "dtype": str(model.dtype), "windows": list(windows.shape), "kl_windows": kl_windows,
            "top_k": None if args.impl == "old" else args.top_k, "cached": cached,
            "ppl_before": before["ppl"], "ppl_after": after["ppl"], "kl": after["kl"],
            "before_s": before_s, "after_s": after_s, "rss_loaded_mib": rss_loaded,
            "eval_peak_mib": _status_mib("VmHWM"),
            "lifetime_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure_topk(args) -> dict:
    """Full-vocabulary KL vs the top-k KL for several k, same windows and weights."""
    import copy

    import torch
    import torch.nn.functional as F

    from fabricq.evaluate import (
        POSITION_CHUNK,
        TAIL_SAMPLES,
        _kl_chunk,
        compact_reference,
    )
    from fabricq.recovery.teacher import final_hidden, logit_chunks

    _, _, model, windows, _ = _setup(args.windows)
    quantized = copy.deepcopy(model)
    _quantize_rtn(quantized)
    ks = [int(k) for k in args.ks.split(",")]
    full, positions = 0.0, 0
    sums = {k: [0.0, 0.0] for k in ks}  # (tail-corrected estimate, coarsened lower bound)
    for w, window in enumerate(windows):
        ids = window[None]
        h_ref, h_q = final_hidden(model, ids)[:, :-1], final_hidden(quantized, ids)[:, :-1]
        for (start, ref_logits), (_, q_logits) in zip(logit_chunks(model, h_ref, POSITION_CHUNK),
                                                      logit_chunks(quantized, h_q, POSITION_CHUNK)):
            p, q = F.log_softmax(ref_logits[0].float(), -1), F.log_softmax(q_logits[0].float(), -1)
            full += float((p.exp() * (p - q)).sum(dtype=torch.float64))
            for k in ks:
                estimate, lower = _kl_chunk(compact_reference(p, k, w * 1_000_003 + start), 0, q)
                sums[k][0] += estimate
                sums[k][1] += lower
        positions += window.numel() - 1
    rows = [{"k": k, "kl": sums[k][0] / positions, "ratio_to_full": sums[k][0] / full,
             "lower_bound": sums[k][1] / positions, "lower_ratio_to_full": sums[k][1] / full,
             "bytes_per_position": 8 * k + 4 + 8 * TAIL_SAMPLES} for k in ks]
    return {"full_kl": full / positions, "positions": positions, "dtype": str(model.dtype),
            "tail_samples": TAIL_SAMPLES, "rows": rows}


def _run_child(args, impl: str, cache_dir: Path, scratch: Path, kl_windows: int) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, "--cache-dir", str(cache_dir), "--scratch", str(scratch),
           "--old-ref", args.old_ref, "--top-k", str(args.top_k), "--kl-windows", str(kl_windows)]
    if args.windows:
        cmd += ["--windows", str(args.windows)]
    tick = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["child_wall_s"] = time.perf_counter() - tick
    print(json.dumps(result), flush=True)  # as each child ends: a long A/B keeps what it measured
    return result


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma", "f16c")))
    except OSError:
        pass
    return []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=None, help="evaluation windows (default: the config's)")
    p.add_argument("--old-ref", default="HEAD", help="git revision of the previous evaluator (default: HEAD)")
    p.add_argument("--top-k", type=int, default=None, help="eval.kl_top_k (default: the config's)")
    p.add_argument("--kl-windows", type=int, default=2, help="KL windows of the A/B (today's default: 2)")
    p.add_argument("--topk", action="store_true", help="measure top-k KL vs full KL instead")
    p.add_argument("--ks", default="8,16,32,64,128,256,1024")
    p.add_argument("--child", choices=["old", "new"], help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.top_k is None:
        from fabricq.config import EvalSettings

        args.top_k = EvalSettings().kl_top_k
    if args.child:
        args.impl = args.child
        print(json.dumps(child(args)))
        return 0
    results_dir = REPO / "benchmarks" / "results"
    results_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    host = {"cpu_flags": _cpu_flags(), "cores": os.cpu_count(), "python": platform.python_version(),
            "threads": os.environ.get("OMP_NUM_THREADS")}
    if args.topk:
        result = {"host": host, **measure_topk(args)}
        print(f"full-vocabulary KL {result['full_kl']:.5f} over {result['positions']} positions ({result['dtype']})")
        print(f"{'k':>6} {'KL (tail-sampled)':>18} {'/ full':>8} {'lower bound':>12} {'/ full':>8} {'bytes/pos':>10}")
        for row in result["rows"]:
            print(f"{row['k']:>6} {row['kl']:>18.5f} {row['ratio_to_full']:>8.4f} {row['lower_bound']:>12.5f} "
                  f"{row['lower_ratio_to_full']:>8.4f} {row['bytes_per_position']:>10}")
        (results_dir / f"evaluation-topk-{stamp}.json").write_text(json.dumps(result, indent=2))
        return 0
    from fabricq.config import EvalSettings

    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        cache_dir = Path(scratch) / "cache"
        runs.append(("old (previous evaluator)", _run_child(args, "old", cache_dir, Path(scratch), args.kl_windows)))
        runs.append(("new, cache miss", _run_child(args, "new", cache_dir, Path(scratch), args.kl_windows)))
        runs.append(("new, cache hit", _run_child(args, "new", cache_dir, Path(scratch), args.kl_windows)))
        default_kl = EvalSettings().kl_windows
        if default_kl != args.kl_windows and (args.windows is None or args.windows > args.kl_windows):
            runs.append((f"new, kl_windows={default_kl}, miss",
                         _run_child(args, "new", cache_dir, Path(scratch), default_kl)))
    old = runs[0][1]
    print(f"{'run':<28} {'before s':>9} {'after s':>8} {'eval peak MiB':>14} {'ppl before':>11} {'ppl after':>10} "
          f"{'KL':>9} {'wall/old':>9} {'peak/old':>9}")
    for name, r in runs:
        wall = r["before_s"] + r["after_s"]
        print(f"{name:<28} {r['before_s']:>9.1f} {r['after_s']:>8.1f} {r['eval_peak_mib']:>14.0f} {r['ppl_before']:>11.4f} "
              f"{r['ppl_after']:>10.4f} {r['kl']:>9.5f} {wall / (old['before_s'] + old['after_s']):>9.2f} "
              f"{r['eval_peak_mib'] / old['eval_peak_mib']:>9.2f}")
    out = results_dir / f"evaluation-{stamp}.json"
    out.write_text(json.dumps({"host": host, "args": vars(args), "runs": dict(runs)}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
