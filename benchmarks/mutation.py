"""Mutation testing of one fabricq module with mutmut, in a scratch copy of the repository.

    pip install mutmut   # 3.x; a separate virtual environment with --system-site-packages keeps it apart
    python benchmarks/mutation.py fabricq/resume.py --tests "tests/test_resume.py -k round_trip" \
        --sample 80 --seed 0 --out benchmarks/results/mutation-resume.json

mutmut rewrites a package in place under `mutants/` and imports it from there, so this script
copies what the tests need into a scratch folder beside nothing of the checkout's: `fabricq/`,
`tests/`, `pyproject.toml`, and `conf/` as `fabricq/conf` (the package-dir mapping of the wheel,
which a plain folder on sys.path does not have). `../shared` is linked beside the copy so the
tests that use the tiny model find it. Mutants run in forked children (torch imported once), each
against only the selected tests that reach the mutated function. `--sample N` runs a seeded
random N of the module's mutants; the JSON lists every result with mutmut's name, so
`mutmut show NAME` in the scratch folder prints a mutant's diff.
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


def scratch_copy(scratch: Path) -> Path:
    repo = scratch / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("fabricq", "tests"):
        shutil.copytree(REPO / name, repo / name, ignore=ignore)
    shutil.copytree(REPO / "conf", repo / "fabricq" / "conf", ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", repo / "pyproject.toml")
    shared = scratch / "shared"
    if not shared.exists() and (REPO.parent / "shared").exists():
        shared.symlink_to(REPO.parent / "shared")
    return repo


def write_config(repo: Path, module: str, tests: list[str]) -> None:
    lines = ["[mutmut]", "source_paths = fabricq", f"only_mutate = {module}",
             "do_not_mutate = fabricq/conf/*",
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


def mutmut(repo: Path, *args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("mutmut")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(exe), *args], check=False, cwd=repo, env=env, capture_output=True, text=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("module", help="e.g. fabricq/resume.py")
    ap.add_argument("--tests", required=True, help="pytest selection, e.g. \"tests/test_resume.py -k 'not kill'\"")
    ap.add_argument("--sample", type=int, default=0, help="run a random N of the mutants (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/fabricq-mutation"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    repo = scratch_copy(args.scratch)
    write_config(repo, args.module, shlex.split(args.tests))
    # A pattern that matches no mutant: mutmut generates the mutants and collects test coverage only.
    mutmut(repo, "run", "no.such.mutant")
    names = mutant_names(repo, args.module)
    chosen = sorted(random.Random(args.seed).sample(names, args.sample)) if 0 < args.sample < len(names) else names
    print(f"{args.module}: {len(names)} mutants, running {len(chosen)}", flush=True)
    mutmut(repo, "run", *chosen)
    listing = mutmut(repo, "results", "--all", "true").stdout
    status = dict(re.findall(r"^\s*(\S+__mutmut_\d+): (.+)$", listing, re.MULTILINE))
    results = {n: status.get(n, "not checked") for n in chosen}
    killed = sum(s == "killed" for s in results.values())
    summary = {"module": args.module, "tests": args.tests, "mutants": len(names), "run": len(chosen),
               "killed": killed, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    counts: dict[str, int] = {}
    for s in results.values():
        counts[s] = counts.get(s, 0) + 1
    print(json.dumps({k: v for k, v in summary.items() if k != "results"} | {"by_status": counts}))


if __name__ == "__main__":
    main()
