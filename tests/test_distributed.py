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

from conftest import REPO_ROOT, run_cli
from fabricq.parallel.plan import CostModel, SolveTask, assign_to_ranks, assign_with_backlog, local_samples, makespan, shard_batches, solve_cost, split_rows, split_stacked_rows
from fabricq.runtime import config_digest, solve_window_of, validate_trainer
from fabricq.parallel.exchange import pack_upper, unpack_upper
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


def test_backlog_plan_balances_the_run_where_per_layer_plans_cannot():
    """A layer of one dominant group (down_proj-like, 8) and two small ones (1 each) on 2 ranks:
    any per-layer plan waits 8 per layer; carrying the backlog, the big group alternates and
    every rank ends with half the run's work."""
    layer = [8.0, 1.0, 1.0]
    loads = [0.0, 0.0]
    owners = [assign_with_backlog(layer, loads) for _ in range(6)]
    assert [o[0] for o in owners] == [0, 1, 0, 1, 0, 1]
    assert loads == [30.0, 30.0]
    assert 6 * makespan(layer, assign_to_ranks(layer, 2), 2) == 48.0
    # Random layers: the run never exceeds its ideal by more than the largest task so far, and every
    # rank that plans from the same loads gets the same owners.
    rng = random.Random(1)
    loads, again, largest = [0.0] * 4, [0.0] * 4, 0.0
    for _ in range(40):
        costs = [rng.uniform(0.1, 5.0) for _ in range(rng.randint(1, 6))]
        largest = max(largest, *costs)
        assert assign_with_backlog(costs, loads) == assign_with_backlog(costs, again)
        assert max(loads) <= sum(loads) / 4 + largest + 1e-9


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


def test_solve_window_resolves_and_needs_a_lag():
    assert solve_window_of(_trainer(devices=4, cpu_oversubscribe=True), lag=1) == 4
    assert solve_window_of(_trainer(devices=4, cpu_oversubscribe=True), lag=0) == 0
    assert solve_window_of(_trainer(devices=2, solve_window=7), lag=1) == 7
    assert solve_window_of(_trainer(devices=2, solve_window=0), lag=0) == 0
    with pytest.raises(FabricqError, match="trainer.solve_window=3 needs pipeline.lag=1"):
        solve_window_of(_trainer(devices=2, solve_window=3), lag=0)


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
    assert CostModel(use_measurements=False).predict(qkv) == solve_cost(qkv)


def test_upper_triangle_round_trip():
    x = torch.randn(50, 7, dtype=torch.float64)
    h = x.T @ x
    h = (h + h.T) / 2
    flat = pack_upper(h)
    assert flat.numel() == 7 * 8 // 2
    assert torch.equal(unpack_upper(flat, 7), h)


@pytest.mark.parametrize("upper_triangle", [False, True])
def test_raw_sums_from_ranks_add_up_to_the_full_hessian(upper_triangle):
    """Ranks send their raw sums (wide inputs accumulate only the lower triangle, in strips):
    the total, mirrored once where it is read, is the Hessian of all their tokens."""
    from fabricq.parallel.exchange import reduction_payload
    from fabricq.quant.hessian import HessianAccumulator

    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 300, generator=g) for n in (40, 70)]  # 300 columns: stripped
    ranks = [HessianAccumulator(300) for _ in parts]
    for acc, x in zip(ranks, parts):
        acc.add(x)
    owner = ranks[0]
    payloads = [reduction_payload(acc, upper_triangle) for acc in ranks]
    total = payloads[0] + payloads[1]  # what a reduce to the owner computes
    if upper_triangle:
        owner.sum = unpack_upper(total, 300)
    else:
        owner.raw.copy_(total)  # in place, as the collective writes it
    expected = sum(x.double().T @ x.double() for x in parts)
    assert torch.allclose(owner.sum.double(), expected, rtol=1e-5, atol=1e-3)
    assert torch.equal(owner.sum, owner.sum.T)


def _trainer(**kw):
    base = dict(accelerator="cpu", devices=1, num_nodes=1, strategy="auto", timeout_s=600,
                cpu_oversubscribe=False, hessian_upper_triangle=False, balance="measured", solve_window="auto")
    return OmegaConf.create({**base, **kw})


DATA = OmegaConf.create(dict(num_samples=16, batch_size=4))


