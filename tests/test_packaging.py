"""A non-editable install: the wheel built from this checkout carries every package and every config
file (conf/ at the top of the repository ships as `fabricq.conf`), and `python -m fabricq` composes
recipes from the installed copy, run from another directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO_ROOT


def _pip(*args: str, cwd: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_wheel_ships_the_configs_and_runs_outside_the_checkout(tmp_path):
    # Build from a copy: an in-tree build would leave build/ and egg-info in the shared checkout.
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("fabricq", "conf"):
        shutil.copytree(REPO_ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    _pip("wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(tmp_path / "dist"), str(source), cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("fabricq-*.whl"))

    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"fabricq/conf/{p.relative_to(REPO_ROOT / 'conf').as_posix()}" for p in (REPO_ROOT / "conf").rglob("*.yaml")}
    assert configs and configs <= names, sorted(configs - names)
    packages = {f"{p.parent.relative_to(REPO_ROOT).as_posix()}/__init__.py" for p in (REPO_ROOT / "fabricq").rglob("__init__.py")}
    assert packages <= names, sorted(packages - names)  # a package missing from pyproject's list

    site = tmp_path / "site"
    _pip("install", "--no-deps", "--no-index", "--target", str(site), str(wheel), cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)

    def fabricq(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)

    where = fabricq("-c", "import fabricq, fabricq.conf; print(fabricq.__file__); print(fabricq.conf.__file__)")
    assert where.returncode == 0, where.stderr
    assert all(Path(line).is_relative_to(site) for line in where.stdout.split()), where.stdout  # not the checkout

    job = fabricq("-m", "fabricq", "--cfg", "job", "+recipe=gptq_w8")
    assert job.returncode == 0, job.stderr
    quant = job.stdout[job.stdout.index("\nquant:\n"):]
    assert "\n  bits: 8\n" in quant and "\n  group_size: -1\n" in quant

    unknown = fabricq("-m", "fabricq", "recipe=nope")
    assert unknown.returncode == 2
    assert unknown.stderr == ("fabricq: error: recipe=nope: there is no such recipe "
                              "(available: gptq_w3, gptq_w4, gptq_w4_asym, gptq_w8, rtn_w4)\n")
    assert list(elsewhere.iterdir()) == []
