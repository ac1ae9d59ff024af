"""The NaN/Inf scan of weight files (`fabricq.weights.check_finite`) on files written here: every
float dtype, values at the edges of chunks and tensors, counts against torch's own, and resident
memory that does not grow with the file (the file is read, not memory-mapped)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from fabricq import weights
from fabricq.errors import FabricqError
from fabricq.models import read_header


def tensors_with(poison: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """A few tensors of every stored float dtype (and an integer one, never scanned), with NaN,
    +Inf or -Inf at the flat positions `poison` names."""
    g = torch.Generator().manual_seed(0)
    out = {
        "a.f64": torch.randn(37, 11, generator=g, dtype=torch.float64),
        "b.bf16": torch.randn(300, 7, generator=g).bfloat16(),
        "c.f16": torch.randn(1001, generator=g).half(),
        "d.f32": torch.randn(3, 5, 67, generator=g),
        "e.i64": torch.arange(50),
        "f.scalar": torch.tensor(2.5),
    }
    specials = [float("nan"), float("inf"), float("-inf")]
    for name, positions in poison.items():
        flat = out[name].view(-1)
        for k, i in enumerate(positions):
            flat[i] = specials[k % 3]
    return out


def scan(tmp_path, tensors):
    file = tmp_path / "model.safetensors"
    save_file(tensors, str(file), metadata={"format": "pt"})
    weights.check_finite([file], read_header(file))
    return file


@pytest.mark.parametrize("chunk", [1, 13, 100, 1 << 20])
def test_clean_files_pass_in_any_chunk_size(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(weights, "SCAN_ELEMENTS", chunk)
    scan(tmp_path, tensors_with({}))


@pytest.mark.parametrize("name, positions", [
    ("a.f64", [0]),
    ("a.f64", [406]),  # the last element
    ("b.bf16", [12, 13, 2099]),
    ("c.f16", [999, 1000]),
    ("d.f32", [0, 500, 1004]),
    ("f.scalar", [0]),
])
@pytest.mark.parametrize("chunk", [13, 1 << 20])
def test_every_nan_or_inf_is_counted(tmp_path, monkeypatch, name, positions, chunk):
    monkeypatch.setattr(weights, "SCAN_ELEMENTS", chunk)
    tensors = tensors_with({name: positions})
    with pytest.raises(FabricqError) as err:
        scan(tmp_path, tensors)
    stored = load_file(str(tmp_path / "model.safetensors"))[name]  # torch's reading of the same file
    count = int((~torch.isfinite(stored)).sum())
    assert count == len(positions)
    assert f"weights of {name.removesuffix('.weight')} contain {count} NaN/Inf values ({name} in model.safetensors)" in str(err.value)


def test_a_file_that_ends_inside_a_tensor(tmp_path):
    file = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(1000)}, str(file))
    headers = read_header(file)
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(FabricqError, match="ends inside a tensor's data"):
        weights.check_finite([file], headers)


def test_the_scan_does_not_hold_the_file_in_memory(tmp_path):
    """Scanning a 128 MiB file raises the peak resident memory by a few chunks, not by the file
    (a memory-mapped read keeps every page it touched until the file is closed)."""
    file = tmp_path / "model.safetensors"
    save_file({f"w{i}": torch.randn(2048, 2048) for i in range(8)}, str(file))
    script = textwrap.dedent(f"""
        import json, torch
        from pathlib import Path
        from fabricq.models import read_header
        from fabricq.weights import check_finite
        def hwm():
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
        file = Path({str(file)!r})
        headers = read_header(file)
        bool(torch.isfinite(torch.randn(1 << 20)).all())  # torch's one-time set-up, outside the measure
        before = hwm()
        check_finite([file], headers)
        print(json.dumps(hwm() - before))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    grew = json.loads(out.stdout.strip().splitlines()[-1])
    assert grew < 40, f"peak RSS grew by {grew:.0f} MiB scanning a 128 MiB file"
