"""The output directory on its own (no model): inputs never inside or around it, the lock, the
publish swap under failures and kills, cleanup after crashes and failures, permissions."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from fabricq import output
from fabricq.errors import FabricqError
from fabricq.output import OutputClaim, check_inputs_outside, launch_rank, releases_output_claims


def make_tree(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def tree(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


def hidden_beside(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


# -- inputs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("where, relation", [("model", "is"), (".", "contains"), ("model/quantized", "lies inside")])
def test_output_that_is_contains_or_lies_inside_an_input_is_refused(tmp_path, where, relation, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)  # the current directory is outside every case
    model = make_tree(tmp_path / "model", {"config.json": "{}"})
    with pytest.raises(FabricqError, match=f"output_dir .* {relation} model.path .*even with overwrite=true"):
        check_inputs_outside(tmp_path / where, {"model.path": model, "data.path": None})


def test_symlinks_are_followed_both_ways(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)
    model = make_tree(tmp_path / "real" / "model", {"config.json": "{}"})
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(FabricqError, match="contains data.path"):
        check_inputs_outside(tmp_path / "link", {"data.path": model / "config.json"})
    with pytest.raises(FabricqError, match="is model.path"):
        check_inputs_outside(model, {"model.path": tmp_path / "link" / "model"})
    check_inputs_outside(tmp_path / "out", {"model.path": tmp_path / "link" / "model"})  # a sibling is fine


def test_current_directory_is_never_an_output(tmp_path, monkeypatch):
    monkeypatch.chdir(make_tree(tmp_path / "work", {}))
    for path in (Path("."), tmp_path):
        with pytest.raises(FabricqError, match="is or contains the current directory"):
            check_inputs_outside(path, {})


def test_launch_rank_from_each_launcher():
    assert launch_rank(2, {}) == 0
    assert launch_rank(2, {"LOCAL_RANK": "1"}) == 1  # a rank Fabric started
    assert launch_rank(4, {"NODE_RANK": "1", "LOCAL_RANK": "2"}) == 6
    assert launch_rank(4, {"RANK": "3", "LOCAL_RANK": "0"}) == 3  # torchrun
    assert launch_rank(4, {"SLURM_PROCID": "5"}) == 5


# -- lock ------------------------------------------------------------------------------------------

HOLDER = """
import sys
from pathlib import Path
from fabricq.output import OutputClaim
claim = OutputClaim(Path(sys.argv[1]), False, writer=True)
claim.acquire()
print("locked", flush=True)
sys.stdin.read()
claim.release()
"""


def test_a_second_claim_is_refused_while_another_process_holds_the_lock(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=REPO_ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FabricqError, match=rf"another fabricq run \(pid {holder.pid} on .*\) is writing output_dir {out}"):
            OutputClaim(out, True, writer=True).acquire()
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0
    assert hidden_beside(out) == []  # the lock file went with the run
    claim = OutputClaim(out, False, writer=True)
    claim.acquire()
    with pytest.raises(FabricqError, match="another fabricq run"):  # also within one process
        OutputClaim(out, False, writer=True).acquire()
    claim.release()


def test_publish_checks_the_overwrite_rule_again(tmp_path):
    out = tmp_path / "out"
    claim = OutputClaim(out, False, writer=True)
    claim.acquire()
    staging = claim.new_staging()
    (staging / "model.safetensors").write_text("new")
    make_tree(out, {"theirs.txt": "written by something else meanwhile"})
    with pytest.raises(FabricqError, match="exists and is not empty.*filled while this run worked.*resumes"):
        claim.publish(staging)
    assert tree(out) == {"theirs.txt": "written by something else meanwhile"}
    claim.release(failed=True)
    assert hidden_beside(out) == []


# -- publish ---------------------------------------------------------------------------------------


def test_publish_swaps_old_for_new(tmp_path):
    out = make_tree(tmp_path / "out", {"old.txt": "old"})
    claim = OutputClaim(out, True, writer=True)
    claim.acquire()
    staging = claim.new_staging()
    (staging / "new.txt").write_text("new")
    claim.publish(staging)
    claim.release()
    assert tree(out) == {"new.txt": "new"}
    assert hidden_beside(out) == []


def test_a_failing_rename_in_publish_keeps_the_old_output(tmp_path, monkeypatch):
    """The second rename (staging → output) fails: the old output is moved back, complete."""
    out = make_tree(tmp_path / "out", {"a.txt": "old a", "b.txt": "old b"})
    claim = OutputClaim(out, True, writer=True)
    claim.acquire()
    staging = claim.new_staging()
    (staging / "new.txt").write_text("new")
    calls = []
    real_replace = os.replace

    def replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:
            raise OSError(errno.EIO, "simulated failure")
        return real_replace(src, dst)

    monkeypatch.setattr(output.os, "replace", replace)
    with pytest.raises(OSError, match="simulated failure"):
        claim.publish(staging)
    monkeypatch.setattr(output.os, "replace", real_replace)
    assert calls[0] == ("out", f".out.old-{os.getpid()}")  # the old output was moved aside, not deleted
    assert tree(out) == {"a.txt": "old a", "b.txt": "old b"}
    claim.release(failed=True)
    assert hidden_beside(out) == []  # the failed run's staging folder is gone too


KILLER = """
import os, signal, sys
from pathlib import Path
from fabricq import output
out, kill_after = Path(sys.argv[1]), int(sys.argv[2])
claim = output.OutputClaim(out, True, writer=True)
claim.acquire()
staging = claim.new_staging()
for i in range(3):
    (staging / f"new{i}.txt").write_text(f"new {i}")
