"""Every script in examples/ runs as written (on the tiny stories260k model from ../shared), or, for
launchers this machine does not have (SLURM), prints a command whose overrides fabricq accepts."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

EXAMPLES = REPO_ROOT / "examples"
SMALL = ["data.num_samples=8", "data.seq_len=64", "data.batch_size=2", "eval.seq_len=64", "eval.max_windows=2"]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_example(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run(list(args), cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(shared_path):
    return shared_path("models", "stories260k"), shared_path("data", "tinystories-sample.txt")


def test_quantize_local_model(tiny, tmp_path):
    model, text = tiny
    out = tmp_path / "w4"
    done = run_example("bash", str(EXAMPLES / "quantize_local_model.sh"), str(model), str(text), str(out), *SMALL)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["scheme"]["bits"] == 4 and report["ppl_after"] > 0
    assert "ppl before" in done.stdout and (out / "model.safetensors").exists()


def test_sweep_recipes(tiny, tmp_path):
    model, text = tiny
    sweep = tmp_path / "sweep"
    done = run_example("bash", str(EXAMPLES / "sweep_recipes.sh"), str(model), str(text), str(sweep),
                       *SMALL, "eval.enabled=false")
    assert done.returncode == 0, done.stderr[-2000:]
    bits = sorted(json.loads((sweep / str(n) / "report.json").read_text())["scheme"]["bits"] for n in range(3))
    assert bits == [4, 4, 8]


def test_two_ranks(tiny, tmp_path):
    model, text = tiny
    out = tmp_path / "two"
    done = run_example("bash", str(EXAMPLES / "two_ranks.sh"), str(model), str(text), str(out), *SMALL,
                       "distributed.cpu_oversubscribe=true")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "report.json").read_text())["distributed"]["world_size"] == 2


def test_torchrun_launch_on_one_node(tiny, tmp_path):
    """The multi-node torchrun script, run for real as one node with two processes."""
    model, text = tiny
    out = tmp_path / "tr"
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside this Python")
    done = run_example("bash", str(EXAMPLES / "multinode_torchrun.sh"), str(out), f"model.path={model}",
                       f"data.path={text}", *SMALL, "distributed.cpu_oversubscribe=true",
                       env={"NNODES": "1", "NPROC": "2", "PORT": str(free_port()), "PATH": f"{torchrun.parent}:{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "report.json").read_text())["distributed"]["world_size"] == 2


@pytest.mark.parametrize("script, env", [
    ("slurm.sbatch", {"SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "4"}),
    ("multinode_torchrun.sh", {"NNODES": "2", "NPROC": "4", "NODE_RANK": "1", "HEAD": "10.1.2.3"}),
])
def test_multinode_dry_runs_compose_a_valid_config(tiny, tmp_path, script, env):
    """Dry runs print the launch command; its fabricq overrides compose into the expected config."""
    model, text = tiny
    args = [str(tmp_path / "out")] if script.endswith(".sh") else [str(model), str(text), str(tmp_path / "out")]
    done = run_example("bash", str(EXAMPLES / script), *args, env={"DRY_RUN": "1", **env})
    assert done.returncode == 0, done.stderr
    words = shlex.split(done.stdout)
    overrides = words[words.index("fabricq") + 1:]
    composed = run_example(sys.executable, "-m", "fabricq", *overrides, "--cfg", "job")
    assert composed.returncode == 0, composed.stderr
    assert "devices: 4" in composed.stdout and "num_nodes: 2" in composed.stdout


def test_python_callbacks(tiny, tmp_path):
    """The library example writes a checkpoint whose dense weights transformers reproduces."""
    import torch
    from transformers import AutoModelForCausalLM

    from fabricq.checkpoint.compressed_tensors import load_dequantized_state_dict

    model, text = tiny
    out = tmp_path / "py"
    done = run_example(sys.executable, str(EXAMPLES / "python_callbacks.py"), str(model), str(text), str(out),
                       "--bits", "4", "--group-size", "32")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "35 modules quantized to 4 bits" in done.stdout
    dense = load_dequantized_state_dict(out)
    original = AutoModelForCausalLM.from_pretrained(model).state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert dense[q].shape == original[q].shape and not torch.equal(dense[q], original[q])
    assert len(torch.unique(dense[q][0, :32])) <= 16  # one group of 32 columns holds ≤ 2^4 levels


def test_lightning_finetune_then_quantize(tiny, tmp_path):
    model, text = tiny
    out = tmp_path / "ft"
    done = run_example(sys.executable, str(EXAMPLES / "lightning_finetune_then_quantize.py"), "--model", str(model),
                       "--text", str(text), "--output", str(out), "--steps", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "validation of the quantized model" in done.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["samples"] == 8 and len(report["modules"]) == 35


def test_fabric_quantize_on_two_devices(tiny, tmp_path):
    model, text = tiny
    out = tmp_path / "fq"
    done = run_example(sys.executable, str(EXAMPLES / "fabric_quantize.py"), str(model), str(text), str(out),
                       "--devices", "2", env={"MASTER_PORT": str(free_port())})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "on 2 rank(s)" in done.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["distributed"]["world_size"] == 2 and report["ppl_after"] > 0
