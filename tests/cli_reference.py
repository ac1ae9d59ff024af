"""What the API and Lightning-callback tests compare against: the command line's checkpoint of
stories260k for the same calibration windows (float64 Hessians, so equality is bit for bit)."""

from __future__ import annotations

import json

import torch
from conftest import run_cli
from safetensors.torch import load_file
from torch import nn

# stories260k: 5 layers; 13 windows of 64 tokens in batches of 2 (a short last batch).
SMALL = ["data.num_samples=13", "data.seq_len=64", "data.batch_size=2", "quant.hessian_dtype=float64",
         "export.dtype=float32"]
API_OVERRIDES = ["data.batch_size=2", "quant.hessian_dtype=float64", "export.dtype=float32"]


def load_tiny(path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def cli_reference(shared_path, out) -> tuple[torch.Tensor, dict]:
    """The command line's checkpoint for SMALL, and the very windows it calibrated on."""
    from in_process import compose_config

    from fabricq.config import load_settings
    from fabricq.data import prepare_text
    from fabricq.models import load_tokenizer, resolve_model_source

    model, text = shared_path("models", "stories260k"), shared_path("data", "tinystories-sample.txt")
    paths = [f"model.path={model}", f"data.path={text}"]
    done = run_cli("recipe=gptq_w4", *paths, *SMALL, "eval.enabled=false", f"output_dir={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    settings = load_settings(compose_config("recipe=gptq_w4", *paths, *SMALL, "eval.enabled=false"))
    windows = prepare_text(load_tokenizer(resolve_model_source(str(model))), settings.data, settings.eval).calibration
    report = json.loads((out / "report.json").read_text())
    from fabricq.resume import data_identity

    assert data_identity(windows) == report["calibration"]["sha256"], "not the windows the CLI calibrated on"
    return windows, load_file(out / "model.safetensors")


def assert_same_tensors(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    differ = [k for k in expected if got[k].dtype != expected[k].dtype or not torch.equal(got[k], expected[k])]
    assert not differ, f"differs from the CLI's checkpoint in {differ[:5]}"