@pytest.mark.parametrize("trainer,environ,message", [
    (dict(strategy="horovod"), {}, "trainer.strategy must be one of"),
    (dict(devices=os.cpu_count() + 1), {}, "usable CPU core"),
    (dict(devices=0), {}, "trainer.devices must be a positive integer"),
    (dict(num_nodes=2), {}, "needs a multi-node launch"),
    (dict(num_nodes=2), {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}, "NODE_RANK"),
    (dict(devices=2, cpu_oversubscribe=True), {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "4"}, "torchrun started 4"),
    (dict(devices=5, cpu_oversubscribe=True), {}, "only 4 calibration batches"),
    (dict(timeout_s=0), {}, "trainer.timeout_s"),
    (dict(strategy="fsdp"), {}, "fsdp needs CUDA"),
    (dict(solve_window=-1), {}, "trainer.solve_window must be auto or a whole number"),
    (dict(solve_window="wide"), {}, "trainer.solve_window must be auto or a whole number"),
])
def test_bad_trainer_settings(trainer, environ, message):
    with pytest.raises(FabricqError, match=message):
        validate_trainer(_trainer(**trainer), DATA, environ=environ)


def test_good_trainer_settings_pass():
    validate_trainer(_trainer(devices=1, strategy="ddp"), DATA, environ={})
    validate_trainer(_trainer(devices=2, num_nodes=2, cpu_oversubscribe=True), DATA,
                     environ={"MASTER_ADDR": "h", "MASTER_PORT": "1", "NODE_RANK": "0"})
    validate_trainer(_trainer(devices=2, num_nodes=2, cpu_oversubscribe=True), DATA,
                     environ={"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "4"})


def test_config_digest_ignores_output_dir_only():
    a = OmegaConf.create({"output_dir": "a", "quant": {"bits": 4}})
    assert config_digest(a) == config_digest(OmegaConf.create({"output_dir": "b", "quant": {"bits": 4}}))
    assert config_digest(a) != config_digest(OmegaConf.create({"output_dir": "a", "quant": {"bits": 8}}))


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
        "trainer.cpu_oversubscribe=true", "trainer.timeout_s=60",
    ]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _assert_identical(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    differ = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
    assert not differ, f"{b} differs from {a} in {differ[:5]}"


@pytest.fixture(scope="module")
def one_rank_runs(shared_path, tmp_path_factory):
    """One rank, float32 and float64 Hessians (a one-process multirun)."""
    sweep = tmp_path_factory.mktemp("one_rank")
    result = run_cli("-m", "+recipe=gptq_w4", *_small(shared_path), "quant.hessian_dtype=float32,float64",
                     f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr[-3000:]
    return {"float32": sweep / "0", "float64": sweep / "1"}


@pytest.fixture(scope="module")
def multirun_2_and_3_ranks(shared_path, tmp_path_factory):
    """`-m trainer.devices=2,3` with float64 Hessians: two jobs of several ranks each."""
    sweep = tmp_path_factory.mktemp("sweep")
    result = run_cli("-m", "recipe=gptq_w4", *_small(shared_path), "quant.hessian_dtype=float64",
                     "trainer.devices=2,3", "eval.enabled=false", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep


def test_multirun_with_several_ranks_makes_one_complete_directory_per_job(multirun_2_and_3_ranks):
    sweep = multirun_2_and_3_ranks
    assert sorted(p.name for p in sweep.iterdir() if not p.name.startswith("multirun")) == ["0", "1"]
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


def test_lagged_pipeline_on_2_ranks_matches_1_rank(shared_path, tmp_path):
    """pipeline.lag=1 runs each layer's Hessian reductions and result broadcasts on a worker thread
    while the next layer's forward runs, and on 2 ranks (solve window 2) each owner solves on a
    thread of its own, publishing a layer two layers later: still bit-identical to one rank with
    float64 Hessians."""
    result = run_cli("-m", "recipe=gptq_w4", *_small(shared_path), "quant.hessian_dtype=float64",
                     "quant.true_sequential=false", "pipeline.lag=1", "trainer.devices=1,2",
                     "eval.enabled=false", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_identical(tmp_path / "0", tmp_path / "1")
    report = json.loads((tmp_path / "1" / "report.json").read_text())["distributed"]
    assert [layer["layer"] for layer in report["layers"]] == list(range(5))
    # The solve window (auto: 2 ranks → 2 layers) planned the run, not each layer: both ranks
    # solved, and their planned work differs by less than the largest group's.
    window = report["solve_window"]
    assert window["window"] == 2
    assert all(s > 0 for s in window["solve_s_per_rank"])
    largest = max(g["planned"] for layer in report["layers"] for g in layer["groups"])
    assert max(window["planned_per_rank"]) - min(window["planned_per_rank"]) <= largest


PROBE = """
import os, sys
import fabricq.export, fabricq.runtime
from fabricq.__main__ import main

log = os.environ["PROBE_LOG"]
save = fabricq.export.save_compressed_checkpoint

def recording_save(*args, **kwargs):
    with open(log, "a") as f:
        f.write(f"save by rank {fabricq.runtime.rank_label()}\\n")
    return save(*args, **kwargs)

fabricq.export.save_compressed_checkpoint = recording_save
fail_rank = os.environ.get("PROBE_FAIL_RANK")
solve = fabricq.parallel.solvers.DistributedGPTQCallback.solve_modules

def failing_solve(self, names, weights, hessians):
    if str(self.rank) == fail_rank and any("layers.1." in name for name in names):
        raise RuntimeError("injected failure")
    return solve(self, names, weights, hessians)

fabricq.parallel.solvers.DistributedGPTQCallback.solve_modules = failing_solve
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
    MASTER_PORT and NODE_RANK on each, trainer.num_nodes=2. Only upper triangles travel."""
    out = tmp_path / "out"
    port = str(_free_port())
    procs = []
    for node in (0, 1):
        env = _probe_env(tmp_path, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(node))
        procs.append(subprocess.Popen(
            [sys.executable, str(tmp_path / "probe.py"), "+recipe=gptq_w4", *_small(shared_path),
             "trainer.devices=1", "trainer.num_nodes=2", "trainer.strategy=ddp", "trainer.hessian_upper_triangle=true",
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
    # Only upper triangles travelled: 64·65/2 and 172·173/2 floats per group, 3 + 1 groups per
    # layer; a true-sequential gate (one group, fewer than ranks) splits rows and all-reduces
    # the group's Hessian: each of the 2 ranks sends its triangle.
    assert report["distributed"]["upper_triangle"]
    per_layer = (3 * 64 * 65 // 2 + 172 * 173 // 2) * 4
    sent = report["distributed"]["bytes_sent"]["hessian_reduce"]
    assert sent == 2 * 5 * per_layer
    assert sent < 2 * 5 * (3 * 64 * 64 + 172 * 172) * 4  # less than the full matrices would have been
    # Evaluation sharded over the ranks gives the one-rank numbers.
    assert report["ppl_before"] == pytest.approx(ref_report["ppl_before"], rel=1e-9)
    assert report["eval_tokens"] == ref_report["eval_tokens"]
    assert report["kl_after"] == pytest.approx(ref_report["kl_after"], rel=1e-3, abs=1e-6)


def test_a_failing_rank_is_named_and_the_run_stops(shared_path, tmp_path):
    out = tmp_path / "out"
    result, seconds = _run_probe(tmp_path, ["+recipe=gptq_w4", *_small(shared_path), "trainer.devices=2",
                                            "eval.enabled=false", f"output_dir={out}"], fail_rank="1", timeout=240)
    assert result.returncode != 0
    assert "fabricq: error: rank 1/2: failed: RuntimeError: injected failure" in result.stderr
    assert not out.exists()
    assert seconds < 180


def test_mismatched_configs_across_ranks_are_refused(shared_path, tmp_path):
    """Two processes started by hand (as a launcher would) with different overrides."""
    port = _free_port()
    procs = []
    for rank, bits in ((0, 4), (1, 8)):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "NODE_RANK": "0"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "fabricq", "+recipe=gptq_w4", *_small(shared_path), "trainer.devices=2",
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
    result = run_cli("+recipe=gptq_w4", "trainer.strategy=horovod", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("fabricq: error: trainer.strategy must be one of")
    result = run_cli("+recipe=gptq_w4", "trainer.num_nodes=2", timeout=120)
    assert result.returncode == 2 and "needs a multi-node launch" in result.stderr
