"""The command-line paths that a host with native bf16 takes when bf16 forwards are asked for
(`model.dtype=bfloat16`), run on every host: quantize, resume after a kill, recovery and merge.

On an AVX2-only host bf16 is emulated (slow), so the models are tiny; on AVX-512 BF16 / AMX hosts
the same commands run bf16 products for the Hessians. Either way the assertions hold: they are
about what the code does with bf16 hidden states, not about the host."""

from __future__ import annotations

import json
import shutil
import signal

import pytest
import torch
from conftest import SHARED_DIR, run_cli
from test_recovery_cli import RECOVER, adapter_of, read_run_quantized, recover_cli
from test_resume import ARGS, LAYER_MODE, assert_same_checkpoint, start_killable, wait_for, work_dir

from fabricq.errors import FabricqError

BF16 = "model.dtype=bfloat16"
# ARGS pins float32; the last override of a field wins.
RESUME_ARGS = [*ARGS, BF16]
# bf16 hidden states are half float32's bytes: about three batches of them in host memory.
SPILL = ["cache.host_mib=0.05", *LAYER_MODE]

MODEL = SHARED_DIR / "models" / "stories260k"
TEXT = SHARED_DIR / "data" / "tinystories-sample.txt"
QUANTIZE = ["recipe=gptq_w4", f"model.path={MODEL}", BF16, f"data.path={TEXT}", "data.num_samples=8",
            "data.seq_len=64", "data.batch_size=4", "data.eval_fraction=0.5", "eval.seq_len=64", "eval.max_windows=4",
            "eval.kl_windows=2"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from test_resume import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("bf16_model") / "a", seed=0)


def test_bf16_run_killed_between_layers_resumes_bit_identical_and_refuses_float32(tiny_llama, tmp_path):
    reference = tmp_path / "reference"
    result = run_cli(*RESUME_ARGS, *SPILL, f"model.path={tiny_llama}", f"output_dir={reference}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((reference / "report.json").read_text())
    assert (report["precision"]["forward_dtype"], report["precision"]["model_dtype"]) == ("bfloat16", "bfloat16")
    assert report["cache"]["disk"]["spilled_batches"] > 0  # the budget is sized for bf16 hidden states

    out = tmp_path / "out"
    args = [*RESUME_ARGS, *SPILL, f"model.path={tiny_llama}", f"output_dir={out}"]
    proc = start_killable("slow", -1, *args)
    wait_for(work_dir(out) / "state" / "L00001.rank0.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # The forward dtype is part of the run's identity: float32 forwards would mix dtypes across layers.
    from in_process import run_app

    with pytest.raises(FabricqError, match=r"holds an unfinished run of a different config \(.*precision.forward_dtype: 'bfloat16' → 'float32'"):
        run_app(*args, "model.dtype=float32")
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming" in result.stdout + result.stderr
    assert json.loads((out / "report.json").read_text())["resumed_after_layer"] in (1, 2)
    assert_same_checkpoint(out, reference)


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    if not MODEL.exists() or not TEXT.exists():
        pytest.skip(f"{MODEL} or {TEXT} is absent (../shared beside the checkout holds the test data/models)")
    out = tmp_path_factory.mktemp("bf16_recovery") / "w4"
    result = run_cli(*QUANTIZE, f"output_dir={out}", env={"FABRICQ_CACHE": str(out.parent / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_bf16_run_quantizes_every_module_onto_its_grid(bf16_run):
    report = json.loads((bf16_run / "report.json").read_text())
    assert report["precision"]["forward_dtype"] == "bfloat16" and len(report["modules"]) == 35
    assert report["ppl_after"] < 2 * report["ppl_before"]  # W4 of a float model: a bounded loss
    assert report["kl_after"] > 0
    for qw in read_run_quantized(bf16_run).values():
        assert int(qw.codes.min()) >= qw.scheme.qmin and int(qw.codes.max()) <= qw.scheme.qmax


def test_bf16_recovery_trains_in_the_runs_dtype_and_merges_onto_the_grid(bf16_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(bf16_run, run_dir)
    result = recover_cli(run_dir, "+recovery=lora", "recovery.steps=4", "recovery.merge=true", *RECOVER,
                         env={"FABRICQ_CACHE": str(bf16_run.parent / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    section = report["recovery"]
    # The base is the run's own bf16 measurement: the recovery evaluates in the dtype the run did.
    assert (section["ppl_after"], section["kl_after"]) == (report["ppl_after"], report["kl_after"])
    assert section["kl_after_recovery"] < section["kl_after"]
    tensors = adapter_of(run_dir)
    assert len(tensors) == 70 and all(torch.isfinite(t).all() for t in tensors.values())
    base, merged = read_run_quantized(run_dir), read_run_quantized(run_dir / "merged")
    assert sorted(merged) == sorted(base)
    for name, qw in merged.items():
        assert torch.equal(qw.scale, base[name].scale)
        assert int(qw.codes.min()) >= qw.scheme.qmin and int(qw.codes.max()) <= qw.scheme.qmax
    assert section["kl_after_merge"] is not None and section["kl_after_merge"] > 0
