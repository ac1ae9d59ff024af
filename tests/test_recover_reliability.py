"""`python -m fabricq.recover` keeps the promises the main command keeps (issue #28): nothing
non-finite is published, one recovery of an output at a time, resume only onto the same base,
teacher, text and settings, an atomic adapter swap that a crash cannot break, umask
permissions, one `fabricq: error:` line with exit code 2 for every user error.

Every case runs the real command line in a subprocess on the tiny real model
(../shared/models/stories260k). Where a test must crash the recovery at one exact point, the
subprocess is `python -c` with one function of fabricq replaced by `os.kill(os.getpid(), SIGKILL)`
and then `runpy` of `fabricq.recover` as `__main__` (the same entry as `python -m`)."""

from __future__ import annotations

import json
import os
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, SHARED_DIR, run_cli

MODEL = SHARED_DIR / "models" / "stories260k"
TEXT = SHARED_DIR / "data" / "tinystories-sample.txt"
LONG_TEXT = SHARED_DIR / "data" / "wikitext-2-raw-validation.txt"
QUANTIZE = ["model.path=" + str(MODEL), "model.dtype=float32", f"data.path={TEXT}", "data.num_samples=8",
            "data.seq_len=64", "data.batch_size=4", "data.eval_fraction=0.5", "eval.seq_len=64", "eval.max_windows=4",
            "eval.kl_windows=2"]
RECOVER = ["recovery.seq_len=32", "recovery.rank=8", "recovery.alpha=16", "recovery.eora_samples=4", "recovery.lr=1e-3",
           "recovery.top_k=16", "recovery.warmup=0"]
