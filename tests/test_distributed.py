"""Distributed calibration: sharding, the cost model and assignment (pure, against brute force), and
multi-process runs with gloo — world-size invariance of the packed checkpoint, only rank 0 writing,
Hydra multirun with several ranks, a failing rank, and the bad-input errors."""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import REPO_ROOT, run_cli, spawn_ranks
from fabricq.parallel.plan import CostModel, SolveTask, assign_to_ranks, local_samples, makespan, shard_batches, solve_cost, split_rows, split_stacked_rows
from fabricq.runtime import config_digest
from fabricq.errors import FabricqError
from fabricq.quant.packing import unpack_int32

# --------------------------------------------------------------------------------------------
# Pure parts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batches,world", [(1, 1), (7, 2), (7, 3), (10, 4), (3, 3), (128, 5)])
def test_shards_cover_every_batch_exactly_once(batches, world):
    shards = shard_batches(batches, world)
    assert len(shards) == world
    seen = [b for s in shards for b in s]
    assert seen == list(range(batches))  # disjoint, complete, in order
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("samples,batch,world", [(13, 3, 2), (13, 3, 3), (12, 2, 3), (5, 5, 1)])
def test_local_samples_are_the_one_rank_micro_batches(samples, batch, world):
    data = torch.arange(samples)[:, None].repeat(1, 4)
    reference = list(data.split(batch))
    got = [b for rank in range(world) for b in local_samples(data, batch, rank, world).split(batch)]
    assert len(got) == len(reference)
    assert all(torch.equal(a, b) for a, b in zip(got, reference))


def _brute_force_makespan(costs, world):
    return min(makespan(costs, owners, world) for owners in itertools.product(range(world), repeat=len(costs)))


def test_assignment_is_optimal_against_brute_force():
    rng = random.Random(0)
    for _ in range(150):
        n, world = rng.randint(1, 7), rng.randint(1, 4)
        costs = [rng.choice([rng.uniform(0, 10), float(rng.randint(1, 5))]) for _ in range(n)]
        owners = assign_to_ranks(costs, world)
        assert len(owners) == n and all(0 <= r < world for r in owners)
        assert makespan(costs, owners, world) == pytest.approx(_brute_force_makespan(costs, world), rel=1e-12)


def test_assignment_beyond_exact_limit_is_lpt_and_deterministic():
    costs = [float(c) for c in range(1, 30)]
    owners = assign_to_ranks(costs, 4)
    assert owners == assign_to_ranks(list(costs), 4)
    total = sum(costs)
    # LPT bound: makespan ≤ 4/3 of the optimum, which is ≥ total/ranks.
    assert makespan(costs, owners, 4) <= 4 / 3 * max(total / 4, max(costs)) + 1e-9


@pytest.mark.parametrize("rows, parts", [(576, 2), (577, 3), (1536, 8), (64, 3), (172, 3), (1, 2)])
def test_row_slices_cover_every_row_once_on_aligned_starts(rows, parts):
    slices = split_rows(rows, parts)
    assert len(slices) == parts
    assert [r for s in slices for r in s] == list(range(rows))
    assert all(s.start % 64 == 0 for s in slices if len(s))
    sizes = [len(s) for s in slices]
    assert max(sizes) - min(sizes) <= 64 * (1 + (rows < 64 * parts))


@pytest.mark.parametrize("rows, parts", [([576, 192, 192], 2), ([1536, 1536], 3), ([100, 37], 2), ([64], 4)])
def test_stacked_row_slices_are_even_over_the_stack_and_cover_each_module_once(rows, parts):
    per_module = split_stacked_rows(rows, parts)
    assert len(per_module) == len(rows)
    for n, slices in zip(rows, per_module):
        assert len(slices) == parts and [r for s in slices for r in s] == list(range(n))
    # Each part's rows, in stacked coordinates, are what split_rows gives for the whole stack.
    offsets = [sum(rows[:i]) for i in range(len(rows))]
    stacked = [[o + r for o, slices in zip(offsets, per_module) for r in slices[k]] for k in range(parts)]
    assert stacked == [list(s) for s in split_rows(sum(rows), parts)]
    if rows == [576, 192, 192]:
        assert [len(s) for s in stacked] == [448, 512]  # per module it would be 384 and 576


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows, cols, group, actorder", [(577, 576, 128, "dynamic"), (576, 1536, 64, "static"),
                                                         (333, 172, 32, "dynamic"), (300, 256, -1, "none")])
