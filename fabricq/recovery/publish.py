"""Where a recovery writes, who writes there, and how its result appears.

The lock is the main command's (`fabricq.output.OutputClaim`, `<parent>/.<name>.lock`, held by
rank 0 for the whole recovery): two recoveries of one output, or a recovery and a quantization
into it, never run at once. A lock file left by a process that has died locks nothing (flock
goes with its holder) and is taken over. `python -m fabricq … +recovery=NAME` holds the lock while
its recovery runs in a child process: the child, started with FABRICQ_LOCK_HELD_BY=<parent pid>,
works under its parent's lock.

Inside RUN_DIR, while a recovery publishes (hidden names, never part of a finished output):

    .adapter.partial-<pid>/            the new adapter, complete before anything is swapped
    .merged.partial-<pid>/             the merged model (recovery.merge=true)
    .recovery-publish-<pid>.json       the journal: the new report and each staged folder's inode

Publishing: journal written → each staged folder swapped in (Linux renameat2 RENAME_EXCHANGE: the
old and new folder trade places in one step, so RUN_DIR/adapter is never missing; elsewhere the
old one goes aside to `.adapter.old-<pid>` first) → report.json replaced (the commit) → the old
folders and the journal removed. The next recovery of RUN_DIR (under the lock) finishes or undoes
a publish whose process died: every staged folder in place (by inode) → the journal's report is
written; otherwise each folder goes back to what it was. Staging folders of dead processes are
removed.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
from pathlib import Path

from fabricq import strict_json
from fabricq.errors import FabricqError
from fabricq.output import OutputClaim, apply_umask, pid_alive

log = logging.getLogger("fabricq")

LOCK_HELD_ENV = "FABRICQ_LOCK_HELD_BY"
REPORT = "report.json"
JOURNAL_PREFIX = ".recovery-publish-"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _pid_of(path: Path) -> int | None:
    tail = path.name.rsplit("-", 1)[-1].removesuffix(".json")
    return int(tail) if tail.isdigit() else None


def _dead(path: Path) -> bool:
    """A leftover of a process that no longer runs (or of this one)."""
    pid = _pid_of(path)
    return pid is not None and (pid == os.getpid() or not pid_alive(pid))


def _remove(path: Path) -> None:
    import shutil

    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _inode(path: Path) -> list[int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return [st.st_dev, st.st_ino]


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE). False where the
    system or file system cannot: the caller falls back to two renames."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def lock_holder(run_dir: Path) -> str | None:
    """What the lock file beside `run_dir` says about its holder ('pid N on HOST'), if anything."""
    try:
        text = (run_dir.parent / f".{run_dir.name}.lock").read_text(errors="replace").strip()
    except OSError:
        return None
    return text or None


def _holder_pid(holder: str | None) -> int | None:
    parts = (holder or "").split()
    return int(parts[1]) if len(parts) > 1 and parts[0] == "pid" and parts[1].isdigit() else None


class RecoveryClaim:
    """Rank 0's hold on RUN_DIR for one recovery: the lock, crash repair, staging, publishing."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._claim: OutputClaim | None = None
        self._staged: dict[str, Path] = {}

    # -- the lock ------------------------------------------------------------------------------

    def acquire(self) -> None:
        claim = OutputClaim(self.run_dir, overwrite=True, writer=True)
        try:
            claim.acquire()
        except FabricqError as err:
            holder = lock_holder(self.run_dir)
            if not str(err).startswith("another fabricq run"):
                raise FabricqError(f"RUN_DIR {self.run_dir} cannot be locked: {err}".replace(
                    f"output_dir {self.run_dir} cannot be written: ", "")
                    + f" (a recovery writes {claim.lock_path.name} and its work folder beside RUN_DIR)") from None
            pid = _holder_pid(holder)
            if pid is not None and pid == os.getppid() and os.environ.get(LOCK_HELD_ENV) == str(pid):
                log.debug("RUN_DIR %s is locked by the parent run (pid %d): recovering under its lock", self.run_dir, pid)
            else:
                raise FabricqError(
                    f"another fabricq run ({holder or 'pid unknown'}) is writing {self.run_dir}: wait for it to "
                    f"finish (a recovery or quantization of one output runs alone; the lock is {claim.lock_path})"
                ) from None
        else:
            self._claim = claim
        self.repair()

    def release(self) -> None:
        self.discard()
        if self._claim is not None:
            self._claim.release()
            self._claim = None

    # -- crash repair --------------------------------------------------------------------------

    def repair(self) -> None:
        """Finish or undo publishes of dead processes, then remove their staging folders."""
        for journal in sorted(self.run_dir.glob(f"{JOURNAL_PREFIX}*.json")):
            if _dead(journal):
                self._repair_publish(journal)
        for pattern in (".*.partial-*", ".*.old-*", ".*.tmp-*", f".{REPORT}.tmp"):
            for leftover in sorted(self.run_dir.glob(pattern)):
                if leftover.name != f".{REPORT}.tmp" and not _dead(leftover):  # (.report.json.tmp: earlier releases)
                    continue
                name = leftover.name[1:].split(".partial-")[0].split(".old-")[0]
                final = self.run_dir / name
                if ".old-" in leftover.name and not final.exists() and not final.is_symlink():
                    os.replace(leftover, final)
                    log.warning("Restored %s: an interrupted recovery had moved it aside", final)
                else:
                    _remove(leftover)
                    log.info("Removed %s, left by an interrupted recovery", leftover.name)

    def _repair_publish(self, journal: Path) -> None:
        pid = _pid_of(journal)
        try:
            plan = json.loads(journal.read_text())
            items, report = plan["items"], plan["report"]
        except (OSError, ValueError, KeyError, TypeError):  # torn before it was renamed in: nothing was swapped
            _remove(journal)
            return
        done = all(_inode(self.run_dir / name) == inode for name, inode in items.items())
        if done:
            strict_json.write_atomic(self.run_dir / REPORT, report, indent=2)
            for name in items:
                _remove(self.run_dir / f".{name}.partial-{pid}")  # after an exchange: the old folder
                _remove(self.run_dir / f".{name}.old-{pid}")
            log.warning("Finished the publish of an interrupted recovery (pid %s): %s and report.json agree", pid,
                        ", ".join(items))
        else:
            for name, inode in items.items():
                final, staging = self.run_dir / name, self.run_dir / f".{name}.partial-{pid}"
                aside = self.run_dir / f".{name}.old-{pid}"
                if _inode(final) == inode:  # swapped in: the old one is in staging (exchange) or aside
                    old = aside if aside.exists() else staging
                    if old.exists():
                        if not exchange(old, final):
                            _remove(final)
                            os.replace(old, final)
                    else:  # there was no old folder
                        _remove(final)
                elif not final.exists() and aside.exists():
                    os.replace(aside, final)
                _remove(staging)
                _remove(aside)
            log.warning("Undid the unfinished publish of an interrupted recovery (pid %s): %s as before", pid,
                        ", ".join(items))
        _remove(journal)

    # -- staging and publishing ----------------------------------------------------------------

    def staging(self, name: str) -> Path:
        """An empty folder RUN_DIR/.NAME.partial-<pid> for the new RUN_DIR/NAME."""
        path = self.run_dir / f".{name}.partial-{os.getpid()}"
        _remove(path)
        self._staged[name] = path
        return path

    def publish(self, report: dict) -> None:
        """Swap every staged folder in and commit `report` (see the module's docstring)."""
        pid = os.getpid()
        for folder in self._staged.values():  # safetensors writes 0600: a server under another user reads these
            for path in [folder, *folder.rglob("*")]:
                apply_umask(path)
        items = {name: _inode(path) for name, path in self._staged.items()}
        journal = self.run_dir / f"{JOURNAL_PREFIX}{pid}.json"
        strict_json.write_atomic(journal, {"items": items, "report": report})
        for name, staging in self._staged.items():
            final = self.run_dir / name
            if final.exists() or final.is_symlink():
                if not exchange(staging, final):
                    aside = self.run_dir / f".{name}.old-{pid}"
                    _remove(aside)
                    os.replace(final, aside)
                    os.replace(staging, final)
            else:
                os.replace(staging, final)
        self._commit(report)
        for name, staging in self._staged.items():
            _remove(staging)  # the old folder, after an exchange
            _remove(self.run_dir / f".{name}.old-{pid}")
        self._staged = {}
        _remove(journal)

    def _commit(self, report: dict) -> None:
        strict_json.write_atomic(self.run_dir / REPORT, report, indent=2)

    def discard(self) -> None:
        """Remove this process's staging folders (a failed recovery publishes nothing)."""
        for path in self._staged.values():
            _remove(path)
        self._staged = {}
