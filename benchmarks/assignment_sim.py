"""Simulate how GPTQ solves are spread over ranks, on the real layer shapes of Llama-3-8B and -70B.

Cost of a solve (the model in `fabricq.parallel.plan.solve_cost`): factorising a cols×cols Hessian
costs cols³, solving a module's rows costs rows·cols². With strict error propagation every
decoder layer is a barrier, so a run's time is the sum over layers of each layer's makespan
(the busiest rank), and the ideal is total cost / ranks. Printed: makespan / ideal for

- peer: llm-compressor's DDP GPTQ — one Hessian per module (q, k, v... each factorised
  separately), modules of a layer dealt greedily to the rank with the fewest columns so far;
- fabricq: shared-input groups (q/k/v, o, gate/up, down: one factorisation each), assigned by
  `fabricq.parallel.plan.assign_to_ranks` on the cost model (exact per layer);
- bound: the best any per-layer plan can do while each factorisation stays on one rank:
  max(ideal, largest group's cols³ + its rows·cols² spread over every rank). It shows what
  limits all such plans: down_proj's cols³ alone exceeds the per-layer ideal at a few ranks.

    python benchmarks/assignment_sim.py            # table + benchmarks/results/assignment_sim.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's fabricq

from fabricq.parallel.plan import SolveTask, assign_to_ranks, makespan, solve_cost

MODELS = {
    # name: hidden, intermediate, q heads, kv heads, head dim, layers
    "Llama-3-8B": (4096, 14336, 32, 8, 128, 32),
    "Llama-3-70B": (8192, 28672, 64, 8, 128, 80),
}
RANKS = (2, 4, 8, 64)


def layer_modules(hidden, inter, q_heads, kv_heads, head_dim):
    """(name, rows, cols, shared-input group) of one Llama decoder layer's Linear modules."""
    q, kv = q_heads * head_dim, kv_heads * head_dim
    return [
        ("q_proj", q, hidden, "qkv"), ("k_proj", kv, hidden, "qkv"), ("v_proj", kv, hidden, "qkv"),
        ("o_proj", hidden, q, "o"),
        ("gate_proj", inter, hidden, "gate_up"), ("up_proj", inter, hidden, "gate_up"),
        ("down_proj", hidden, inter, "down"),
    ]


def peer_layer_makespan(modules, ranks: int) -> float:
    """Each module its own Hessian and factorisation; greedy by column count, largest first."""
    column_load = [0] * ranks
    time_load = [0.0] * ranks
    for _, rows, cols, _ in sorted(modules, key=lambda m: -m[2]):
        r = min(range(ranks), key=lambda k: (column_load[k], k))
        column_load[r] += cols
        time_load[r] += solve_cost(SolveTask(cols, (rows,)))
    return max(time_load)


def group_tasks(modules) -> list[SolveTask]:
    groups: dict[str, list] = {}
    for _, rows, cols, group in modules:
        groups.setdefault(group, []).append((rows, cols))
    return [SolveTask(members[0][1], tuple(r for r, _ in members)) for members in groups.values()]


def fabricq_layer_makespan(modules, ranks: int) -> float:
    costs = [solve_cost(t) for t in group_tasks(modules)]
    return makespan(costs, assign_to_ranks(costs, ranks), ranks)


def bound_layer_makespan(modules, ranks: int) -> float:
    tasks = group_tasks(modules)
    ideal = sum(solve_cost(t) for t in tasks) / ranks
    return max(ideal, max(t.cols**3 + sum(t.rows) * t.cols**2 / ranks for t in tasks))


def main() -> None:
    rows, results = [], []
    for name, (hidden, inter, qh, kvh, hd, layers) in MODELS.items():
        modules = layer_modules(hidden, inter, qh, kvh, hd)
        # fabricq's own total (one factorisation per group) is the ideal both plans are held to;
        # the peer's total is larger (it factorises q, k, v and gate, up separately).
        total = sum(solve_cost(t) for t in group_tasks(modules)) * layers
        peer_total = sum(solve_cost(SolveTask(c, (r,))) for _, r, c, _ in modules) * layers
        down = solve_cost(SolveTask(inter, (hidden,))) * layers
        for ranks in RANKS:
            ideal = total / ranks
            entry = {
                "model": name, "ranks": ranks,
                "peer": peer_layer_makespan(modules, ranks) * layers / ideal,
                "fabricq": fabricq_layer_makespan(modules, ranks) * layers / ideal,
                "bound": bound_layer_makespan(modules, ranks) * layers / ideal,
                "down_proj_share": down / total,
                "peer_total_over_fabricq_total": peer_total / total,
            }
            results.append(entry)
            rows.append(f"| {name} | {ranks} | {entry['peer']:.2f} | {entry['fabricq']:.2f} | {entry['bound']:.2f} |")
    print("makespan / ideal (ideal = fabricq's total solve cost / ranks; 1.00 is perfect)\n")
    print("| model | ranks | peer (per-module, by columns) | fabricq (groups, cost model) "
          "| bound (factorisation on one rank) |")
    print("| --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    share = {r["model"]: r["down_proj_share"] for r in results}
    print("\ndown_proj share of the solve cost: " + ", ".join(f"{m} {s:.0%}" for m, s in share.items()))
    out = Path(__file__).parent / "results" / "assignment_sim.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"plans": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
