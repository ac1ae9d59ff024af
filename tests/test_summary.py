"""Sweep summaries: written automatically at the end of a `-m` sweep and by `python -m
fabricq.summary`, with values equal to the jobs' own report.json; failed and unrun jobs as rows."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, run_cli

from fabricq.summary import SUMMARY_FILES, main, write_summary

TINY = ["data.num_samples=8", "data.seq_len=64", "data.batch_size=4",
        "eval.seq_len=64", "eval.max_windows=2", "eval.kl_windows=1"]
RECIPES = ["gptq_w4", "gptq_w8", "rtn_w4"]
MIB = 2**20


@pytest.fixture(scope="module")
def sweep(shared_path, tmp_path_factory):
    """A finished 3-recipe sweep of stories260k; the sweep's stdout."""
    model = shared_path("models", "stories260k")
    folder = tmp_path_factory.mktemp("multirun") / "2025-01-01_00-00-00"
    cache = tmp_path_factory.mktemp("cache")  # an empty evaluation cache: the first job fills it
    result = run_cli("-m", f"recipe={','.join(RECIPES)}", f"model.path={model}", *TINY,
                     f"hydra.sweep.dir={folder}", env={"FABRICQ_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, model, result.stdout


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_sweep_writes_summary_equal_to_the_reports(sweep):
    folder, model, stdout = sweep
    for name in SUMMARY_FILES:
        assert (folder / name).is_file(), name
    rows = read_csv(folder / "summary.csv")
    assert [row["recipe"] for row in rows] == RECIPES  # the override that differs, in job order
    original = (model / "model.safetensors").stat().st_size
    for num, row in enumerate(rows):
        job = folder / str(num)
        report = json.loads((job / "report.json").read_text())
        checkpoint = (job / "model.safetensors").stat().st_size  # measured here, not read from the report
        assert row["status"] == "ok"
        assert int(row["bits"]) == report["scheme"]["bits"]
        assert int(row["group_size"]) == report["scheme"]["group_size"]
        assert row["method"] == report["method"]
        assert float(row["size_mib"]) == pytest.approx(checkpoint / MIB, rel=1e-12)
        assert float(row["size_ratio"]) == pytest.approx(checkpoint / original, rel=1e-12)
        assert float(row["original_mib"]) == pytest.approx(original / MIB, rel=1e-12)
        for key in ("ppl_before", "ppl_after", "kl_after", "wall_s", "peak_rss_mib"):
            assert float(row[key]) == report[key], key  # csv keeps full precision
        assert (job / "report.md").is_file()
        # The original model is evaluated once per sweep: later jobs read the first job's cache entry.
        assert report["eval"]["cached"] is (num > 0), num
        assert report["ppl_before"] == json.loads((folder / "0" / "report.json").read_text())["ppl_before"]
        assert (job / "report.png").is_file() == (report["method"] == "gptq")  # rtn records no losses
        assert f"| {num} | {RECIPES[num]} | ok |" in stdout  # the table is printed
        assert f"| {num} | {RECIPES[num]} | ok |" in (folder / "summary.md").read_text()
    # W8 is bigger than W4 and closer to the original; GPTQ W4 beats RTN W4 at the same size.
    w4, w8, rtn = rows
    assert float(w4["size_mib"]) == float(rtn["size_mib"]) < float(w8["size_mib"]) < original / MIB
    assert float(w8["kl_after"]) < float(w4["kl_after"]) < float(rtn["kl_after"])
    assert (folder / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_job_writes_report_md_and_png(sweep):
    folder, model, _ = sweep
    job = folder / "0"  # gptq_w4
    report = json.loads((job / "report.json").read_text())
    assert report["size_on_disk"] == {
        "original_bytes": (model / "model.safetensors").stat().st_size,
        "checkpoint_bytes": (job / "model.safetensors").stat().st_size,
        "ratio": (job / "model.safetensors").stat().st_size / (model / "model.safetensors").stat().st_size,
    }
    text = (job / "report.md").read_text()
    assert text.startswith("# fabricq report: stories260k")
    assert f"| perplexity before | {report['ppl_before']:.4g} |" in text
    assert f"| perplexity after | {report['ppl_after']:.4g} |" in text
    assert f"| KL after (nats/token) | {report['kl_after']:.3g} |" in text
    assert f"| peak RSS | {report['peak_rss_mib']:.0f} MiB |" in text
    for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert f"| {kind} |" in text
    assert "![GPTQ vs RTN loss per decoder layer](report.png)" in text
    assert (job / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # matplotlib is a dependency
    assert "rtn method records none" in (folder / "2" / "report.md").read_text()


def test_job_without_report_is_a_failed_row(sweep, tmp_path, capsys):
    folder, _, _ = sweep
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    for name in SUMMARY_FILES:
        (copy / name).unlink()
    (copy / "1" / "report.json").unlink()
    assert main([str(copy)]) == 0
    rows = read_csv(copy / "summary.csv")
    assert [row["status"] for row in rows] == ["ok", "failed (no report.json)", "ok"]
    assert rows[1]["recipe"] == "gptq_w8" and rows[1]["ppl_after"] == ""  # its overrides still known
    assert "| 1 | gptq_w8 | failed (no report.json) |" in capsys.readouterr().out
    assert (copy / "summary.png").is_file()  # drawn from the jobs that finished


def test_without_multirun_yaml_the_differing_config_fields_are_the_columns(sweep, tmp_path):
    folder, _, _ = sweep
    copy = tmp_path / "jobs"
    for num in range(3):
        shutil.copytree(folder / str(num), copy / str(num))
    write_summary(copy, echo=False)
    rows = read_csv(copy / "summary.csv")
    assert [row["quant.bits"] for row in rows] == ["4", "8", "4"]
    assert [row["quant.method"] for row in rows] == ["gptq", "gptq", "rtn"]
    assert "model.path" not in rows[0]  # the same in every job


def test_summary_without_matplotlib(sweep, tmp_path, monkeypatch, caplog):
    folder, _, _ = sweep
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    (copy / "summary.png").unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with caplog.at_level(logging.WARNING, logger="fabricq"):
        written = write_summary(copy, echo=False)
    assert [p.name for p in written] == ["summary.md", "summary.csv"]
    assert not (copy / "summary.png").exists()
    assert [r.getMessage() for r in caplog.records if "pip install matplotlib" in r.getMessage()]


def test_sweep_stopped_by_a_failed_job_is_summarized(tmp_path):
    """Job 0 is refused by the config check (bits 5), which stops a Hydra sweep: the summary still
    says which job failed and which never ran, after the job's one error line."""
    folder = tmp_path / "stopped"
    result = run_cli("-m", "quant.bits=5,4", "model.path=unused", f"hydra.sweep.dir={folder}", timeout=120)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("fabricq: error:")]
    assert len(errors) == 1 and "bits" in errors[0], result.stderr
    rows = read_csv(folder / "summary.csv")
    assert [(row["job"], row["quant.bits"], row["status"]) for row in rows] == [
        ("0", "5", "failed (no report.json)"), ("1", "4", "not run")]
    assert not (folder / "summary.png").exists()  # nothing to draw


def test_summary_of_a_folder_that_is_not_a_sweep(tmp_path):
    import subprocess

    for target in (tmp_path / "missing", tmp_path):
        result = subprocess.run([sys.executable, "-m", "fabricq.summary", str(target)], cwd=REPO_ROOT, check=False,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("fabricq: error: ")
