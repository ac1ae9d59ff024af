"""Do concurrent GPTQ solves of one layer's modules help? (`pipeline.solve_threads`)

Solves the seven Linear modules of one decoder layer with the default model's shapes (hidden 576,
intermediate 1536, 3 KV heads of 64) through `GPTQCallback.on_layer_end`: 1 solve thread, N solve
threads (1 intra-op thread each), and 1 solve thread with N intra-op threads (the same cores used
by torch instead), interleaved repeats; checks that the results are identical and prints the
medians and ratios. Writes benchmarks/results/solve_threads-<time>.json.

    python benchmarks/solve_threads.py --threads 2 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

# This checkout's fabricq, not whichever one is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from fabricq.callbacks.gptq import GPTQCallback, GPTQSettings, LayerState
from fabricq.quant.grid import QuantScheme
from fabricq.quant.hessian import HessianAccumulator

SHAPES = {  # name: (out, in), reading input group
    "q_proj": (576, 576, "attn"), "k_proj": (192, 576, "attn"), "v_proj": (192, 576, "attn"),
    "o_proj": (576, 576, "o"), "gate_proj": (1536, 576, "mlp"), "up_proj": (1536, 576, "mlp"),
    "down_proj": (576, 1536, "down"),
}


class FixedHessians:
    """The part of SharedInputHessians the solver reads, from fixed random inputs."""

    def __init__(self, tokens: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.accumulators, self.leader = {}, {}
        widths = {"attn": 576, "o": 576, "mlp": 576, "down": 1536}
        for group, width in widths.items():
            acc = HessianAccumulator(width)
            acc.add(torch.randn(tokens, width, generator=g))
            self.accumulators[group] = acc
        for name, (_, _, group) in SHAPES.items():
            self.leader[name] = group

    def hessian(self, name):
        return self.accumulators[self.leader[name]].mean()

    def remove(self):
        pass


def solve_layer(threads: int, hessians: FixedHessians, seed: int) -> tuple[float, dict]:
    torch.manual_seed(seed)
    targets = {n: nn.Linear(i, o, bias=False) for n, (o, i, _) in SHAPES.items()}
    callback = GPTQCallback(GPTQSettings(scheme=QuantScheme(4, 64, True, "static"), solve_threads=threads))
    callback._layers[0] = LayerState(0, targets, hessians)
    start = time.perf_counter()
    callback.on_layer_end(None, 0, None)
    return time.perf_counter() - start, callback.quantized


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="solve threads to compare against 1")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tokens", type=int, default=4096)
    args = p.parse_args()
    hessians = FixedHessians(args.tokens, 0)
    # (solve threads, intra-op threads): the pool against 1 thread, and against giving the same
    # cores to torch's own intra-op parallelism instead.
    variants = [(1, 1), (args.threads, 1), (1, args.threads)]
    times = {v: [] for v in variants}
    solve_layer(1, hessians, 0)  # warm-up
    for r in range(args.repeats):
        results = {}
        for v in variants:
            torch.set_num_threads(v[1])
            seconds, results[v] = solve_layer(v[0], hessians, r)
            times[v].append(seconds)
        assert all(torch.equal(results[(1, 1)][k].codes, results[(args.threads, 1)][k].codes) for k in results[(1, 1)])
    med = {v: statistics.median(t) for v, t in times.items()}
    print(f"one layer (7 modules, SmolLM2 shapes), median of {args.repeats} interleaved repeats")
    print("solve threads  intra-op threads  seconds  × time")
    for (n, intra), m in med.items():
        print(f"{n:>13}  {intra:>16}  {m:7.3f}  {m / med[(1, 1)]:6.3f}")
    out = Path(__file__).resolve().parent / "results" / f"solve_threads-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args),
                               "runs": [{"solve_threads": v[0], "intra_op_threads": v[1], "seconds": times[v],
                                         "median_s": med[v]} for v in variants]}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