def test_gptq_on_row_slices_joins_to_the_whole_solve_bit_for_bit(dtype, rows, cols, group, actorder):
    """What the row-sliced distributed solve relies on: GPTQ of aligned row slices on one prepared
    Hessian, joined, equals GPTQ of the whole weight exactly (codes, scales, zeros, g_idx) — with
    one thread, as each CPU rank runs (with several, how a product is split over threads depends
    on its shape, like any result's last bits on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_row_slices(dtype, rows, cols, group, actorder)
    finally:
        torch.set_num_threads(threads)


def _check_row_slices(dtype, rows, cols, group, actorder):
    from fabricq.quant.gptq import gptq_solve, prepare_hessian
    from fabricq.quant.grid import QuantScheme

    g = torch.Generator().manual_seed(rows)
    x = torch.randn(1024, cols, generator=g, dtype=dtype)
    prepared = prepare_hessian(x.T @ x / 1024, actorder, damp=0.01)
    weight = torch.randn(rows, cols, generator=g)
    scheme = QuantScheme(4, group, False, actorder)
    whole = gptq_solve(weight, prepared, scheme)
    for parts in (2, 3, 5):
        pieces = [gptq_solve(weight[s.start : s.stop], prepared, scheme) for s in split_rows(rows, parts) if len(s)]
        for part in ("codes", "scale", "zero"):
            assert torch.equal(torch.cat([getattr(p, part) for p in pieces]), getattr(whole, part)), (parts, part)
        assert all(torch.equal(p.g_idx, whole.g_idx) for p in pieces)


def test_cost_model_factorises_once_per_group_and_uses_measurements():
    qkv = SolveTask(cols=64, rows=(64, 32, 32))
    down = SolveTask(cols=172, rows=(64,))
    assert solve_cost(qkv) == 64**3 + (64 + 32 + 32) * 64**2
    model = CostModel()
    assert model.predict(down) == solve_cost(down) and not model.in_seconds
    model.observe(qkv, 0.2)
    model.observe(qkv, 0.4)
    assert model.in_seconds and model.predict(qkv) == pytest.approx(0.3)
    # Unseen shapes: analytic cost scaled by the measured seconds per analytic unit.
    assert model.predict(down) == pytest.approx(solve_cost(down) * 0.3 / solve_cost(qkv))


def test_partial_sums_from_ranks_add_up_to_the_full_hessian():
    """Ranks add up their partial sums (wide inputs accumulate only the lower triangle, in strips)
    in place; the total, mirrored once where it is read, is the Hessian of all their tokens."""
    from fabricq.quant.hessian import HessianAccumulator

    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 300, generator=g) for n in (40, 70)]  # 300 columns: stripped
    ranks = [HessianAccumulator(300) for _ in parts]
    for acc, x in zip(ranks, parts):
        acc.add(x)
    owner = ranks[0]
    owner.partial_sum.add_(ranks[1].partial_sum)  # what a reduce to the owner computes, in place
    owner.install_total(110)
    expected = sum(x.double().T @ x.double() for x in parts)
    assert owner.tokens == 110
    assert torch.allclose(owner.sum.double(), expected, rtol=1e-5, atol=1e-3)
    assert torch.equal(owner.sum, owner.sum.T)
    assert torch.allclose(owner.mean().double(), expected / 110, rtol=1e-5, atol=1e-5)


def _launch_settings(overrides: list[str], environ: dict):
    """The checked settings of `python -m fabricq data.num_samples=16 data.batch_size=4 OVERRIDES`
    launched in `environ` (4 calibration batches)."""
    from fabricq.config import load_settings
    from in_process import compose_config

    return load_settings(compose_config("data.num_samples=16", "data.batch_size=4", *overrides), environ=environ)


OVERSUBSCRIBE = "distributed.cpu_oversubscribe=true"


@pytest.mark.parametrize("overrides,environ,message", [
    (["trainer.strategy=horovod"], {}, "trainer.strategy must be one of"),
    ([f"trainer.devices={os.cpu_count() + 1}"], {}, "usable CPU core"),
    (["trainer.devices=0"], {}, "trainer.devices must be a positive integer"),
    (["trainer.num_nodes=2"], {}, "needs a multi-node launch"),
    (["trainer.num_nodes=2"], {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}, "NODE_RANK"),
    (["trainer.devices=2", OVERSUBSCRIBE], {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "4"}, "torchrun started 4"),
    (["trainer.devices=5", OVERSUBSCRIBE], {}, "only 4 calibration batches"),
    (["distributed.timeout_s=0"], {}, "distributed.timeout_s"),
    (["trainer.strategy=fsdp"], {}, "fsdp needs CUDA"),
])
def test_bad_launch_settings(overrides, environ, message):
    with pytest.raises(FabricqError, match=message):
        _launch_settings(overrides, environ)


def test_good_launch_settings_pass():
    _launch_settings(["trainer.devices=1", "trainer.strategy=ddp"], {})
    _launch_settings(["trainer.devices=2", "trainer.num_nodes=2", OVERSUBSCRIBE],
                     {"MASTER_ADDR": "h", "MASTER_PORT": "1", "NODE_RANK": "0"})
    _launch_settings(["trainer.devices=2", "trainer.num_nodes=2", OVERSUBSCRIBE],
                     {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "4"})


def test_config_digest_ignores_output_dir_only():
    a = OmegaConf.create({"output_dir": "a", "quant": {"bits": 4}})
    assert config_digest(a) == config_digest(OmegaConf.create({"output_dir": "b", "quant": {"bits": 4}}))
    assert config_digest(a) != config_digest(OmegaConf.create({"output_dir": "a", "quant": {"bits": 8}}))


# --------------------------------------------------------------------------------------------
# The multi-rank solvers on two processes (gloo), against LocalSolver
# --------------------------------------------------------------------------------------------

# A synthetic layer: q/k/v read one input (96 wide; 192 + 64 + 64 rows, so row slices of 64
# rows cut q in two), o another (192 wide, 96 rows).
SHAPES = {"q": (96, 192), "k": (96, 64), "v": (96, 64), "o": (192, 96)}
# Solve steps per scenario: one group per gate (row slices; k and v find q's total on every rank),
# a layer's end (owners), and owners then row slices (k/v's total on one rank, broadcast from it).
SCENARIOS = {
    "gated": [[["q"]], [["k"]], [["v"]], [["o"]]],
    "layer": [[["q", "k", "v"], ["o"]]],
    "owners_then_slices": [[["q"], ["o"]], [["k", "v"]]],
}
SOLVER_SETTINGS = dict(block_size=32, hessian_dtype=torch.float64)


def _synthetic_layer(batches: range):
    from fabricq.callbacks.hessians import SharedInputHessians

    torch.manual_seed(0)
    modules = {n: torch.nn.Linear(i, o, bias=False) for n, (i, o) in SHAPES.items()}
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(2, 24, 96, generator=g) for _ in range(5)]
    hessians = SharedInputHessians(modules, torch.float64, stop_early=False)
    with torch.no_grad():
        for b in batches:
            x = inputs[b]
            for name in ("q", "k", "v"):
                modules[name](x)
            modules["o"](torch.tanh(torch.cat([x, x * 0.5], dim=-1)))
            hessians.end_batch()
    return modules, hessians


def _solve_scenario(solver, steps, batches: range) -> dict:
    from fabricq.callbacks.gptq import GPTQCallback
    from fabricq.callbacks.solver import GPTQSettings, LayerState
    from fabricq.quant.grid import QuantScheme

    settings = GPTQSettings(scheme=QuantScheme(4, 32, False, "static"), **SOLVER_SETTINGS)
    modules, hessians = _synthetic_layer(batches)
    gptq = GPTQCallback(settings, solver=solver(settings))
    state = LayerState(0, modules, hessians)
    for groups in steps:
        gptq.solve_step(state, groups)
    return {"parts": {n: {p: getattr(q, p) for p in ("codes", "scale", "zero", "g_idx")} for n, q in gptq.quantized.items()},
            "weights": {n: m.weight.detach().clone() for n, m in modules.items()},
            "loss": {n: s["loss"] for n, s in gptq.stats.items()}, "report": gptq.solver.report}


def _rank_main(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from fabricq.parallel.solvers import make_solver

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mine = shard_batches(5, world)[rank]
        results = {name: _solve_scenario(lambda s: make_solver(s, world, rank, "cpu"), steps, mine)
                   for name, steps in SCENARIOS.items()}
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_solves(tmp_path_factory):
    return spawn_ranks(_rank_main, tmp_path_factory.mktemp("solvers"))


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_rank_solvers_match_local_solver_bit_for_bit(two_rank_solves, scenario):
    """Every rank ends with the one-rank results: codes, scales, zeros, g_idx, the installed
    weights and the objectives (row slices: summed over the slices)."""
    from fabricq.callbacks.solver import LocalSolver

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = _solve_scenario(LocalSolver, SCENARIOS[scenario], range(5))
    finally:
        torch.set_num_threads(threads)
    for rank, runs in enumerate(two_rank_solves):
        got = runs[scenario]
        assert list(got["parts"]) == list(local["parts"]) == [n for step in SCENARIOS[scenario] for g in step for n in g]
        for name, parts in local["parts"].items():
            for part, tensor in parts.items():
                assert torch.equal(got["parts"][name][part], tensor), (rank, name, part)
            assert torch.equal(got["weights"][name], local["weights"][name]), (rank, name)
            assert got["loss"][name] == pytest.approx(local["loss"][name], rel=1e-9, abs=1e-12), (rank, name)


def test_two_rank_solvers_report_each_step(two_rank_solves):
    gated = two_rank_solves[0]["gated"]["report"]
    layer = two_rank_solves[0]["layer"]["report"]
    mixed = two_rank_solves[0]["owners_then_slices"]["report"]
    for report in (gated, layer, mixed):
        assert report["world_size"] == 2 and len(report["layers"]) == 1
        entry = report["layers"][0]
        assert set(entry["phases_s"]) == {"arrival", "reduce", "solve", "results", "metadata", "install"}
        assert sum(entry["phases_s"].values()) <= entry["wall_s"] + 1e-3
    # Gates: q split over both ranks (64-row units: 1 and 2), k and v (one unit) whole on rank 1;
    # q/k/v's Hessian is all-reduced once (both ranks send their 96×96 float64 sums), o's once.
    steps = gated["layers"][0]
    assert steps["steps"] == 4
    assert [(g["modules"], g["owner"], g.get("rows_slice")) for g in steps["groups"]] == [
        (["q"], 0, [[0, 64]]), (["q"], 1, [[64, 192]]), (["k"], 1, None), (["v"], 1, None),
        (["o"], 0, [[0, 64]]), (["o"], 1, [[64, 96]])]
    assert gated["bytes_sent"]["hessian_reduce"] == (96 * 96 + 192 * 192) * 8
    # A layer's end: one owner per group, each total reduced to its owner only.
    groups = layer["layers"][0]["groups"]
    assert [g["modules"] for g in groups] == [["q", "k", "v"], ["o"]] and {g["owner"] for g in groups} == {0, 1}
    sent = sum(r["layer"]["report"]["bytes_sent"]["hessian_reduce"] for r in two_rank_solves)
    assert sent == (96 * 96 + 192 * 192) * 8  # each rank sent the sum the other one owns
    # q and o on different owners, each sent the other's partial sum; then k/v's total (q's) sits
    # with q's owner alone, which broadcasts it for the row slices.
    owner_of_q = next(g["owner"] for g in mixed["layers"][0]["groups"] if g["modules"] == ["q"])
    sent = [two_rank_solves[r]["owners_then_slices"]["report"]["bytes_sent"]["hessian_reduce"] for r in range(2)]
    assert sent[owner_of_q] == (192 * 192 + 96 * 96) * 8 and sent[1 - owner_of_q] == 96 * 96 * 8


# --------------------------------------------------------------------------------------------
# Several processes (gloo), through the command line
# --------------------------------------------------------------------------------------------

# stories260k: 5 layers, widths 64 and 172; 13 windows in batches of 2 → 7 batches (uneven shards
# for 2 and 3 ranks, a short last batch).
def _small(shared_path):
    return [
        f"model.path={shared_path('models', 'stories260k')}",
        f"data.path={shared_path('data', 'tinystories-sample.txt')}",
        "data.num_samples=13", "data.seq_len=64", "data.batch_size=2",
        "eval.seq_len=64", "eval.max_windows=3", "eval.kl_windows=2",
        OVERSUBSCRIBE, "distributed.timeout_s=60",
        # float32 scales: with bfloat16 ones (the default export of a float32 model) a last-bit
        # difference of a float32 Hessian summed in another order can move a scale across a bf16
        # rounding boundary and flip a whole group, which is not what these comparisons measure.
        "export.dtype=float32",
    ]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _assert_identical(a: Path, b: Path) -> None:
    calibrated = [json.loads((d / "report.json").read_text())["calibration"]["sha256"] for d in (a, b)]
    assert calibrated[0] == calibrated[1], "the runs calibrated on different tokens"
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    differ = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
    assert not differ, f"{b} differs from {a} in {differ[:5]}"


@pytest.fixture(scope="module")
def one_rank_runs(shared_path, tmp_path_factory):
    """One rank, float32 and float64 Hessians (a one-process multirun)."""
    sweep = tmp_path_factory.mktemp("one_rank")
    result = run_cli("-m", "recipe=gptq_w4", *_small(shared_path), "quant.hessian_dtype=float32,float64",
                     f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr[-3000:]
    return {"float32": sweep / "0", "float64": sweep / "1"}


@pytest.fixture(scope="module")
def multirun_2_and_3_ranks(shared_path, tmp_path_factory):
    """`-m trainer.devices=2,3` with float64 Hessians: two jobs of several ranks each (evaluated
    like the one-rank runs: the text held out for evaluation is not calibrated on)."""
    sweep = tmp_path_factory.mktemp("sweep")
    result = run_cli("-m", "recipe=gptq_w4", *_small(shared_path), "quant.hessian_dtype=float64",
                     "trainer.devices=2,3", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep


def test_multirun_with_several_ranks_makes_one_complete_directory_per_job(multirun_2_and_3_ranks):
    sweep = multirun_2_and_3_ranks
    assert sorted(p.name for p in sweep.iterdir() if not p.name.startswith(("multirun", "summary."))) == ["0", "1"]
    for job, world in (("0", 2), ("1", 3)):
        names = {p.name for p in (sweep / job).iterdir()}
        assert {"config.json", "model.safetensors", "report.json", "fabricq_config.yaml"} <= names, names
        assert not any(n.startswith(".") for n in names)
        report = json.loads((sweep / job / "report.json").read_text())
        assert report["distributed"]["world_size"] == world
        assert len(report["distributed"]["layers"]) == 5
        # Every rank of every layer solved something it was assigned; owners are valid ranks.
        for layer in report["distributed"]["layers"]:
            assert {g["owner"] for g in layer["groups"]} <= set(range(world))
            # Where rank 0's time in the layer's solve steps went (row slices: true-sequential gates).
            phases = layer["phases_s"]
            assert set(phases) == {"arrival", "reduce", "solve", "results", "metadata", "install"}
            assert min(phases.values()) >= 0 and sum(phases.values()) <= layer["wall_s"] + 1e-3
        assert report["distributed"]["bytes_sent"]["hessian_reduce"] > 0
        steps = sum(layer["wall_s"] for layer in report["distributed"]["layers"])
        assert report["timings"]["solve_steps_s"] == pytest.approx(steps, rel=0.05, abs=0.05)


def test_float64_hessians_give_bit_identical_checkpoints_on_1_2_3_ranks(one_rank_runs, multirun_2_and_3_ranks):
    reference = one_rank_runs["float64"]
    _assert_identical(reference, multirun_2_and_3_ranks / "0")
    _assert_identical(reference, multirun_2_and_3_ranks / "1")


def test_two_forward_mode_on_2_ranks_matches_1_rank_with_owners_solving_whole_groups(shared_path, tmp_path):
    """quant.true_sequential=false: each layer's four groups are solved at its end by owners the
    cost model picks (OwnerSolver), each Hessian reduced to its owner only. Bit-identical to one
    rank with float64 Hessians; both ranks own groups, and later layers are planned in seconds."""
    result = run_cli("-m", "recipe=gptq_w4", *_small(shared_path), "quant.hessian_dtype=float64",
                     "quant.true_sequential=false", "trainer.devices=1,2", "eval.enabled=false",
                     f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_identical(tmp_path / "0", tmp_path / "1")
    report = json.loads((tmp_path / "1" / "report.json").read_text())["distributed"]
    assert [layer["layer"] for layer in report["layers"]] == list(range(5))
    for layer in report["layers"]:
        assert layer["steps"] == 1 and len(layer["groups"]) == 4
        assert all("rows_slice" not in g for g in layer["groups"])  # whole groups, one owner each
        assert {g["owner"] for g in layer["groups"]} == {0, 1}
    assert report["layers"][0]["planned_unit"].startswith("analytic")
    assert all(layer["planned_unit"] == "s" for layer in report["layers"][1:])
    # Hessians went to owners only: a rank sent the sums of the groups the other rank owns.
    per_layer = (3 * 64 * 64 + 172 * 172) * 8  # float64
    assert 0 < report["bytes_sent"]["hessian_reduce"] < 2 * 5 * per_layer


PROBE = """
import os, sys
import fabricq.checkpoint.compressed_tensors, fabricq.runtime
from fabricq.__main__ import main

