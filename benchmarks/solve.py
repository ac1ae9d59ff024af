"""The GPTQ solve phase of real layers: this checkout's `GPTQCallback.quantize_group` against a
baseline commit's per-module path, on real Hessians.

Calibrates the first `--layers` decoder layers of the default model (SmolLM2-135M) on real text
once, keeping each layer's Hessians and original weights. Then, interleaved repeats with one
thread: "before" runs the baseline commit's code (its `fabricq/quant/gptq.py` and `grid.py`,
read with `git show`) exactly as its callback did per module — `gptq_quantize`, the dequantized
result, a round-to-nearest baseline and both objectives for the report — and "after" runs this
checkout's `quantize_group` over the same modules, group by group (shared-input groups
prepared once and solved stacked). Reports whether both give bit-identical codes, scales, zeros,
g_idx and objectives, else the share of equal codes and the ratio of the GPTQ objectives (a
baseline with other rounding, e.g. before the flipped-Cholesky factorisation, flips a few codes;
fails below 99.9% equal codes or 0.1% worse objectives), prints the medians and the ratio, and
writes benchmarks/results/solve-<time>.json.

    python benchmarks/solve.py                                   # 2 layers, 5 repeats
    python benchmarks/solve.py --layers 4 --repeats 7 --baseline-ref 0a5b5cb
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's fabricq, not whichever one is installed

import torch  # noqa: E402
from torch import nn  # noqa: E402

from fabricq.calibration.loop import CalibrationLoop  # noqa: E402
from fabricq.callbacks.gptq import GPTQCallback, GPTQSettings  # noqa: E402
from fabricq.data import calibration_samples, load_documents, tokenize_stream  # noqa: E402
from fabricq.models import decoder_layers, load_model, load_tokenizer, resolve_model_source  # noqa: E402
from fabricq.quant.grid import QuantScheme, effective_group_size  # noqa: E402

# The commit this work started from (main before the shared-Hessian solve).
DEFAULT_BASELINE = "0a5b5cb"
C4_SAMPLE = REPO.parent / "shared" / "data" / "c4-train-sample.jsonl"


def baseline_gptq(ref: str) -> types.ModuleType:
    """`fabricq.quant.gptq` as it was at `ref`, bound to that commit's `grid.py` too."""

    def source(path: str) -> str:
        return subprocess.run(["git", "show", f"{ref}:{path}"], cwd=REPO, check=True,
                              capture_output=True, text=True).stdout

    grid = sys.modules["baseline_grid"] = types.ModuleType("baseline_grid")  # dataclasses look it up
    exec(compile(source("fabricq/quant/grid.py"), f"{ref}:grid.py", "exec"), grid.__dict__)
    gptq = sys.modules["baseline_gptq"] = types.ModuleType("baseline_gptq")
    saved = sys.modules["fabricq.quant.grid"]
    sys.modules["fabricq.quant.grid"] = grid  # its `from fabricq.quant.grid import …` binds these
    try:
        exec(compile(source("fabricq/quant/gptq.py"), f"{ref}:gptq.py", "exec"), gptq.__dict__)
    finally:
        sys.modules["fabricq.quant.grid"] = saved
    return gptq


class CapturingCallback(GPTQCallback):
    """GPTQCallback that keeps every layer's Hessians and original weights before solving it."""

    def __init__(self, settings):
        super().__init__(settings)
        self.layers = []

    def on_layer_end(self, loop, index, layer):
        state = self._layers[index]
        weights = {n: m.weight.detach().clone() for n, m in state.targets.items()}
        self.layers.append((weights, state.hessians))
        return super().on_layer_end(loop, index, layer)


def calibrate(args, settings) -> list:
    source = resolve_model_source(None)
    tokenizer = load_tokenizer(source)
    model = load_model(source)
    layers = decoder_layers(model)
    del layers[args.layers:]
    docs = load_documents(str(args.data) if args.data else None)
    samples = calibration_samples(tokenize_stream(tokenizer, docs), args.num_samples, args.seq_len, 0)
    callback = CapturingCallback(settings)
    CalibrationLoop(model, samples, device="cpu", batch_size=8, callbacks=[callback]).run()
    return callback.layers


def solve_before(gptq, settings, weights, hessians):
    """The baseline callback's per-module work, as in its `quantize_module`."""
    out = {}
    for name, weight in weights.items():
        scheme = replace(settings.scheme, group_size=effective_group_size(settings.scheme.group_size, weight.shape[1]))
        h = hessians.hessian(name)
        result = gptq.gptq_quantize(weight, h, scheme, block_size=settings.block_size, damp=settings.damp,
                                    scale_dtype=weight.dtype, name=name)
        dequantized = result.dequantize()
        rtn = gptq.rtn_quantize(weight, scheme, weight.dtype).dequantize()
        loss, rtn_loss = gptq.layer_objectives(weight, [dequantized, rtn], h)
        out[name] = (result, loss, rtn_loss)
    return out


