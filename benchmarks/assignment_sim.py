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
  limits all such plans: down_proj's cols³ alone exceeds the per-layer ideal at a few ranks;
- fabricq, lag=1, window D=ranks: with `pipeline.lag=1` no layer's calibration needs an earlier
  layer's quantized weights, so solves may trail calibration by up to D layers (the solve window,
  `trainer.solve_window`). Each layer is planned by `fabricq.parallel.plan.assign_with_backlog`
  (every rank's planned work carried over the layers before) and the barrier is only "layer
  k-D's results are broadcast at step k". `windowed_makespan` is the event model of that timing
  (calibration taking no time: solve-bound, the worst case for the barrier). A second table
  varies D for 70B.

    python benchmarks/assignment_sim.py            # table + benchmarks/results/assignment_sim.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's fabricq

from fabricq.parallel.plan import SolveTask, assign_to_ranks, assign_with_backlog, makespan, solve_cost

MODELS = {
    # name: hidden, intermediate, q heads, kv heads, head dim, layers
    "Llama-3-8B": (4096, 14336, 32, 8, 128, 32),
    "Llama-3-70B": (8192, 28672, 64, 8, 128, 80),
}
RANKS = (2, 4, 8, 64)
WINDOW_MODEL = "Llama-3-70B"  # the model of the solve-window table


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


def windowed_makespan(layer_costs: list[list[float]], ranks: int, window: int) -> float:
    """Finish time of the last solve when solves trail calibration by up to `window` layers.

    Event model of fabricq's `pipeline.lag=1` with a solve window D = `window`:
    - calibration takes no time (solve-bound: the worst case for the wait below);
    - time t starts at 0; step k (after layer k is calibrated) plans layer k's groups with
      `assign_with_backlog` (the planned loads carried over all earlier layers) and releases them
      at t to their owners' FIFO solve queues, one solver per rank;
    - on a rank, a job starts at max(release, that rank's free time) and runs its cost; F_k is
      the finish of layer k's last job;
    - still at step k, layer k-D's results are broadcast, which waits for all its solves:
      t = max(t, F_{k-D}). After the last layer everything pending is flushed: the run ends at
      max_k F_k, which is returned.
    D = 0 is a per-layer barrier (each layer solved before the next is calibrated)."""
    loads = [0.0] * ranks  # planned work, what every rank computes identically
    free = [0.0] * ranks  # when each rank's solver is idle again (simulated time)
    finish: list[float] = []
    t = 0.0
    for k, costs in enumerate(layer_costs):
        layer_finish = t
        for cost, owner in zip(costs, assign_with_backlog(costs, loads)):
            free[owner] = max(t, free[owner]) + cost
            layer_finish = max(layer_finish, free[owner])
        finish.append(layer_finish)
        if k - window >= 0:
            t = max(t, finish[k - window])
    return max(finish)


def window_table(name: str) -> list[dict]:
    """makespan / ideal of the lag=1 timing for D in {1, 2, 4, ranks, 2·ranks} on one model."""
    hidden, inter, qh, kvh, hd, layers = MODELS[name]
    costs = [solve_cost(t) for t in group_tasks(layer_modules(hidden, inter, qh, kvh, hd))]
    out = []
    for ranks in RANKS:
        ideal = sum(costs) * layers / ranks
        for label, window in (("1", 1), ("2", 2), ("4", 4), ("ranks", ranks), ("2·ranks", 2 * ranks)):
            out.append({"model": name, "ranks": ranks, "window": window, "window_label": label,
                        "makespan_over_ideal": windowed_makespan([costs] * layers, ranks, window) / ideal})
    return out


def main() -> None:
    rows, results = [], []
    for name, (hidden, inter, qh, kvh, hd, layers) in MODELS.items():
        modules = layer_modules(hidden, inter, qh, kvh, hd)
        # fabricq's own total (one factorisation per group) is the ideal both plans are held to;
        # the peer's total is larger (it factorises q, k, v and gate, up separately).
        total = sum(solve_cost(t) for t in group_tasks(modules)) * layers
        peer_total = sum(solve_cost(SolveTask(c, (r,))) for _, r, c, _ in modules) * layers
        down = solve_cost(SolveTask(inter, (hidden,))) * layers
        layer_costs = [[solve_cost(t) for t in group_tasks(modules)]] * layers
        for ranks in RANKS:
            ideal = total / ranks
            entry = {
                "model": name, "ranks": ranks,
                "peer": peer_layer_makespan(modules, ranks) * layers / ideal,
                "fabricq": fabricq_layer_makespan(modules, ranks) * layers / ideal,
                "bound": bound_layer_makespan(modules, ranks) * layers / ideal,
                "fabricq_lag1_window_ranks": windowed_makespan(layer_costs, ranks, ranks) / ideal,
                "down_proj_share": down / total,
                "peer_total_over_fabricq_total": peer_total / total,
            }
            results.append(entry)
            rows.append(f"| {name} | {ranks} | {entry['peer']:.2f} | {entry['fabricq']:.2f} "
                        f"| {entry['bound']:.2f} | {entry['fabricq_lag1_window_ranks']:.3f} |")
    print("makespan / ideal (ideal = fabricq's total solve cost / ranks; 1.00 is perfect)\n")
    print("| model | ranks | peer (per-module, by columns) | fabricq (groups, cost model) "
          "| bound (factorisation on one rank) | fabricq, lag=1, window D=ranks |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    windows = window_table(WINDOW_MODEL)
    print(f"\n{WINDOW_MODEL}, pipeline.lag=1: makespan / ideal by solve window D "
          "(calibration takes no time)\n")
    labels = ["1", "2", "4", "ranks", "2·ranks"]
    print("| ranks | " + " | ".join(f"D={label}" for label in labels) + " |")
    print("| --- |" + " --- |" * len(labels))
    for ranks in RANKS:
        row = [w for w in windows if w["ranks"] == ranks]
        print(f"| {ranks} | " + " | ".join(f"{w['makespan_over_ideal']:.3f}" for w in row) + " |")
    share = {r["model"]: r["down_proj_share"] for r in results}
    print("\ndown_proj share of the solve cost: " + ", ".join(f"{m} {s:.0%}" for m, s in share.items()))
    out = Path(__file__).parent / "results" / "assignment_sim.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"plans": results, "solve_window": windows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
