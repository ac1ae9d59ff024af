"""Quality on a real trained model (stories260k from ../shared): calibrated on C4 text, evaluated on
WikiText-2 test windows. 4-bit GPTQ stays close to the original and beats round-to-nearest."""

from __future__ import annotations

import json

import pytest

from conftest import require_shared, run_cli


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    model = require_shared("models", "stories260k")
    calib = require_shared("data", "c4-train-sample.jsonl")
    test = require_shared("data", "wikitext-2-raw-test.txt")
    out = {}
    for recipe in ("gptq_w4", "rtn_w4"):
        folder = tmp_path_factory.mktemp("quality") / recipe
        result = run_cli(
            f"+recipe={recipe}", f"model.path={model}", f"data.path={calib}", f"eval.path={test}",
            "data.num_samples=32", "data.seq_len=256", "eval.seq_len=512", "eval.max_windows=8",
            f"output_dir={folder}",
        )
        assert result.returncode == 0, result.stderr[-3000:]
        out[recipe] = json.loads((folder / "report.json").read_text())
    return out


def test_gptq_w4_perplexity_within_bound_of_original(reports):
    gptq = reports["gptq_w4"]
    # Measured: 127.1 → 138.1 (+9%) on this 260K-parameter model, whose 64/172-wide layers are
    # the hardest case for 4 bits; a broken solver or export lands far above +20%.
    assert gptq["ppl_after"] < 1.2 * gptq["ppl_before"]


def test_gptq_beats_round_to_nearest(reports):
    gptq, rtn = reports["gptq_w4"], reports["rtn_w4"]
    assert gptq["ppl_before"] == pytest.approx(rtn["ppl_before"], rel=1e-6)
    assert gptq["ppl_after"] < rtn["ppl_after"]
    assert gptq["kl_after"] < rtn["kl_after"]
    # Per module, GPTQ's layer objective is below RTN's on the same Hessian.
    for name, stats in gptq["modules"].items():
        assert stats["loss"] <= stats["rtn_loss"], name
