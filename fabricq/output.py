"""The output directory: where a run may write, who writes there, and how a result appears.

A run that writes `<parent>/<name>` keeps these beside it (hidden names: never a finished output):

    .<name>.lock             flock held by the writing process (rank 0) for the run's lifetime
    .<name>.partial-<pid>    the staging folder the export writes into
    .<name>.old-<pid>        an old output, moved aside while the new one is renamed in
    .<name>.work/            the resume work directory (fabricq.resume)

Publishing swaps instead of deleting first: old output aside → staging renamed in → old removed.
A crash between the renames leaves the old output in `.<name>.old-<pid>`; the next run on the
same output_dir (under the lock) moves it back before anything else, and removes the staging
folders of dead processes.
"""

from __future__ import annotations

import contextvars
import errno
import functools
import logging
import os
import shutil
import socket
from pathlib import Path

from fabricq.errors import FabricqError

log = logging.getLogger("fabricq")

_claims: contextvars.ContextVar[list | None] = contextvars.ContextVar("fabricq_output_claims", default=None)


# ---------------------------------------------------------------------------------------------
# Permissions
# ---------------------------------------------------------------------------------------------


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask can only be
    read by setting it, which races with other threads creating files)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give `path` the mode a plain `open()`/`mkdir()` would: some writers (safetensors, tempfile)
    create files 0600 and rename them into place, which a serving process under another user
    cannot read."""
    mode = (0o777 if Path(path).is_dir() else 0o666) & ~current_umask()
    os.chmod(path, mode)


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def check_output_dir(path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise FabricqError(f"output_dir is a file, not a directory: {path}")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FabricqError(
            f"output_dir {path} exists and is not empty: choose another directory or pass overwrite=true"
        )


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_inputs_outside(output_dir: Path, inputs: dict[str, Path | None], *, name: str = "output_dir",
                         overwrite: str = "overwrite=true") -> None:
    """output_dir may not equal, contain or lie inside an input (symlinks followed), nor contain
    the current or home directory: publishing replaces output_dir as a whole. `name` and
    `overwrite`: how the command calling it spells its output and its overwrite switch."""
    out = Path(output_dir).expanduser().resolve()
    for field, path in inputs.items():
        if path is None:
            continue
        source = Path(path).expanduser().resolve()
        if _within(source, out) or _within(out, source):
            relation = "is" if out == source else ("contains" if _within(source, out) else "lies inside")
            raise FabricqError(
                f"{name} {output_dir} {relation} {field} ({source}): fabricq never writes over its "
                f"inputs, even with {overwrite}; choose {'an' if name[0] in 'aeiou' else 'a'} {name} outside them"
            )
    for what, path in (("the current directory", Path.cwd()), ("the home directory", Path.home())):
        if _within(path.resolve(), out):
            raise FabricqError(
                f"{name} {output_dir} is or contains {what} ({path}): choose a directory of its own"
            )


def run_inputs(cfg, source) -> dict[str, Path | None]:
    """The files and folders a run reads, by config field (`source`: the resolved model)."""
    from fabricq.cachedir import default_model_cache

    inputs: dict[str, Path | None] = {"model.path": source.folder}
    if source.gguf_file:  # the default model is read from its package and a converted copy
        inputs["the converted default model"] = default_model_cache()
    inputs["data.path"] = None if cfg.data.path is None else Path(cfg.data.path)
    inputs["eval.path"] = None if cfg.eval.path is None else Path(cfg.eval.path)
    return inputs


def launch_rank(devices_per_node: int, environ=os.environ) -> int:
    """This process's global rank as its launcher announced it, before Fabric starts (0 for a
    plain `python -m fabricq`, which launches the other ranks itself)."""
    for var in ("RANK", "SLURM_PROCID"):
        if environ.get(var, "").isdigit():
            return int(environ[var])
    node, local = environ.get("NODE_RANK", "0"), environ.get("LOCAL_RANK", "0")
    return int(node) * int(devices_per_node) + int(local) if node.isdigit() and local.isdigit() else 0


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (a lock or staging folder of a dead one is stale)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def out_of_space(err: BaseException) -> bool:
    """An error that says the disk is full: OSError ENOSPC/EDQUOT, or the same wrapped in a
    library's own error text (safetensors, torch.save)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text


# ---------------------------------------------------------------------------------------------
# The claim: lock, staging, publish, cleanup
# ---------------------------------------------------------------------------------------------


