"""report.md and report.png beside report.json: correct per-layer sums, sizes on disk from the files
themselves, and a run without matplotlib still writes report.md. (A real CLI run's report.md and
report.png: tests/test_summary.py, on the jobs of its sweep.)"""

from __future__ import annotations

import logging
import sys

import pytest

from fabricq.models import ModelSource
from fabricq.report_card import (
    REPORT_MD,
    REPORT_PNG,
    disk_sizes,
    layer_losses,
    write_report_card,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_report(method: str = "gptq") -> dict:
    """Two layers of q_proj and down_proj (the down_proj of layer 1 as two experts)."""
    modules = {
        "model.layers.0.self_attn.q_proj": {"loss": 1.0, "rtn_loss": 4.0, "group_size": 64},
        "model.layers.0.mlp.down_proj": {"loss": 0.5, "rtn_loss": 1.0, "group_size": 64},
        "model.layers.1.self_attn.q_proj": {"loss": 2.0, "rtn_loss": 5.0, "group_size": 64},
        "model.layers.1.mlp.experts.0.down_proj": {"loss": 0.25, "rtn_loss": 1.0, "group_size": 64},
        "model.layers.1.mlp.experts.1.down_proj": {"loss": 0.75, "rtn_loss": 1.0, "group_size": 64},
    }
    if method == "rtn":
        modules = {name: {"group_size": 64, "method": "rtn"} for name in modules}
    return {"model": "toy", "method": method, "ppl_before": 10.0, "ppl_after": 12.5, "kl_after": 0.125,
            "scheme": {"method": method, "bits": 4, "group_size": 128, "symmetric": True, "actorder": "static"},
            "wall_s": 3.5, "peak_rss_mib": 500.0, "timings": {"load_s": 1.0, "quantize_s": 2.0},
            "size_on_disk": {"original_bytes": 4 * 2**20, "checkpoint_bytes": 2**20, "ratio": 0.25},
            "modules": modules}


def test_layer_losses_sum_by_kind_and_layer():
    losses = layer_losses(synthetic_report()["modules"])
    assert list(losses) == ["q_proj", "down_proj"]  # the layer's own order
    assert losses["q_proj"] == {0: (1.0, 4.0), 1: (2.0, 5.0)}
    assert losses["down_proj"] == {0: (0.5, 1.0), 1: (1.0, 2.0)}  # the two experts add up
    assert layer_losses(synthetic_report("rtn")["modules"]) == {}


def test_report_card_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    write_report_card(tmp_path, synthetic_report())
    text = (tmp_path / REPORT_MD).read_text()
    assert "| perplexity after | 12.5 |" in text
    assert "| KL after (nats/token) | 0.125 |" in text
    assert "1 MiB of weight files (0.25 × the original's 4 MiB)" in text
    assert "groups of 128 (effective: 64)" in text
    assert "| q_proj | 3 | 9 | 0.333 |" in text  # (1 + 2) / (4 + 5)
    assert f"![GPTQ vs RTN loss per decoder layer]({REPORT_PNG})" in text
    assert (tmp_path / REPORT_PNG).read_bytes()[:8] == PNG_MAGIC


def test_without_matplotlib_report_md_is_written_and_one_line_says_how(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with caplog.at_level(logging.WARNING, logger="fabricq"):
        write_report_card(tmp_path, synthetic_report())
    assert not (tmp_path / REPORT_PNG).exists()
    text = (tmp_path / REPORT_MD).read_text()
    assert "| perplexity before | 10 |" in text and "pip install matplotlib" in text
    lines = [r.getMessage() for r in caplog.records if "matplotlib" in r.getMessage()]
    assert len(lines) == 1 and "pip install matplotlib" in lines[0]


def test_a_failing_figure_does_not_fail_the_run(tmp_path, monkeypatch, caplog):
    pytest.importorskip("matplotlib")
    import fabricq.report_card as card

    def broken(*args, **kwargs):
        raise ValueError("no room")

    monkeypatch.setattr(card, "plot_layer_losses", broken)
    with caplog.at_level(logging.WARNING, logger="fabricq"):
        write_report_card(tmp_path, synthetic_report())
    assert (tmp_path / REPORT_MD).is_file() and "report.png" not in (tmp_path / REPORT_MD).read_text()
    assert any("no room" in r.getMessage() for r in caplog.records)


def test_rtn_run_has_no_loss_figure(tmp_path):
    write_report_card(tmp_path, synthetic_report("rtn"))
    assert "rtn method records none" in (tmp_path / REPORT_MD).read_text()
    assert not (tmp_path / REPORT_PNG).exists()


def test_disk_sizes_count_top_level_weight_files_only(tmp_path):
    original, checkpoint = tmp_path / "original", tmp_path / "checkpoint"
    (original / "sub").mkdir(parents=True)
    (original / "model-00001-of-00002.safetensors").write_bytes(b"a" * 300)
    (original / "model-00002-of-00002.safetensors").write_bytes(b"b" * 100)
    (original / "pytorch_model.bin").write_bytes(b"c" * 999)  # a duplicate of the safetensors
    (original / "tokenizer.json").write_text("{}")
    (checkpoint / "gptq").mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(b"q" * 100)
    (checkpoint / "gptq" / "model.safetensors").write_bytes(b"g" * 120)  # the second format
    assert disk_sizes(ModelSource(original), checkpoint) == {
        "original_bytes": 400, "checkpoint_bytes": 100, "ratio": 0.25}
    (original / "m.gguf").write_bytes(b"x" * 50)
    assert disk_sizes(ModelSource(original, "m.gguf"), checkpoint)["original_bytes"] == 50
