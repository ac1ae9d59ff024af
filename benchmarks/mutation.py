"""Mutation testing of one fabricq module with mutmut, in a scratch copy of the repository.

    pip install mutmut   # 3.x; a separate virtual environment with --system-site-packages keeps it apart
    python benchmarks/mutation.py fabricq/resume.py --tests "tests/test_resume.py -k round_trip" \
        --sample 80 --seed 0 --out benchmarks/results/mutation-resume.json
    # after-pass: only what that pass left alive, with the new tests selected too
    python benchmarks/mutation.py fabricq/resume.py --tests "tests/test_resume.py tests/test_mutants_resume.py \
        -k 'round_trip or test_mutants_resume'" --rerun benchmarks/results/mutation-resume.json --out ...

mutmut rewrites a package in place under `mutants/` and imports it from there, so this script
copies what the tests need into a scratch folder beside nothing of the checkout's: `fabricq/`,
`tests/`, `pyproject.toml`, and `conf/` as `fabricq/conf` (the package-dir mapping of the wheel,
which a plain folder on sys.path does not have) and as `conf/` (tests compose from the checkout's
conf/; mutmut copies it into `mutants/` with the tests). `../shared` is linked beside the copy and
inside it (mutmut runs the tests from `repo/mutants/`, whose parent is `repo/`) so the tests that
use the tiny model find it instead of skipping. Mutants run in forked children (torch imported once), each
against only the selected tests that reach the mutated function. `--sample N` runs a seeded
random N of the module's mutants; the JSON lists every result with mutmut's name, so
`mutmut show NAME` in the scratch folder prints a mutant's diff. `--rerun PREVIOUS` runs only the
mutants a previous pass did not kill (its JSON, or a `mutmut results --all true` listing): the
after-pass once tests were written against the survivors.

A mutant can stall its forked child for good (a blocking wait that the tests never release, or
a lock some thread held when the child was forked), and mutmut's own wall limit is 15 × the
estimated test time, which is half an hour for a module the slow tests reach. So mutmut runs
here inside a small bootstrap (`BOOTSTRAP`) that first pins torch to one thread (no OpenMP pool
alive in the parent when it forks), then gives every child `--mutant-timeout` seconds of wall
time at most: at the deadline the child's Python stacks go to `repo/hangs.log` in the scratch
folder, then SIGXCPU (mutmut's "timeout"), then SIGKILL; a child that needed the SIGKILL is
recorded as a timeout too. mutmut's score counts a timeout as killed, and so does `killed` here.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KILLED = ("killed", "timeout")

# Run as `python -c BOOTSTRAP run NAMES...` in the scratch copy; the environment carries the cap.
BOOTSTRAP = r"""
import faulthandler, os, signal, sys, threading, time
import torch
# One thread before any fork: a child forked while an OpenMP pool is alive can wait forever.
torch.set_num_threads(1)
torch.set_num_interop_threads(1)
from mutmut.workers import isolation

cap = float(os.environ["FABRICQ_MUTANT_TIMEOUT"])
hang_log = open("hangs.log", "a")
# Inherited by every forked child: SIGUSR1 writes all its threads' Python stacks, even when one
# of them holds the GIL in a blocking call.
faulthandler.register(signal.SIGUSR1, file=hang_log, all_threads=True)
hard_killed = set()


def watch(runner, pid, worker, seconds):
    time.sleep(seconds)

    def alive():  # still the same child (not reaped, pid not reused by a later one)
        return runner._running.get(pid) is worker

    if not alive():
        return
    try:
        wchan = open(f"/proc/{pid}/wchan").read()
    except OSError:
        wchan = "?"
    hang_log.write(f"\n=== {worker.mutant_name}: pid {pid} over {seconds:.0f} s, wchan {wchan}\n")
    hang_log.flush()
    for sig, grace in ((signal.SIGUSR1, 2), (signal.SIGXCPU, 10), (signal.SIGKILL, 0)):
        if not alive():
            return
        if sig == signal.SIGKILL:
            hard_killed.add(worker.mutant_name)
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        time.sleep(grace)


def submit(self, mutant_name, tests, cpu_time_limit, estimated_time):
    before = set(self._running)
    original_submit(self, mutant_name, tests, cpu_time_limit, estimated_time)
    for pid in set(self._running) - before:
        limit = min(cap, (estimated_time + isolation.config().timeout_constant) * isolation.config().timeout_multiplier)
        threading.Thread(target=watch, args=(self, pid, self._running[pid], limit), daemon=True).start()


def wait_for_result(self, timeout=None):
    result = original_wait(self, timeout)
    if result.mutant_name in hard_killed:
        result.exit_code = 36  # mutmut's "timeout"
    return result


original_submit, original_wait = isolation.ForkRunner.submit, isolation.ForkRunner.wait_for_result
isolation.ForkRunner.submit, isolation.ForkRunner.wait_for_result = submit, wait_for_result
isolation.register_timeout = lambda pid, timeout_s: None  # replaced by watch()
from mutmut.__main__ import cli