log = os.environ["PROBE_LOG"]
save = fabricq.checkpoint.compressed_tensors.save_compressed_checkpoint

def recording_save(*args, **kwargs):
    with open(log, "a") as f:
        f.write(f"save by rank {fabricq.runtime.rank_label()}\\n")
    return save(*args, **kwargs)

fabricq.checkpoint.compressed_tensors.save_compressed_checkpoint = recording_save
fail_rank = os.environ.get("PROBE_FAIL_RANK")
import fabricq.callbacks.solver
import torch.distributed
solve = fabricq.callbacks.solver.GroupQuantizer.solve

def failing_solve(self, names, weights, hessians):
    if str(torch.distributed.get_rank()) == fail_rank and any("layers.1." in name for name in names):
        raise RuntimeError("injected failure")
    return solve(self, names, weights, hessians)

fabricq.callbacks.solver.GroupQuantizer.solve = failing_solve
main()
"""


def _probe_env(tmp_path: Path, **extra) -> dict:
    (tmp_path / "probe.py").write_text(textwrap.dedent(PROBE))
    return {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", "PROBE_LOG": str(tmp_path / "log.txt"),
            "PYTHONPATH": str(REPO_ROOT), **extra}


def _run_probe(tmp_path: Path, args, fail_rank: str | None = None, timeout: int = 300):
    env = _probe_env(tmp_path, **({"PROBE_FAIL_RANK": fail_rank} if fail_rank is not None else {}))
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(tmp_path / "probe.py"), *args], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout)
    return result, time.perf_counter() - start


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_float32_agree_with_one_rank_and_only_rank_0_writes(one_rank_runs, shared_path, tmp_path):
    """Two "machines" (one rank each) started by hand the way the README says: MASTER_ADDR,
    MASTER_PORT and NODE_RANK on each, trainer.num_nodes=2."""
    out = tmp_path / "out"
    port = str(_free_port())
    procs = []
    for node in (0, 1):
        env = _probe_env(tmp_path, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(node))
        procs.append(subprocess.Popen(
            [sys.executable, str(tmp_path / "probe.py"), "recipe=gptq_w4", *_small(shared_path),
             "trainer.devices=1", "trainer.num_nodes=2", "trainer.strategy=ddp",
             f"output_dir={out}", f"hydra.run.dir={tmp_path / f'h{node}'}"],
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert (tmp_path / "log.txt").read_text() == "save by rank rank 0/2: \n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt", "out", "probe.py"]

    ref_dir = one_rank_runs["float32"]
    ref, got = _tensors(ref_dir), _tensors(out)
    assert ref.keys() == got.keys()
    agree = total = 0
    for key in (k for k in ref if k.endswith(".weight_packed")):
        cols = int(ref[key.replace("_packed", "_shape")][1])
        a, b = unpack_int32(ref[key], 4, cols, dim=1), unpack_int32(got[key], 4, cols, dim=1)
        agree += int((a == b).sum())
        total += a.numel()
    assert agree / total >= 0.999, agree / total
    ref_report = json.loads((ref_dir / "report.json").read_text())
    report = json.loads((out / "report.json").read_text())
    for name, stats in ref_report["modules"].items():
        assert report["modules"][name]["loss"] == pytest.approx(stats["loss"], rel=1e-3), name
        assert report["modules"][name]["tokens"] == stats["tokens"] == 13 * 64
    # Every step is a true-sequential gate (one group, fewer than ranks): its rows are split and
    # the group's Hessian all-reduced, each of the 2 ranks sending its full float32 sum once per
    # group (q/k/v, o, gate/up: 64 columns; down: 172) and layer.
    per_layer = (3 * 64 * 64 + 172 * 172) * 4
    assert report["distributed"]["bytes_sent"]["hessian_reduce"] == 2 * 5 * per_layer
    layers = report["distributed"]["layers"]
    assert [layer["steps"] for layer in layers] == [4] * 5  # groups known before layer 0 (learn_input_groups)
    for layer in layers:  # both ranks solved, and every row of the layer's 7 modules exactly once
        assert {g["owner"] for g in layer["groups"]} == {0, 1}
        covered: dict[str, list[int]] = {}
        for g in layer["groups"]:
            for name, (start, stop) in zip(g["modules"], g.get("rows_slice") or [[0, r] for r in g["rows"]]):
                covered.setdefault(name, []).extend(range(start, stop))
        assert len(covered) == 7 and all(sorted(rows) == list(range(len(rows))) for rows in covered.values())
    # Evaluation sharded over the ranks gives the one-rank numbers.
    assert report["ppl_before"] == pytest.approx(ref_report["ppl_before"], rel=1e-9)
    assert report["eval_tokens"] == ref_report["eval_tokens"]
    assert report["kl_after"] == pytest.approx(ref_report["kl_after"], rel=1e-3, abs=1e-6)


def test_a_failing_rank_is_named_and_the_run_stops(shared_path, tmp_path):
    out = tmp_path / "out"
    # No wall-clock bound of its own (a busy machine slows the run, not the failure handling): a
    # hang ends in the subprocess timeout.
    result, _ = _run_probe(tmp_path, ["recipe=gptq_w4", *_small(shared_path), "trainer.devices=2",
                                      "eval.enabled=false", f"output_dir={out}"], fail_rank="1", timeout=400)
    assert result.returncode != 0
    assert "fabricq: error: rank 1/2: failed: RuntimeError: injected failure" in result.stderr
    assert not out.exists()


def test_mismatched_configs_across_ranks_are_refused(shared_path, tmp_path):
    """Two processes started by hand (as a launcher would) with different overrides."""
    port = _free_port()
    procs = []
    for rank, bits in ((0, 4), (1, 8)):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "NODE_RANK": "0"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "fabricq", "recipe=gptq_w4", *_small(shared_path), "trainer.devices=2",
             f"quant.bits={bits}", "eval.enabled=false", f"output_dir={tmp_path / 'out'}"],
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=240) for p in procs]
    # Both stop; at least one says why (the other may instead see its peer hang up first: seen
    # once in CI, rank 0 exited 1 after rank 1 had reported the mismatch).
    assert all(p.returncode != 0 for p in procs), outputs
    assert any(p.returncode == 2 and "the resolved config differs between ranks" in out[1]
               for p, out in zip(procs, outputs)), outputs
    assert not (tmp_path / "out").exists()


def test_bad_distributed_input_fails_before_launch():
    result = run_cli("recipe=gptq_w4", "trainer.strategy=horovod", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("fabricq: error: trainer.strategy must be one of")
    result = run_cli("recipe=gptq_w4", "trainer.num_nodes=2", timeout=120)
    assert result.returncode == 2 and "needs a multi-node launch" in result.stderr
