"""Runs on the tiny real Llama (stories260k) that must never destroy a user's files nor write a
silently wrong model: inputs around the output, two runs on one output, the old output kept until
the new one is complete (also across a kill inside publish), cleanup after failures, permissions,
what the resume identity covers, quant.ignore in the written checkpoint, a full disk."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO_ROOT, run_cli
from in_process import run_app
from fabricq.errors import FabricqError

ARGS = ["eval.enabled=false", "data.num_samples=4", "data.seq_len=32", "data.batch_size=2"]
LAYERS = 5

# Runs `python -m fabricq ARGS` after patching fabricq: RUN_MODE=slow sleeps after each layer's
# commit (time to look at the files meanwhile); RUN_MODE=kill-in-publish SIGKILLs the process
# right after publish moved the old output aside.
PATCHED_RUN = """
import os, signal, sys, time
import fabricq.resume as resume
import fabricq.output as output
mode = os.environ["RUN_MODE"]
commit = resume.WorkDirectory.commit_layer
def slow_commit(self, *args):
    commit(self, *args)
    time.sleep(0.5)
if mode == "slow":
    resume.WorkDirectory.commit_layer = slow_commit
publish = output.OutputClaim.publish
def killed_publish(self, staging):
    replace = os.replace
    def replace_then_die(src, dst):
        replace(src, dst)
        os.kill(os.getpid(), signal.SIGKILL)
    output.os.replace = replace_then_die
    publish(self, staging)
if mode == "kill-in-publish":
    output.OutputClaim.publish = killed_publish