real_replace, calls = os.replace, []
def replace(src, dst):
    real_replace(src, dst)
    calls.append(dst)
    if len(calls) == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
output.os.replace = replace
real_remove = output._remove
def remove(path):  # killed halfway through deleting the old output
    if kill_after == 3 and ".old-" in path.name and path.exists():
        next(path.iterdir()).unlink()
        os.kill(os.getpid(), signal.SIGKILL)
    real_remove(path)
output._remove = remove
claim.publish(staging)
"""


@pytest.mark.parametrize("kill_after", [1, 2, 3])
def test_a_kill_inside_publish_leaves_one_complete_output(tmp_path, kill_after):
    """SIGKILL after the old output was moved aside (1), after the new one was renamed in (2),
    or halfway through deleting the old one (3). The next claim on the output finds one complete
    output in place: the old one put back, or the new one; and no hidden leftovers."""
    old = {"old0.txt": "old 0", "old1.txt": "old 1"}
    new = {f"new{i}.txt": f"new {i}" for i in range(3)}
    out = make_tree(tmp_path / "out", old)
    proc = subprocess.run([sys.executable, "-c", KILLER, str(out), str(kill_after)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    if kill_after == 1:
        assert not out.exists()  # between the renames: old aside, new staged, both complete
        assert tree(out.parent / f".out.old-{_pid_of(out, 'old')}") == old
        assert tree(out.parent / f".out.partial-{_pid_of(out, 'partial')}") == new
    else:
        assert tree(out) == new
    claim = OutputClaim(out, True, writer=True)
    claim.acquire()
    assert tree(out) == (old if kill_after == 1 else new)
    claim.release()
    assert hidden_beside(out) == []


def _pid_of(out: Path, kind: str) -> str:
    (match,) = out.parent.glob(f".{out.name}.{kind}-*")
    return match.name.rsplit("-", 1)[1]


def test_stale_staging_of_dead_processes_is_removed_live_ones_kept(tmp_path):
    out = tmp_path / "out"
    dead, live = dead_pid(), os.getppid()
    make_tree(tmp_path / f".out.partial-{dead}", {"model.safetensors": "half written"})
    make_tree(tmp_path / f".out.partial-{live}", {"model.safetensors": "being written"})
    claim = OutputClaim(out, False, writer=True)
    claim.acquire()
    assert hidden_beside(out) == [".out.lock", f".out.partial-{live}"]
    claim.release()


# -- failures --------------------------------------------------------------------------------------


class Config:
    def __init__(self, overwrite=False):
        self.overwrite = overwrite
        self.data = type("D", (), {"path": None})()
        self.eval = type("E", (), {"path": None})()
        self.trainer = type("T", (), {"devices": 1})()


class Source:
    folder = Path("/nonexistent-model")
    gguf_file = None


@pytest.mark.parametrize("committed", [False, True])
def test_a_failed_run_leaves_nothing_it_created_but_committed_layers(tmp_path, committed):
    out = tmp_path / "new" / "nested" / "out"

    @releases_output_claims
    def failing_run():
        claim = output.claim_output(out, Config(), Source())
        (claim.new_staging() / "model.safetensors").write_text("partial")
        claim.work_dir.mkdir()
        (claim.work_dir / "spill").mkdir()
        if committed:
            (claim.work_dir / "run.json").write_text("{}")
        raise RuntimeError("failed before calibration")

    with pytest.raises(RuntimeError, match="failed before calibration"):
        failing_run()
    if committed:  # resumable: the work directory and the folders holding it stay
        assert sorted(p.name for p in out.parent.iterdir()) == [".out.work"]
    else:
        assert list(tmp_path.iterdir()) == []


def test_unwritable_output_location_names_output_dir(tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    out = tmp_path / "file" / "out"
    with pytest.raises(FabricqError, match=f"output_dir {out} cannot be written: Not a directory"):
        OutputClaim(out, False, writer=True).acquire()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent_names_output_dir(tmp_path):
    parent = make_tree(tmp_path / "ro", {})
    parent.chmod(0o555)
    try:
        with pytest.raises(FabricqError, match=f"output_dir {parent / 'out'} cannot be written: Permission denied"):
            OutputClaim(parent / "out", False, writer=True).acquire()
    finally:
        parent.chmod(0o755)


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),  # safetensors
])
def test_a_full_disk_is_one_line_saying_what_to_do(tmp_path, error):
    @releases_output_claims
    def failing_run():
        output.claim_output(tmp_path / "out", Config(), Source())
        raise error

    with pytest.raises(FabricqError, match="no space left on device.*: free space and rerun: the run resumes"):
        failing_run()
    assert list(tmp_path.iterdir()) == []


# -- permissions -----------------------------------------------------------------------------------


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_apply_umask_gives_the_mode_open_would(tmp_path, umask, file_mode, dir_mode):
    from safetensors.torch import save_file
    import torch

    old = os.umask(umask)
    try:
        assert output.current_umask() == umask
        save_file({"a": torch.zeros(2)}, tmp_path / "x.safetensors")
        assert (tmp_path / "x.safetensors").stat().st_mode & 0o777 == 0o600  # why apply_umask exists
        folder = tmp_path / "d"
        folder.mkdir(mode=0o700)
        for path in (tmp_path / "x.safetensors", folder):
            output.apply_umask(path)
    finally:
        os.umask(old)
    assert (tmp_path / "x.safetensors").stat().st_mode & 0o777 == file_mode
    assert folder.stat().st_mode & 0o777 == dir_mode