sys.argv = ["mutmut", *sys.argv[1:]]
cli()
"""


def scratch_copy(scratch: Path) -> Path:
    repo = scratch / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("fabricq", "tests"):
        shutil.copytree(REPO / name, repo / name, ignore=ignore)
    shutil.copytree(REPO / "conf", repo / "fabricq" / "conf", ignore=ignore)
    # Also at the top, as in the checkout: tests compose from REPO_ROOT/conf (tests/in_process.py).
    shutil.copytree(REPO / "conf", repo / "conf", ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", repo / "pyproject.toml")
    # mutmut runs the tests from repo/mutants/ (REPO_ROOT there), so ../shared is repo/shared;
    # scratch/shared serves the stats pass run from repo/.
    if (REPO.parent / "shared").exists():
        for shared in (scratch / "shared", repo / "shared"):
            if not shared.exists():
                shared.symlink_to(REPO.parent / "shared")
    return repo


def write_config(repo: Path, module: str, tests: list[str]) -> None:
    lines = ["[mutmut]", "source_paths = fabricq", f"only_mutate = {module}",
             "do_not_mutate = fabricq/conf/*",
             # into repo/mutants/, where the tests run, beside tests/ (which mutmut copies itself)
             "also_copy =", "    conf",
             # One process, no xdist: mutmut collects which test reaches which function in-process.
             "pytest_add_cli_args =", "    -n", "    0", "    -p", "    no:cacheprovider",
             "pytest_add_cli_args_test_selection ="] + [f"    {t}" for t in tests]
    (repo / "setup.cfg").write_text("\n".join(lines) + "\n")


def mutant_names(repo: Path, module: str) -> list[str]:
    """Every mutant mutmut generated for `module`, as `mutmut run` names them."""
    dotted = module[:-3].replace("/", ".")
    text = (repo / "mutants" / module).read_text()
    names = sorted(set(re.findall(r"^\s*def (x\S*?__mutmut_\d+)\(", text, re.MULTILINE)))
    return [f"{dotted}.{n}" for n in names]


def mutmut(repo: Path, *args: str, mutant_timeout: float = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "FABRICQ_MUTANT_TIMEOUT": str(mutant_timeout or float("inf"))}
    return subprocess.run([sys.executable, "-c", BOOTSTRAP, *args], check=False, cwd=repo, env=env,
                          capture_output=True, text=True)


def previous_results(path: Path) -> dict[str, str]:
    """mutant name → status from this script's JSON or a `mutmut results --all true` listing."""
    text = path.read_text()
    if text.lstrip().startswith("{"):
        return json.loads(text)["results"]
    return dict(re.findall(r"^\s*(\S+__mutmut_\d+): (.+)$", text, re.MULTILINE))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("module", help="e.g. fabricq/resume.py")
    ap.add_argument("--tests", required=True, help="pytest selection, e.g. \"tests/test_resume.py -k 'not kill'\"")
    ap.add_argument("--sample", type=int, default=0, help="run a random N of the mutants (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rerun", type=Path, help="run only the mutants this earlier result did not kill")
    ap.add_argument("--mutant-timeout", type=float, default=600,
                    help="wall seconds a mutant's tests may take at most (then: timeout, counted as killed)")
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/fabricq-mutation"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    repo = scratch_copy(args.scratch)
    write_config(repo, args.module, shlex.split(args.tests))
    # A pattern that matches no mutant: mutmut generates the mutants and collects test coverage only.
    mutmut(repo, "run", "no.such.mutant")
    names = mutant_names(repo, args.module)
    pool = names
    if args.rerun:
        before = previous_results(args.rerun)
        pool = [n for n in names if n in before and before[n] not in KILLED]
    chosen = sorted(random.Random(args.seed).sample(pool, args.sample)) if 0 < args.sample < len(pool) else pool
    print(f"{args.module}: {len(names)} mutants, running {len(chosen)}", flush=True)
    run = mutmut(repo, "run", *chosen, mutant_timeout=args.mutant_timeout)
    (args.scratch / "run.log").write_text(run.stdout + run.stderr)
    listing = mutmut(repo, "results", "--all", "true").stdout
    status = dict(re.findall(r"^\s*(\S+__mutmut_\d+): (.+)$", listing, re.MULTILINE))
    results = {n: status.get(n, "not checked") for n in chosen}
    killed = sum(s in KILLED for s in results.values())
    summary = {"module": args.module, "tests": args.tests, "rerun": str(args.rerun or ""), "mutants": len(names),
               "run": len(chosen), "killed": killed, "mutant_timeout_s": args.mutant_timeout, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    counts: dict[str, int] = {}
    for s in results.values():
        counts[s] = counts.get(s, 0) + 1
    print(json.dumps({k: v for k, v in summary.items() if k != "results"} | {"by_status": counts}))


if __name__ == "__main__":
    main()