ENV = {"HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}


def recover(run_dir: Path, *args: str, env: dict | None = None, umask: int | None = None,
            patch: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m fabricq.recover RUN_DIR ARGS`; with `patch`, Python run first in that process
    (to crash it at one point), then the same module as __main__."""
    if patch is None:
        command = [sys.executable, "-m", "fabricq.recover", str(run_dir), *args]
    else:
        script = f"import os, runpy, signal, sys\n{patch}\nsys.argv = sys.argv[1:]\nrunpy.run_module('fabricq.recover', run_name='__main__')\n"
        command = [sys.executable, "-c", script, "fabricq.recover", str(run_dir), *args]
    preexec = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, **ENV, "FABRICQ_CACHE": str(run_dir.parent / "cache"),
                                                       **(env or {})},
                          capture_output=True, text=True, timeout=timeout, preexec_fn=preexec)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one `fabricq: error:` line of a failed command (exit 2, no traceback)."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("fabricq: error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == lines[0]
    return lines[0]


def strict_json(path: Path) -> dict:
    """JSON as a strict reader sees it: NaN / Infinity tokens refused."""
    def refuse(token):
        raise ValueError(f"{path} holds the non-JSON token {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file of RUN_DIR (adapter included) by relative path."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def leftovers(run_dir: Path) -> list[str]:
    """Hidden staging/aside/journal/temporary names inside RUN_DIR, and the lock beside it."""
    inside = [p.name for p in run_dir.iterdir() if p.name.startswith(".")]
    return inside + [p.name for p in run_dir.parent.glob(f".{run_dir.name}.lock")]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> Path:
    if not MODEL.exists() or not TEXT.exists():
        pytest.skip(f"{MODEL} or {TEXT} is absent (../shared beside the checkout holds the test data/models)")
    out = tmp_path_factory.mktemp("reliability") / "w4"
    result = run_cli("recipe=gptq_w4", *QUANTIZE, f"output_dir={out}", env={"FABRICQ_CACHE": str(out.parent / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture
def run_dir(quantized, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(quantized, copy)
    return copy


@pytest.fixture
def recovered(quantized, tmp_path_factory) -> Path:
    """A copy of the run with a finished rank-4 recovery (the 'old adapter'), made once per module."""
    cached = quantized.parent / "recovered"
    if not cached.exists():
        staging = quantized.parent / "recovered-tmp"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(quantized, staging)
        result = recover(staging, "+recovery=lora", "recovery.steps=2", "eval.enabled=false", *RECOVER,
                         "recovery.rank=4")
        assert result.returncode == 0, result.stderr[-3000:]
        staging.rename(cached)
    copy = tmp_path_factory.mktemp("recovered") / "run"
    shutil.copytree(cached, copy)
    return copy


# ---------------------------------------------------------------------------------------------
# 1. Nothing non-finite is published; report.json is strict JSON
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [["recovery.lr=1e30"], ["recovery.alpha=1e30", "eval.enabled=false"]])
def test_a_diverged_adapter_is_never_published(recovered, bad):
    before = snapshot(recovered)
    result = recover(recovered, "+recovery=lora", "recovery.steps=1", *RECOVER, *bad)
    line = error_line(result)
    assert "recovery diverged" in line and "nothing was published" in line, line
    assert "recovery.lr" in line and "recovery.alpha" in line, line
    assert snapshot(recovered) == before  # the old adapter and the report untouched
    assert leftovers(recovered) == []


def test_report_json_is_strict(run_dir):
    """A report an earlier release wrote with a bare NaN: the recovery rewrites it as strict JSON,
    the figure null with a reason beside it."""
    text = (run_dir / "report.json").read_text()
    report = json.loads(text)
    report["kl_after_lower_bound"] = float("nan")
    report["timings"]["broken_s"] = float("inf")
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    result = recover(run_dir, "+recovery=eora", *RECOVER)
    assert result.returncode == 0, result.stderr[-3000:]
    written = strict_json(run_dir / "report.json")
    assert written["kl_after_lower_bound"] is None and written["kl_after_lower_bound_reason"] == "not finite: NaN"
    assert written["timings"]["broken_s"] is None and "Infinity" in written["timings"]["broken_s_reason"]
    assert written["recovery"]["kl_after_recovery"] > 0


# ---------------------------------------------------------------------------------------------
# 2. One recovery of an output at a time
# ---------------------------------------------------------------------------------------------


def test_two_recoveries_of_one_output_never_run_at_once(run_dir):
    if not LONG_TEXT.exists():
        pytest.skip(f"{LONG_TEXT} is absent")
    lock = run_dir.parent / ".run.lock"
    long_run = [sys.executable, "-m", "fabricq.recover", str(run_dir), "+recovery=lora", "recovery.steps=3000",
                "recovery.checkpoint_every=1000", "eval.enabled=false", f"recovery.data.path={LONG_TEXT}", *RECOVER]
    env = {**os.environ, **ENV, "FABRICQ_CACHE": str(run_dir.parent / "cache")}
    with subprocess.Popen(long_run, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as first:
        try:
            deadline = time.monotonic() + 120
            while first.poll() is None and time.monotonic() < deadline:
                if lock.exists() and f"pid {first.pid} " in lock.read_text():
                    break
                time.sleep(0.05)
            assert first.poll() is None, "the first recovery ended before the second started"
            second = recover(run_dir, "+recovery=lora", "recovery.steps=2", "eval.enabled=false", *RECOVER)
            assert first.poll() is None, "the first recovery ended before the second was refused"
        finally:
            first.send_signal(signal.SIGKILL)
    line = error_line(second)
    assert f"pid {first.pid}" in line and "is writing" in line, line
    assert not (run_dir / "adapter").exists()
    # The killed holder left its lock file naming a dead process: the next recovery takes it over.
    assert lock.exists() and f"pid {first.pid} " in lock.read_text()
    third = recover(run_dir, "+recovery=eora", *RECOVER, "eval.enabled=false")
    assert third.returncode == 0, third.stderr[-3000:]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert leftovers(run_dir) == []


# ---------------------------------------------------------------------------------------------
# 3. A killed recovery never resumes onto another base
# ---------------------------------------------------------------------------------------------


def test_killed_recovery_does_not_resume_onto_a_requantized_base(run_dir):
    """W4 recovery killed after its first checkpoint; W3 written into the same output with
    overwrite=true; the recovery again: resume=true refuses (naming the base, offering
    resume=false), resume=auto starts over with a warning instead of continuing W4 training."""
    args = ["+recovery=lora", "recovery.steps=18", "recovery.checkpoint_every=3", "eval.enabled=false", *RECOVER]
    checkpoints = run_dir.parent / ".run.recovery" / "checkpoints"
    command = [sys.executable, "-m", "fabricq.recover", str(run_dir), *args]
    with subprocess.Popen(command, cwd=REPO_ROOT, env={**os.environ, **ENV}, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL) as proc:
        deadline = time.monotonic() + 120
        while not list(checkpoints.glob("step-*.pt")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, "the recovery finished before it could be killed"

    requantized = run_cli("recipe=gptq_w3", *QUANTIZE, f"output_dir={run_dir}", "overwrite=true",
                          env={"FABRICQ_CACHE": str(run_dir.parent / "cache")})
    assert requantized.returncode == 0, requantized.stderr[-3000:]
    assert json.loads((run_dir / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"][
        "weights"]["num_bits"] == 3

    line = error_line(recover(run_dir, *args, "resume=true"))
    assert "another quantized base" in line and "resume=false" in line, line
    assert list(checkpoints.glob("step-*.pt")), "a refused resume must not discard the work folder"

    result = recover(run_dir, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Starting the recovery over" in result.stdout and "another quantized base" in result.stdout
    assert "Recovery resumes" not in result.stdout
    section = json.loads((run_dir / "report.json").read_text())["recovery"]
    assert section["resumed_from_step"] is None and section["steps"] == 18


def test_work_identity_covers_teacher_text_and_settings(quantized, tmp_path):
    """Unit: each input the intermediate state depends on changes the identity."""
    from dataclasses import replace

    import torch

    from fabricq.models import ModelSource
    from fabricq.recovery.settings import RecoveryPlan, TrainSettings
    from fabricq.recovery.work import changed_parts, recovery_identity

    plan = RecoveryPlan(method="lora", rank=8, alpha=16.0, dropout=0.0, target_modules=None, init="eora",
                        train=TrainSettings(steps=4), seq_len=32, top_k=16, eora_samples=4, damp=0.01, data_path=None)
    windows = torch.arange(64).reshape(2, 32)
    teacher = ModelSource(MODEL)
    base = recovery_identity(quantized, teacher, windows, plan, ["a"], 1, "auto")
    other_teacher = tmp_path / "teacher"
    shutil.copytree(MODEL, other_teacher)
    (other_teacher / "config.json").write_text((MODEL / "config.json").read_text() + " ")
    assert changed_parts(base, recovery_identity(quantized, ModelSource(other_teacher), windows, plan, ["a"], 1,
                                                 "auto")) == ["teacher"]
    assert changed_parts(base, recovery_identity(quantized, teacher, windows + 1, plan, ["a"], 1, "auto")) == ["data"]
    for changed in (replace(plan, rank=4), replace(plan, train=replace(plan.train, lr=1e-3)), replace(plan, init="zeros")):
        assert changed_parts(base, recovery_identity(quantized, teacher, windows, changed, ["a"], 1, "auto")) == ["settings"]
    assert changed_parts(base, recovery_identity(quantized, teacher, windows, plan, ["a"], 2, "auto")) == ["settings"]
    # Not part of it: how often checkpoints and log lines are written, and the merge after training.
    same = replace(plan, merge=True, train=replace(plan.train, checkpoint_every=1, log_every=1))
    assert changed_parts(base, recovery_identity(quantized, teacher, windows, same, ["a"], 1, "auto")) == []


# ---------------------------------------------------------------------------------------------
# 4. Weak spots
# ---------------------------------------------------------------------------------------------


def test_corrupt_run_config_is_one_line(run_dir):
    (run_dir / "fabricq_config.yaml").write_text("model:\n  path: [unclosed\n  dtype: : :\n\tdata: {\n")
    line = error_line(recover(run_dir, "+recovery=lora", *RECOVER))
    assert "fabricq_config.yaml does not parse" in line, line


def test_missing_recovery_text_names_its_setting(run_dir, tmp_path):
    line = error_line(recover(run_dir, "+recovery=lora", *RECOVER, f"recovery.data.path={tmp_path / 'missing.txt'}"))
    assert "recovery.data.path" in line and "does not exist" in line and "too short" not in line, line
    # FABRICQ_DEBUG=1: the same error with its traceback.
    debug = recover(run_dir, "+recovery=lora", *RECOVER, f"recovery.data.path={tmp_path / 'missing.txt'}",
                    env={"FABRICQ_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "recovery.data.path" in debug.stderr


def test_main_command_refuses_a_bad_recovery_rank_before_quantizing(tmp_path):
    if not MODEL.exists():
        pytest.skip(f"{MODEL} is absent")
    out = tmp_path / "w4"
    result = run_cli("recipe=gptq_w4", *QUANTIZE, f"output_dir={out}", "+recovery=lora", "recovery.rank=33")
    line = error_line(result)
    assert "recovery.rank=33 is larger than" in line and "width 32" in line, line
    assert result.stderr.count("recovery.rank=33") == 1
    assert "Perplexity before" not in result.stderr + result.stdout  # refused before the first forward pass
    assert "Loading weights" not in result.stderr  # and before the model's weights were read
    assert not out.exists() and not (tmp_path / ".w4.work").exists()


def _patched_publish_kill(step: str) -> str:
    """Python that SIGKILLs the recovery at `step` of its publish."""
    if step == "before-commit":  # the folders swapped, report.json not yet written
        return ("import fabricq.recovery.publish as p\n"
                "p.RecoveryClaim._commit = lambda self, report: os.kill(os.getpid(), signal.SIGKILL)\n")
    # Without renameat2: killed between moving the old adapter aside and renaming the new one in.
    return ("import fabricq.recovery.publish as p\n"
            "p.exchange = lambda a, b: False\n"
            "real = os.replace\n"
            "def replace(src, dst):\n"
            "    if '.partial-' in str(src) and str(dst).endswith('adapter'):\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return real(src, dst)\n"
            "os.replace = replace\n")


@pytest.mark.parametrize("step", ["before-commit", "after-aside"])
def test_adapter_swap_survives_a_kill(recovered, step):
    old = snapshot(recovered)
    killed = recover(recovered, "+recovery=lora", "recovery.steps=2", "eval.enabled=false", *RECOVER,
                     patch=_patched_publish_kill(step))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (recovered / "report.json").read_bytes() == old["report.json"]
    weights = "adapter/adapter_model.safetensors"
    if step == "before-commit":  # renameat2 swapped in one step: the adapter folder never went missing
        assert (recovered / weights).is_file()
    else:  # the old adapter waits beside it, not lost
        assert not (recovered / "adapter").exists()
        aside = [p for p in recovered.glob(".adapter.old-*")]
        assert len(aside) == 1 and (aside[0] / "adapter_model.safetensors").read_bytes() == old[weights]
    assert any(p.name.startswith(".") for p in recovered.iterdir())  # staging / journal left by the kill

    # The next recovery repairs first (here one that then diverges: nothing of its own is published).
    again = recover(recovered, "+recovery=lora", "recovery.steps=1", *RECOVER, "recovery.lr=1e30",
                    "eval.enabled=false")
    assert "recovery diverged" in error_line(again)
    assert leftovers(recovered) == []
    report = strict_json(recovered / "report.json")
    config = json.loads((recovered / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == report["recovery"]["rank"]  # report.json describes the adapter that is there
    if step == "before-commit":  # every folder was in place: the publish is finished (the rank-8 adapter)
        assert config["r"] == 8 and "Finished the publish" in again.stdout
    else:  # undone: the rank-4 adapter and its report, byte for byte
        assert snapshot(recovered) == old and "Undid the unfinished publish" in again.stdout


def test_adapter_files_follow_the_umask(run_dir):
    result = recover(run_dir, "+recovery=eora", *RECOVER, "eval.enabled=false", umask=0o027)
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = run_dir / "adapter"
    assert adapter.stat().st_mode & 0o777 == 0o750
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (adapter / name).stat().st_mode & 0o777 == 0o640, name
    assert (run_dir / "report.json").stat().st_mode & 0o777 == 0o640


def _immutable(path: Path, on: bool) -> bool:
    """chattr +i / -i: a folder even root cannot create files in (EPERM), where the file system
    supports it."""
    done = subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True)
    return done.returncode == 0


@pytest.mark.parametrize("where", ["parent", "run_dir"])
def test_unwritable_output_is_one_line(run_dir, where):
    """The tests run as root, which ignores permission bits: the folder is made immutable
    (chattr +i), which refuses root too with a real PermissionError (EPERM). Skipped where
    chattr is unavailable or the file system has no such attribute."""
    folder = run_dir.parent if where == "parent" else run_dir
    if shutil.which("chattr") is None or not _immutable(folder, True):
        pytest.skip("chattr +i is not available here")
    try:
        result = recover(run_dir, "+recovery=eora", *RECOVER, "eval.enabled=false")
    finally:
        assert _immutable(folder, False)
    line = error_line(result)
    assert "operation not permitted" in line.lower(), line
    assert (f".{run_dir.name}.lock" if where == "parent" else "adapter") in line, line
    assert not (run_dir / "adapter").exists()


# ---------------------------------------------------------------------------------------------
# 5. Hostile inputs that were BAD (benchmarks/results/2026-12-08-hostile-recover.md)
# ---------------------------------------------------------------------------------------------


def _flip_a_tensor_byte(path: Path) -> None:
    """One bit of the first tensor's data inside a torch.save archive (not its zip structure)."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data = bytearray(path.read_bytes())
    data[start + info.file_size // 2] ^= 0x40
    path.write_bytes(data)


def test_damaged_checkpoint_is_refused_and_other_settings_start_over(run_dir):
    """A bit flip in the kept checkpoint: refused (named, resume=false offered) where it used to be
    resumed silently. A rerun with another rank: starts over, where loading the rank-8 state
    into rank-4 adapters raised a RuntimeError traceback."""
    diverging = ["+recovery=lora", "recovery.steps=3", "recovery.checkpoint_every=1", "eval.enabled=false", *RECOVER,
                 "recovery.lr=1e30", "recovery.max_grad_norm=null"]
    assert "recovery diverged" in error_line(recover(run_dir, *diverging))
    kept = sorted((run_dir.parent / ".run.recovery" / "checkpoints").glob("step-*.pt"))
    assert len(kept) == 1 and Path(f"{kept[0]}.sha256").is_file()
    _flip_a_tensor_byte(kept[0])
    line = error_line(recover(run_dir, *diverging))
    assert "is damaged" in line and kept[0].name in line and "resume=false" in line, line

    other = recover(run_dir, "+recovery=lora", "recovery.steps=2", "eval.enabled=false", *RECOVER, "recovery.rank=4")
    assert other.returncode == 0, other.stderr[-3000:]
    assert "Starting the recovery over" in other.stdout and "recovery.rank: 8 → 4" in other.stdout


@pytest.mark.parametrize("damage,message", [
    ("report-list", "report.json is not a JSON object"),
    ("groups-list", "config_groups is not a JSON object"),
    ("config-model-int", "no model and data sections"),
])
def test_wrong_json_types_in_run_dir_are_one_line(run_dir, damage, message):
    if damage == "report-list":
        (run_dir / "report.json").write_text("[]")
    elif damage == "groups-list":
        config = json.loads((run_dir / "config.json").read_text())
        config["quantization_config"]["config_groups"] = [1]
        (run_dir / "config.json").write_text(json.dumps(config))
    else:
        (run_dir / "fabricq_config.yaml").write_text("model: 5\ndata: 3\n")
    line = error_line(recover(run_dir, "+recovery=lora", *RECOVER))
    assert message in line, line
    assert not (run_dir.parent / ".run.recovery").exists()


def test_a_file_named_adapter_is_replaced_and_nothing_left_behind(run_dir):
    (run_dir / "adapter").write_text("not an adapter")
    result = recover(run_dir, "+recovery=eora", *RECOVER, "eval.enabled=false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert leftovers(run_dir) == []


def test_a_single_document_recovery_text_is_used_whole(run_dir):
    """WikiText-2 raw has no empty line: one document. As recovery.data.path it was refused
    ('need at least 2 documents to hold one out'): a text of its own needs no held-out part."""
    if not LONG_TEXT.exists():
        pytest.skip(f"{LONG_TEXT} is absent")
    result = recover(run_dir, "+recovery=lora", "recovery.steps=2", "eval.enabled=false", *RECOVER,
                     f"recovery.data.path={LONG_TEXT}")
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_lock_is_the_folders_whatever_the_spelling(run_dir):
    """RUN_DIR through a symbolic link takes the lock of the folder it names (it took
    `.link.lock`, so two recoveries of one folder could run at once). The holder here is a plain
    process holding the lock file the way fabricq.output.OutputClaim does."""
    link = run_dir.parent / "link"
    link.symlink_to(run_dir)
    holder_code = ("import fcntl, os, sys, time\n"
                   f"fd = os.open({str(run_dir.parent / '.run.lock')!r}, os.O_RDWR | os.O_CREAT, 0o666)\n"
                   "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                   "os.write(fd, f'pid {os.getpid()} on test'.encode())\n"
                   "print('locked', flush=True)\n"
                   "time.sleep(120)\n")
    with subprocess.Popen([sys.executable, "-c", holder_code], stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout.readline().strip() == "locked"
            line = error_line(recover(link, "+recovery=eora", *RECOVER, "eval.enabled=false"))
        finally:
            holder.kill()
    assert f"pid {holder.pid} on test" in line and str(run_dir) in line, line
    assert not (run_dir.parent / ".link.lock").exists() and not (run_dir.parent / ".link.recovery").exists()


def test_help_and_unknown_options():
    shown = subprocess.run([sys.executable, "-m", "fabricq.recover", "--help"], cwd=REPO_ROOT, capture_output=True,
                           text=True, env={**os.environ, **ENV})
    assert shown.returncode == 0 and shown.stdout.startswith("usage: python -m fabricq.recover RUN_DIR")
    line = error_line(subprocess.run([sys.executable, "-m", "fabricq.recover", "somewhere", "--force"], cwd=REPO_ROOT,
                                     capture_output=True, text=True, env={**os.environ, **ENV}))
    assert "unknown option --force" in line, line


def test_ctrl_c_is_one_line_and_releases_the_lock(run_dir):
    if not LONG_TEXT.exists():
        pytest.skip(f"{LONG_TEXT} is absent")
    lock = run_dir.parent / ".run.lock"
    command = [sys.executable, "-m", "fabricq.recover", str(run_dir), "+recovery=lora", "recovery.steps=3000",
               "eval.enabled=false", f"recovery.data.path={LONG_TEXT}", *RECOVER]
    with subprocess.Popen(command, cwd=REPO_ROOT, env={**os.environ, **ENV}, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True) as proc:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if lock.exists() and f"pid {proc.pid} " in lock.read_text():
                break
            time.sleep(0.05)
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("fabricq: error: interrupted"), err[-500:]
    assert not lock.exists() and not (run_dir / "adapter").exists() and leftovers(run_dir) == []