def solve_after(settings, modules, hessians):
    callback = GPTQCallback(settings)
    for group in hessians.groups():
        callback.quantize_group(group, [modules[n] for n in group], hessians)
    return {n: (callback.quantized[n], callback.stats[n]["loss"], callback.stats[n]["rtn_loss"]) for n in modules}


def same(a, b) -> bool:
    (qa, la, ra), (qb, lb, rb) = a, b
    parts = all(torch.equal(getattr(qa, p), getattr(qb, p)) for p in ("codes", "scale", "zero", "g_idx"))
    return parts and la == lb and ra == rb


def agreement(before: dict, after: dict) -> tuple[int, int, float, float]:
    """Equal codes and total GPTQ objective of both variants over the modules of one layer (for a
    baseline whose arithmetic differs, e.g. in the Hessian factorisation's rounding)."""
    equal = sum(int((after[n][0].codes == before[n][0].codes).sum()) for n in before)
    total = sum(before[n][0].codes.numel() for n in before)
    return equal, total, sum(after[n][1] for n in before), sum(before[n][1] for n in before)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2, help="first decoder layers to calibrate and solve")
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--data", type=Path, default=C4_SAMPLE if C4_SAMPLE.exists() else None,
                   help="calibration text (default: the C4 sample in ../shared, else pydoc topics)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--actorder", default="static")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--baseline-ref", default=DEFAULT_BASELINE, help="git commit of the 'before' code")
    args = p.parse_args()
    torch.set_num_threads(1)
    settings = GPTQSettings(scheme=QuantScheme(4, args.group_size, True, args.actorder))
    baseline = baseline_gptq(args.baseline_ref)

    tick = time.perf_counter()
    captured = calibrate(args, settings)
    print(f"calibrated {args.layers} layers in {time.perf_counter() - tick:.1f} s", flush=True)

    modules = [{n: nn.Linear(w.shape[1], w.shape[0], bias=False) for n, w in weights.items()}
               for weights, _ in captured]
    times = {"before": [], "after": []}
    identical = True
    codes_equal = codes_total = 0
    loss = {"before": 0.0, "after": 0.0}
    for r in range(args.repeats + 1):  # repeat 0 warms up and is not counted
        order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
        results = {}
        for variant in order:
            total = 0.0
            for layer, ((weights, hessians), mods) in enumerate(zip(captured, modules)):
                for name, module in mods.items():
                    module.weight.data.copy_(weights[name])
                if variant == "before":
                    start = time.perf_counter()
                    got = solve_before(baseline, settings, weights, hessians)
                else:
                    start = time.perf_counter()
                    got = solve_after(settings, mods, hessians)
                total += time.perf_counter() - start
                results[variant, layer] = got
            if r:
                times[variant].append(total)
        for layer in range(len(captured)):
            before, after = results["before", layer], results["after", layer]
            identical &= before.keys() == after.keys() and all(same(after[n], before[n]) for n in before)
            if r == 0:
                equal, total, loss_after, loss_before = agreement(before, after)
                codes_equal, codes_total = codes_equal + equal, codes_total + total
                loss["before"] += loss_before
                loss["after"] += loss_after
        if r:
            print(f"repeat {r}: " + "  ".join(f"{v} {times[v][-1]:.3f} s" for v in order), flush=True)

    med = {v: statistics.median(t) for v, t in times.items()}
    ratio = med["after"] / med["before"]
    print()
    print(f"| variant | median s ({args.layers} layers × {len(captured[0][0])} modules) | runs |")
    print("|---|---|---|")
    for v in times:
        print(f"| {v} | {med[v]:.3f} | {', '.join(f'{t:.3f}' for t in times[v])} |")
    print(f"\nafter/before = {ratio:.3f} (speed-up {1 / ratio:.2f}x); bit-identical results: {identical}")
    objective_ratio = loss["after"] / loss["before"]
    print(f"codes equal: {codes_equal / codes_total:.4%}; GPTQ objective after/before (sum over modules): "
          f"{objective_ratio:.6f}")

    out_dir = REPO / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"solve-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({
        "args": {k: str(v) for k, v in vars(args).items()}, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.machine(), "times_s": times, "median_s": med,
        "after_over_before": ratio, "bit_identical": identical,
        "codes_equal_fraction": codes_equal / codes_total, "objective_after_over_before": objective_ratio,
    }, indent=2))
    print(f"wrote {out}")
    # Different rounding (a baseline with another factorisation) may flip a few codes; a worse
    # solve may not pass.
    if not identical and (codes_equal / codes_total < 0.999 or objective_ratio > 1.001):
        raise SystemExit("results differ from the baseline beyond rounding")


if __name__ == "__main__":
    main()