import runpy
sys.argv = ["fabricq", *sys.argv[1:]]
runpy.run_module("fabricq", run_name="__main__", alter_sys=True)
"""


def start_patched(mode: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", "RUN_MODE": mode}
    return subprocess.Popen([sys.executable, "-c", PATCHED_RUN, *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.fixture
def model(shared_path, tmp_path) -> Path:
    folder = tmp_path / "models" / "stories260k"
    shutil.copytree(shared_path("models", "stories260k"), folder)
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden_beside(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def write_text_data(path: Path) -> Path:
    from fabricq.data import builtin_documents

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(d.replace("\n\n", "\n") for d in builtin_documents()[:40]) + "\n")
    return path


class Crash(Exception):
    pass


def crash_after_layer(monkeypatch, layer: int) -> None:
    """The in-process run raises right after committing `layer` (as if killed there)."""
    import fabricq.resume

    commit = fabricq.resume.WorkDirectory.commit_layer

    def commit_then_crash(self, index, *args):
        commit(self, index, *args)
        if index == layer:
            raise Crash

    monkeypatch.setattr(fabricq.resume.WorkDirectory, "commit_layer", commit_then_crash)


# -- inputs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["model", "parent", "inside", "symlink"])
def test_output_dir_over_an_input_is_refused_and_inputs_stay_byte_identical(model, tmp_path, where):
    (tmp_path / "models" / "notes.txt").write_text("unrelated file beside the model")
    (tmp_path / "link").symlink_to(model)
    out = {"model": model, "parent": model.parent, "inside": model / "quantized", "symlink": tmp_path / "link"}[where]
    before = snapshot(tmp_path)
    with pytest.raises(FabricqError, match="never writes over its inputs, even with overwrite=true"):
        run_app(*ARGS, f"model.path={model}", f"output_dir={out}", "overwrite=true")
    assert snapshot(tmp_path) == before
    assert hidden_beside(out) == []


def test_data_file_inside_the_output_is_refused_on_the_command_line(model, tmp_path):
    out = tmp_path / "out"
    data = write_text_data(out / "calibration.txt")
    before = snapshot(tmp_path)
    result = run_cli(*ARGS, f"model.path={model}", f"data.path={data}", f"output_dir={out}", "overwrite=true")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"fabricq: error: output_dir {out} contains data.path ({data}): fabricq never writes over its inputs, "
        "even with overwrite=true; choose an output_dir outside them"]
    assert snapshot(tmp_path) == before


# -- one output, one run at a time; the old output until the new one is complete ------------------


def test_old_output_stays_while_a_run_works_and_a_second_run_is_refused(model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("the previous output")
    (out / "report.json").write_text("{}")
    before = snapshot(out)
    proc = start_patched("slow", *ARGS, f"model.path={model}", f"output_dir={out}", "overwrite=true")
    try:
        wait_for(out.parent / ".out.work" / "state" / "L00001.rank0.json", proc)
        assert snapshot(out) == before  # not deleted at the start of the run
        with pytest.raises(FabricqError, match=rf"another fabricq run \(pid {proc.pid} on .*\) is writing output_dir {out}"):
            run_app(*ARGS, f"model.path={model}", f"output_dir={out}", "overwrite=true")
        assert snapshot(out) == before
    finally:
        _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert any(name.endswith(".weight_packed") for name in load_file(out / "model.safetensors"))
    assert not (out / "report.json").read_text() == "{}"
    assert hidden_beside(out) == []


def test_kill_inside_publish_then_rerun_restores_and_finishes(model, tmp_path):
    """SIGKILL between moving the old output aside and renaming the new one in: the old output is
    complete in `.out.old-PID`; the same command puts it back, resumes after the last layer and
    publishes the new output."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old output")
    args = [*ARGS, f"model.path={model}", f"output_dir={out}", "overwrite=true"]
    proc = start_patched("kill-in-publish", *args)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
    assert not out.exists()
    (aside,) = tmp_path.glob(".out.old-*")
    assert snapshot(aside) == {"old.txt": b"old output"}

    report = run_app(*args)
    assert report["resumed_after_layer"] == LAYERS - 1
    assert {"config.json", "model.safetensors", "report.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "old.txt").exists()
    assert hidden_beside(out) == []


# -- failures leave nothing behind -----------------------------------------------------------------


def test_a_failure_before_calibration_leaves_nothing(model, tmp_path):
    out = tmp_path / "new" / "nested" / "out"
    with pytest.raises(FabricqError, match="quant.ignore matches all 35 Linear modules"):
        run_app(*ARGS, f"model.path={model}", f"output_dir={out}", "quant.ignore=[.]")
    assert not (tmp_path / "new").exists()

    hydra_dir = tmp_path / "outputs" / "run"
    result = run_cli(*ARGS, f"model.path={model}", f"hydra.run.dir={hydra_dir}", "quant.ignore=[proj]")
    assert result.returncode == 2 and "nothing would be quantized" in result.stderr
    assert list((tmp_path / "outputs").iterdir()) == []


def test_a_full_disk_during_export_says_rerun_and_the_rerun_resumes(model, tmp_path, monkeypatch):
    import fabricq.checkpoint.files

    out = tmp_path / "out"

    def full_disk(*args, **kwargs):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(fabricq.checkpoint.files, "save_file", full_disk)
    with pytest.raises(FabricqError, match="no space left on device: free space and rerun: the run resumes"):
        run_app(*ARGS, f"model.path={model}", f"output_dir={out}")
    assert not out.exists()
    assert hidden_beside(out) == [".out.work"]  # the staging folder is gone, the finished layers kept
    monkeypatch.undo()
    assert run_app(*ARGS, f"model.path={model}", f"output_dir={out}")["resumed_after_layer"] == LAYERS - 1


# -- permissions -----------------------------------------------------------------------------------


def test_every_written_file_gets_the_umask_mode(model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        crash_after_layer(monkeypatch, 2)
        with pytest.raises(Crash):
            run_app(*ARGS, f"model.path={model}", f"output_dir={out}")
        work = tmp_path / ".out.work"
        files = [p for p in work.rglob("*") if p.is_file() and not p.name.startswith("lock")]
        assert {p.parent.name for p in files} >= {"layers", "state", "L00002.rank0", ".out.work"}
        assert {str(p.relative_to(work)): oct(p.stat().st_mode & 0o777) for p in files} == {
            str(p.relative_to(work)): "0o644" for p in files}
        monkeypatch.undo()
        run_app(*ARGS, f"model.path={model}", f"output_dir={out}")
    finally:
        os.umask(old)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {p.name: "0o644" for p in out.iterdir()}
    assert oct(out.stat().st_mode & 0o777) == "0o755"


# -- what a resume must match ----------------------------------------------------------------------


def test_resume_identity_covers_weight_values_and_calibration_tokens_not_the_folder(model, tmp_path, monkeypatch):
    data = write_text_data(tmp_path / "calibration.txt")
    out = tmp_path / "out"
    args = [*ARGS, f"data.path={data}", f"output_dir={out}"]
    crash_after_layer(monkeypatch, 1)
    with pytest.raises(Crash):
        run_app(*args, f"model.path={model}")
    monkeypatch.undo()

    changed = tmp_path / "changed" / "stories260k"
    shutil.copytree(model, changed)
    tensors = load_file(changed / "model.safetensors")
    tensors["model.layers.3.mlp.up_proj.weight"][10, 20] += 1e-3  # one value, same names and sizes
    save_file(tensors, changed / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FabricqError, match="holds an unfinished run of a different model .*model.files.model.safetensors"):
        run_app(*args, f"model.path={changed}")

    text = data.read_text()
    # Other calibration tokens (windows start at documents' beginnings), same file and config.
    data.write_text("\n\n".join("Note: " + doc for doc in text.split("\n\n")))
    with pytest.raises(FabricqError, match="holds an unfinished run of different calibration data"):
        run_app(*args, f"model.path={model}")
    data.write_text(text)

    moved = tmp_path / "elsewhere" / "renamed-model"
    shutil.move(model, moved)  # the same files in another folder: still this run
    assert run_app(*args, f"model.path={moved}")["resumed_after_layer"] == 1


# -- quant.ignore in the written checkpoint --------------------------------------------------------


def test_ignored_modules_are_written_unquantized(model, tmp_path):
    out = tmp_path / "out"
    run_app(*ARGS, f"model.path={model}", f"output_dir={out}", "quant.ignore=[mlp\\.down_proj$]")
    original, written = load_file(model / "model.safetensors"), load_file(out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    for i in range(LAYERS):
        down = f"model.layers.{i}.mlp.down_proj"
        # As loaded, in the export's dtype (a quantized weight would differ far beyond rounding).
        assert torch.equal(written[f"{down}.weight"], original[f"{down}.weight"].to(written[f"{down}.weight"].dtype))
        assert f"{down}.weight_packed" not in written and down in config["ignore"]
        for other in ("self_attn.q_proj", "mlp.up_proj"):
            assert f"model.layers.{i}.{other}.weight_packed" in written
            assert f"model.layers.{i}.{other}.weight" not in written


def test_a_nan_hessian_during_the_run_stops_at_the_module(model, tmp_path, monkeypatch):
    """Activations that overflow give a NaN Hessian; GPTQ would fall back to round-to-nearest
    with a NaN loss and write a model as if all were well."""
    from fabricq.callbacks.hessians import SharedInputHessians

    hessian = SharedInputHessians.hessian

    def poisoned(self, name):
        h = hessian(self, name)
        return torch.full_like(h, float("nan")) if name.startswith("model.layers.2.mlp.") else h

    monkeypatch.setattr(SharedInputHessians, "hessian", poisoned)
    out = tmp_path / "out"
    with pytest.raises(FabricqError, match=r"model.layers.2.mlp.(gate|up|down)_proj: quantization produced NaN/Inf"):
        run_app(*ARGS, f"model.path={model}", f"output_dir={out}")
    assert not out.exists()


# -- an accelerator this machine lacks; the spill folder's errors name output_dir ------------------


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="needs a CPU-only machine")
@pytest.mark.parametrize("accelerator, lacking", [("mps", "no MPS device"), ("cuda", "no CUDA device"),
                                                  ("gpu", "no CUDA device")])
def test_an_accelerator_this_machine_lacks_is_refused_before_the_model_loads(model, tmp_path, monkeypatch,
                                                                              accelerator, lacking):
    import fabricq.app

    monkeypatch.setattr(fabricq.app, "load_model", lambda *a, **k: pytest.fail("the model must not be loaded"))
    with pytest.raises(FabricqError) as err:
        run_app(*ARGS, f"model.path={model}", f"output_dir={tmp_path / 'out'}", f"trainer.accelerator={accelerator}")
    assert str(err.value).startswith(f"trainer.accelerator={accelerator} but this machine has {lacking} (it has ")
    assert "CPU core(s), 0 CUDA device(s), no MPS): use trainer.accelerator=auto or cpu" in str(err.value)
    assert list(tmp_path.iterdir()) == [tmp_path / "models"]


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="needs a machine without MPS")
def test_an_accelerator_this_machine_lacks_is_one_line_exit_2(model, tmp_path):
    result = run_cli(*ARGS, f"model.path={model}", f"output_dir={tmp_path / 'out'}", "trainer.accelerator=mps")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("fabricq: error: trainer.accelerator=mps but this machine has no MPS device")
    assert result.stderr.count("\n") == 1


def spill_settings(**cache):
    from types import SimpleNamespace

    return SimpleNamespace(cache=SimpleNamespace(**{"spill_dir": None, "device_mib": None, "host_mib": 0.01, **cache}),
                           data=SimpleNamespace(num_samples=4, batch_size=2, seq_len=8),
                           model=SimpleNamespace(dtype="float32"))


def test_an_unwritable_spill_location_names_output_dir(tmp_path):
    from fabricq.calibration.cache import cache_from_config
    from fabricq.resume import WorkDirectory, work_dir_for

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = blocker / "out"
    with pytest.raises(FabricqError, match=f"^output_dir {out} cannot be written: .*Not a directory$"):
        cache_from_config(spill_settings(), {"hidden_size": 64}, WorkDirectory(work_dir_for(out)), "cpu")
    with pytest.raises(FabricqError, match=f"^cache.spill_dir {blocker} cannot be written: .*Not a directory$"):
        cache_from_config(spill_settings(spill_dir=str(blocker)), {"hidden_size": 64},
                          WorkDirectory(work_dir_for(tmp_path / "out")), "cpu")


def test_too_little_space_for_a_small_spill_does_not_say_0_mib(tmp_path, monkeypatch):
    from collections import namedtuple

    from fabricq.calibration import cache
    from fabricq.resume import WorkDirectory, work_dir_for

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda path: usage(1 << 30, (1 << 30) - 100, 100))
    out = tmp_path / "out"
    # 4 windows × 8 tokens × 64 float32 = 8 KiB a stage; two resident and two snapshots, 4 KiB in memory.
    with pytest.raises(FabricqError) as err:
        cache.cache_from_config(spill_settings(host_mib=4 / 1024), {"hidden_size": 64}, WorkDirectory(work_dir_for(out)),
                                "cpu")
    assert str(err.value) == (f"not enough free space for spilled hidden states in output_dir {out}: up to 28 KiB "
                              "needed, 100 bytes free (raise cache.host_mib or free disk space)")