class OutputClaim:
    """This run's hold on `path`: the lock (rank 0 only), its staging folder, the publish swap,
    and the cleanup of everything it created when it fails."""

    def __init__(self, path: Path, overwrite: bool, writer: bool):
        self.path = Path(path)
        self.overwrite = overwrite
        self.writer = writer
        self.lock_path = self.path.parent / f".{self.path.name}.lock"
        self._fd: int | None = None
        self._created: list[Path] = []  # parent folders this run created (deepest last)
        self._staging: Path | None = None

    @property
    def work_dir(self) -> Path:
        return self.path.parent / f".{self.path.name}.work"

    def acquire(self) -> None:
        """Create the parent folders, take the lock, clean up after crashed runs."""
        missing = [p for p in [self.path.parent, *self.path.parent.parents] if not p.exists()]
        try:
            for folder in reversed(missing):
                folder.mkdir()
                self._created.append(folder)
            self._lock()
        except FabricqError:
            self.release(failed=True)
            raise
        except OSError as err:
            self.release(failed=True)
            raise FabricqError(f"output_dir {self.path} cannot be written: {err.strerror or err}") from None
        self._recover()

    def _lock(self) -> None:
        import fcntl

        # Retry when the file we locked was unlinked by a finishing run in between (its lock then
        # guards nothing): the lock counts only on the file that is at lock_path now.
        for _ in range(20):
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                os.close(fd)
                raise FabricqError(
                    f"another fabricq run{f' ({holder})' if holder else ''} is writing output_dir {self.path}: "
                    "wait for it to finish or choose another output_dir"
                ) from None
            try:
                here = os.stat(self.lock_path)
                mine = os.fstat(fd)
                current = (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)
            except FileNotFoundError:
                current = False
            if current:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
                self._fd = fd
                return
            os.close(fd)
        raise FabricqError(f"could not lock output_dir {self.path}: {self.lock_path} keeps being replaced")

    def _recover(self) -> None:
        """Under the lock: put back an old output a crashed publish moved aside, and remove the
        staging and aside folders of processes that no longer run."""
        parent, name = self.path.parent, self.path.name
        for aside in sorted(parent.glob(f".{name}.old-*")):
            pid = aside.name.rsplit("-", 1)[-1]
            if pid.isdigit() and pid_alive(int(pid)) and int(pid) != os.getpid():
                continue
            if not self.path.exists() and not self.path.is_symlink():
                os.replace(aside, self.path)
                log.warning("Restored %s: an interrupted run had moved it aside to %s", self.path, aside.name)
            else:
                _remove(aside)
        for staging in parent.glob(f".{name}.partial-*"):
            pid = staging.name.rsplit("-", 1)[-1]
            if pid.isdigit() and (not pid_alive(int(pid)) or int(pid) == os.getpid()):
                _remove(staging)

    def new_staging(self) -> Path:
        """An empty staging folder beside the output, removed if the run fails."""
        staging = self.path.parent / f".{self.path.name}.partial-{os.getpid()}"
        _remove(staging)
        self._staging = staging
        staging.mkdir(parents=True)
        return staging

    def publish(self, staging: Path) -> None:
        """Swap the finished `staging` folder in as the output. The overwrite rule is checked
        again: something else may have written into output_dir while this run worked."""
        final = self.path
        try:
            check_output_dir(final, self.overwrite)
        except FabricqError as err:
            raise FabricqError(
                f"{err} (it was filled while this run worked; its finished layers are kept, so a rerun resumes)"
            ) from None
        aside = None
        if final.exists() or final.is_symlink():
            aside = final.parent / f".{final.name}.old-{os.getpid()}"
            _remove(aside)
            os.replace(final, aside)
        try:
            os.replace(staging, final)
        except BaseException:
            if aside is not None:
                os.replace(aside, final)
            raise
        self._staging = None
        if aside is not None:
            _remove(aside)

    def release(self, failed: bool = False) -> None:
        """Drop the lock. After a failure also remove what this run created and cannot be resumed
        from: its staging folder, a work directory without a committed layer, new parent folders."""
        if failed:
            if self._staging is not None:
                _remove(self._staging)
                self._staging = None
            work = self.work_dir
            if self._fd is not None and work.is_dir() and not (work / "run.json").exists():
                _remove(work)
        if self._fd is not None:
            self.lock_path.unlink(missing_ok=True)  # still held: nobody can have locked it meanwhile
            os.close(self._fd)
            self._fd = None
        for folder in reversed(self._created):
            try:
                folder.rmdir()  # only if still empty
            except OSError:
                break
        self._created = []


def claim_output(output_dir: Path, cfg, source) -> OutputClaim:
    """Check output_dir against the run's inputs and the overwrite rule, and (rank 0) lock it.
    Released when the function decorated with `releases_output_claims` returns or raises."""
    check_inputs_outside(output_dir, run_inputs(cfg, source))
    if output_dir.is_symlink():  # publishing would replace the link, not the folder it names
        raise FabricqError(f"output_dir {output_dir} is a symbolic link (to {os.readlink(output_dir)}): pass the directory itself")
    check_output_dir(output_dir, cfg.overwrite)
    claim = OutputClaim(output_dir, cfg.overwrite, writer=launch_rank(cfg.trainer.devices) == 0)
    if claim.writer:
        claim.acquire()
        try:
            check_output_dir(output_dir, cfg.overwrite)  # again, under the lock
        except FabricqError:
            claim.release(failed=True)
            raise
    active = _claims.get()
    if active is not None:
        active.append(claim)
    return claim


def releases_output_claims(run):
    """Decorate a run: every claim it made is released when it ends; on failure, what it created
    is removed, and a full disk becomes one line saying what to do."""

    @functools.wraps(run)
    def wrapper(*args, **kwargs):
        claims: list[OutputClaim] = []
        token = _claims.set(claims)
        failed = True
        try:
            result = run(*args, **kwargs)
            failed = False
            return result
        except Exception as err:
            if out_of_space(err):
                where = f" writing {err.filename}" if getattr(err, "filename", None) else ""
                raise FabricqError(f"no space left on device{where}: free space and rerun: the run resumes "
                                   "from its last finished layer") from err
            raise
        finally:
            _claims.reset(token)
            for claim in claims:
                claim.release(failed=failed)

    return wrapper


# ---------------------------------------------------------------------------------------------
# Rules shared with the other commands and the resume setting
# ---------------------------------------------------------------------------------------------


def check_resume_has_output_dir(resume, output_dir: str | None, default_dir: Path) -> None:
    """resume=true without output_dir: the run would write a new timestamped folder (Hydra's
    outputs/DATE/TIME), which never holds a run to resume; unless `default_dir` (a fixed
    hydra.run.dir) does hold one."""
    if resume is not True or output_dir:
        return
    if (OutputClaim(default_dir, False, writer=False).work_dir / "run.json").is_file():
        return
    raise FabricqError(
        "resume=true needs an explicit output_dir: without one every run writes to a new timestamped folder, "
        "which has nothing to resume; pass the interrupted run's output_dir=... (or leave resume at auto)"
    )
