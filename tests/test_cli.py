"""The command line end to end: files, report, checkpoints other libraries load, and the errors a
user sees for bad input (each one line, before any model is loaded)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli

# Keep subprocess runs small: short windows, few samples, quick eval.
SMALL = [
    "data.num_samples=8", "data.seq_len=64", "data.batch_size=4",
    "eval.seq_len=64", "eval.max_windows=4", "eval.kl_windows=2",
]


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A random 2-layer Llama with a small BPE tokenizer trained on the built-in text; its widths
    (96 and 160) are not multiples of the default group size, so group fallbacks are exercised."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from fabricq.data import builtin_documents

    folder = tmp_path_factory.mktemp("tiny_llama")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(builtin_documents(), trainers.BpeTrainer(vocab_size=384, special_tokens=["<unk>", "<s>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=384, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_run(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "w4"
    result = run_cli("+recipe=gptq_w4", f"model.path={tiny_llama}", f"output_dir={out}", *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_end_to_end_files_report_and_progress(tiny_run):
    out, result = tiny_run
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "report.json", "fabricq_config.yaml"} <= names
    assert not any(n.startswith(".") for n in names)
    report = json.loads((out / "report.json").read_text())
    for key in ("ppl_before", "ppl_after", "kl_after", "wall_s", "peak_rss_mib"):
        assert isinstance(report[key], float) and report[key] > 0, key
    assert len(report["modules"]) == 2 * 7
    for stats in report["modules"].values():
        assert stats["method"] == "gptq" and stats["loss"] >= 0 and stats["tokens"] == 8 * 64
    # 96 columns with group 128 falls back to 32; 160 columns to 32 as well.
    assert {s["group_size"] for s in report["modules"].values()} == {32}
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert "Layer 2/2" in result.stdout + result.stderr and "ETA" in result.stdout + result.stderr
    # Evaluation shows a progress bar per pass (tqdm, on stderr), ending at all 4 windows.
    assert "Perplexity before: 100%" in result.stderr and "4/4" in result.stderr
    assert "Perplexity after: 100%" in result.stderr


def test_checkpoint_loads_in_transformers_with_the_reported_quality(tiny_run, tiny_llama):
    """Reload the exported checkpoint with transformers and recompute perplexity on the same held-out
    windows: it must equal what fabricq reported for its in-memory model."""
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fabricq.data import prepare_text
    from fabricq.evaluate import evaluate

    out, _ = tiny_run
    cfg = OmegaConf.load(out / "fabricq_config.yaml")
    text = prepare_text(AutoTokenizer.from_pretrained(out), cfg.data, cfg.eval)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    report = json.loads((out / "report.json").read_text())
    # The report fingerprints the exact calibration windows (what other tools are fed to match).
    digest = hashlib.sha256(text.calibration.to(torch.int64).numpy().tobytes()).hexdigest()
    assert report["calibration"]["sha256"] == digest
    assert evaluate(model, text.evaluation, "cpu")["ppl"] == pytest.approx(report["ppl_after"], rel=1e-4)
    original = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    assert evaluate(original, text.evaluation, "cpu")["ppl"] == pytest.approx(report["ppl_before"], rel=1e-4)


def test_plain_recipe_override_and_existing_output_refused(tiny_run, tiny_llama):
    out, _ = tiny_run
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    result = run_cli("recipe=rtn_w4", f"model.path={tiny_llama}", f"output_dir={out}", *SMALL)
    assert result.returncode == 2
    assert "exists and is not empty" in result.stderr and "overwrite=true" in result.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_overwrite_replaces_output_with_rtn(tiny_run, tiny_llama, tmp_path):
    out = tmp_path / "rtn"
    out.mkdir()
    (out / "old.txt").write_text("old")
    result = run_cli("recipe=rtn_w4", f"model.path={tiny_llama}", f"output_dir={out}", "overwrite=true", *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (out / "old.txt").exists()
    report = json.loads((out / "report.json").read_text())
    assert {s["method"] for s in report["modules"].values()} == {"rtn"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["+recipe=gptq_w5"], "recipe=gptq_w5: there is no such recipe (available: gptq_w3, gptq_w4, gptq_w4_asym, "
                              "gptq_w8, rtn_w4)"),
        (["quant.bitz=3"], "unknown setting quant.bitz: the quant settings are method, bits, group_size, symmetric, "
                           "actorder, damp, block_size, hessian_dtype, true_sequential, ignore"),
        (["quant.bits=5"], "quant.bits must be one of (2, 3, 4, 8), got 5"),
        (["quant.group_size=0"], "quant.group_size must be a positive integer or -1 (per-channel), got 0"),
        (["quant.actorder=random"], "quant.actorder must be one of ('none', 'static', 'dynamic', 'folded'), got 'random'"),
        (["model.path=/nonexistent/model"], "model.path does not exist: /nonexistent/model"),
        (["data.path=/nonexistent/text.txt"], "data.path does not exist or is not a file: /nonexistent/text.txt"),
        (["pipeline.lag=1"], "pipeline.lag was removed (every layer is calibrated on the quantized outputs of the "
                             "layer before it): drop it from the command line"),
        (["trainer.solve_window=2"], "trainer.solve_window was removed (it only applied to the lagged pipeline, "
                                     "which is gone): drop it from the command line"),
        (["cache.heap=small"], "cache.heap must be one of ('compact', 'fast'), got 'small'"),
    ],
)
def test_bad_input_is_one_clear_error(args, message, tmp_path):
    result = run_cli("+recipe=gptq_w4", f"output_dir={tmp_path / 'out'}", *args)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr == f"fabricq: error: {message}\n"  # one line, nothing else
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_model_folder_errors(tiny_llama, tmp_path):
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    result = run_cli("+recipe=gptq_w4", f"model.path={no_config}", f"output_dir={tmp_path / 'o1'}")
    assert result.returncode == 2 and "has no config.json" in result.stderr

    corrupt = _copy_model(tiny_llama, tmp_path / "corrupt")
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = run_cli("+recipe=gptq_w4", f"model.path={corrupt}", f"output_dir={tmp_path / 'o2'}")
    assert result.returncode == 2 and "corrupt safetensors file" in result.stderr

    unknown = _copy_model(tiny_llama, tmp_path / "unknown")
    config = json.loads((unknown / "config.json").read_text())
    config["model_type"] = "not-a-model"
    (unknown / "config.json").write_text(json.dumps(config))
    result = run_cli("+recipe=gptq_w4", f"model.path={unknown}", f"output_dir={tmp_path / 'o3'}")
    assert result.returncode == 2 and "unknown architecture: model_type='not-a-model'" in result.stderr

    nan = _copy_model(tiny_llama, tmp_path / "nan")
    tensors = load_file(nan / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, nan / "model.safetensors", metadata={"format": "pt"})
    result = run_cli("+recipe=gptq_w4", f"model.path={nan}", f"output_dir={tmp_path / 'o4'}", *SMALL)
    assert result.returncode == 2
    assert "weights of model.layers.1.mlp.up_proj contain 1 NaN/Inf values" in result.stderr
    for name in ("o1", "o2", "o3", "o4"):
        assert not (tmp_path / name).exists()


def test_calibration_text_too_short(tiny_llama, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("A short paragraph.\n\nAnother short one.\n")
    result = run_cli(
        "+recipe=gptq_w4", f"model.path={tiny_llama}", f"data.path={text}",
        f"eval.path={text}", f"output_dir={tmp_path / 'out'}", *SMALL,
    )
    assert result.returncode == 2
    assert "calibration text is too short" in result.stderr and "data.num_samples=8" in result.stderr
