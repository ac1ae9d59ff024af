"""Shared fixtures for the fabricq test suite.

`../shared` (beside the checkout) holds real data and a tiny real model. A fresh clone does not
have it, so every test that needs it must skip with a clear reason instead of failing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


def require_shared(*parts: str) -> Path:
    """Path to ../shared/<parts...>, or skip the calling test with the reason it is absent."""
    path = SHARED_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared beside the checkout holds the test data/models)")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ../shared directory (skips the test when it is absent)."""
    return require_shared()


@pytest.fixture(scope="session")
def shared_path():
    """`shared_path("models", "stories260k")` → Path, skipping the test when it is absent."""
    return require_shared


def run_cli(*args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m fabricq ARGS` from the repository root, one thread, output captured; `env` adds
    environment variables."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "fabricq", *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="session")
def stories260k_path(shared_path):
    return shared_path("models", "stories260k")


@pytest.fixture(scope="session")
def cli_w4_reference(shared_path, tmp_path_factory):
    """The command line's W4 checkpoint of stories260k and its calibration windows (tests/cli_reference.py)."""
    from cli_reference import cli_reference

    return cli_reference(shared_path, tmp_path_factory.mktemp("cli") / "w4")


def spawn_ranks(main, folder: Path, world: int = 2) -> list:
    """Run `main(rank, world, init_file, folder)` on `world` spawned processes (each saves
    `folder/rank{r}.pt`) and return what every rank saved."""
    import torch
    import torch.multiprocessing as mp

    mp.spawn(main, args=(world, str(folder / "init"), str(folder)), nprocs=world, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world)]
