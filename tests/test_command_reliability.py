"""The newer commands keep the main command's promises (issue #28): `fabricq.convert` never writes
into or over its source; the resume files are checksummed and a damaged one stops the run with
one line that offers resume=false; convert, inspect and summary answer bad input (wrong JSON types,
binary files, bad arguments, unwritable places) with one `fabricq: error:` line and exit code 2,
no traceback (FABRICQ_DEBUG=1 shows it); the Python API asks for a loaded model."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, run_cli
from test_convert import compressed
from test_resume import assert_same_checkpoint, start_killable

from fabricq.errors import FabricqError


def command(module: str, *args, env: dict | None = None, unprivileged: bool = False,
            cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` (from the repository root unless `cwd`), as a user runs it (no
    FABRICQ_DEBUG). `unprivileged`: without the capabilities that let root write anywhere."""
    environ = {k: v for k, v in os.environ.items() if k not in ("FABRICQ_DEBUG", "HYDRA_FULL_ERROR")}
    environ.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), **(env or {}))
    prefix = []
    if unprivileged and os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: file modes cannot refuse a write")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]
    return subprocess.run([*prefix, sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("fabricq: error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def tree(folder: Path) -> dict[str, str]:
    """Every file (sha256) and folder under `folder`, hidden ones included."""
    out = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        out[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


@pytest.fixture(scope="module")
def ct_source(tmp_path_factory) -> Path:
    """A small compressed-tensors checkpoint (2-layer Llama, 4-bit), converted in well under a second."""
    return compressed(tmp_path_factory.mktemp("ct"))[2]


# ---------------------------------------------------------------------------------------------
# convert: never into or over its source
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where, overwrite, relation", [
    ("inside", False, "lies inside"),
    ("inside", True, "lies inside"),
    ("same", True, "is"),
    ("parent", True, "contains"),
])
def test_convert_never_writes_into_or_over_its_source(ct_source, tmp_path, where, overwrite, relation):
    src = Path(shutil.copytree(ct_source, tmp_path / "home" / "src"))
    dst = {"inside": src / "sub", "same": src, "parent": src.parent}[where]
    before = tree(tmp_path)
    result = command("fabricq.convert", src, dst, "--to", "gptq", *(["--overwrite"] if overwrite else []))
    assert_one_line_error(result, f"destination {dst} {relation} the source SRC ({src})",
                          "fabricq never writes over its inputs, even with --overwrite")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("where", ["the current directory", "the home directory"])
def test_convert_never_replaces_the_current_or_home_directory(ct_source, tmp_path, where):
    """--overwrite into `.` or ~ would replace the folder a user works in (it did: rmtree first)."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    before = tree(tmp_path)
    if where == "the current directory":
        result = command("fabricq.convert", ct_source, ".", "--to", "gptq", "--overwrite", cwd=mine)
    else:
        result = command("fabricq.convert", ct_source, mine, "--to", "gptq", "--overwrite", env={"HOME": str(mine)})
    assert_one_line_error(result, f"is or contains {where}", "choose a directory of its own")
    assert tree(tmp_path) == before


def test_convert_publishes_like_the_main_command(ct_source, tmp_path):
    """--overwrite replaces the destination by a swap under the output lock: nothing of the old one
    or of the staging folder is left beside it."""
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    result = command("fabricq.convert", ct_source, dst, "--to", "gptq", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert not (dst / "old.txt").exists() and (dst / "quantize_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


# ---------------------------------------------------------------------------------------------
# Resume files: checksummed, verified on load
# ---------------------------------------------------------------------------------------------

RUN = ["recipe=gptq_w4", "data.num_samples=8", "data.seq_len=64", "data.batch_size=4", "eval.enabled=false"]


@pytest.fixture(scope="module")
def killed_run(shared_path, tmp_path_factory):
    """stories260k SIGKILLed while saving layer 2's hidden states: layers 0 and 1 committed. Returns
    the run's arguments (without output_dir), its work directory and an uninterrupted run's output."""
    model, text = shared_path("models", "stories260k"), shared_path("data", "tinystories-sample.txt")
    args = [*RUN, f"model.path={model}", f"data.path={text}"]
    root = tmp_path_factory.mktemp("killed")
    proc = start_killable("mid-snapshot", 2, *args, f"output_dir={root / 'out'}")
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
    work = root / ".out.work"
    assert (work / "state" / "L00001.rank0.json").is_file() and (work / "layers" / "L00001.safetensors").is_file()
    reference = root / "reference"
    done = run_cli(*args, f"output_dir={reference}")
    assert done.returncode == 0, done.stderr[-3000:]
    return args, work, reference


def flip_tensor_byte(path: Path, suffix: str, offset: int = 5) -> str:
    """Flip one bit of the data of the first tensor whose name ends with `suffix`; its name."""
    data = bytearray(path.read_bytes())
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    name = sorted(k for k in header if k.endswith(suffix))[0]
    start, end = header[name]["data_offsets"]
    assert end - start > offset
    data[8 + size + start + offset] ^= 0x10
    path.write_bytes(bytes(data))
    return name


def damage(work: Path, how: str) -> Path:
    if how == "layer codes flipped":
        target = work / "layers" / "L00000.safetensors"
        flip_tensor_byte(target, ".codes_packed")
    elif how == "hidden states truncated":
        target = work / "hidden" / "L00001.rank0" / "b00000.safetensors"
        target.write_bytes(target.read_bytes()[:-100])
    elif how == "hidden states flipped":
        target = work / "hidden" / "L00001.rank0" / "b00001.safetensors"
        flip_tensor_byte(target, "hidden", offset=1000)
    elif how == "state flipped":
        target = work / "state" / "L00001.rank0.json"
        state = json.loads(target.read_text())
        state["rng"] = ("1" if state["rng"][0] != "1" else "2") + state["rng"][1:]
        target.write_text(json.dumps(state, indent=1))
    else:
        raise AssertionError(how)
    return target


@pytest.mark.parametrize("how", ["layer codes flipped", "hidden states truncated", "hidden states flipped",
                                 "state flipped"])
def test_damaged_resume_state_is_refused_then_resume_false_runs(killed_run, tmp_path, how):
    args, pristine, reference = killed_run
    out = tmp_path / "out"
    work = Path(shutil.copytree(pristine, tmp_path / ".out.work"))
    target = damage(work, how)
    result = run_cli(*args, f"output_dir={out}")
    line = assert_one_line_error(result, f"the resume state {target} is damaged",
                                 "pass resume=false to discard the unfinished run and start over")
    assert "bfloat16" not in line
    assert not out.exists() and target.exists()  # nothing published; the state is kept for the user to judge
    if how == "layer codes flipped":  # every rerun says the same
        assert_one_line_error(run_cli(*args, f"output_dir={out}"), f"the resume state {target} is damaged")

    done = run_cli(*args, f"output_dir={out}", "resume=false")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_checkpoint(out, reference)
    assert not work.exists()


def test_intact_resume_state_still_resumes_bit_identical(killed_run, tmp_path):
    args, pristine, reference = killed_run
    out = tmp_path / "out"
    shutil.copytree(pristine, tmp_path / ".out.work")
    done = run_cli(*args, f"output_dir={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "report.json").read_text())["resumed_after_layer"] == 1
    assert_same_checkpoint(out, reference)


def test_resume_files_carry_checksums(killed_run):
    from safetensors import safe_open

    from fabricq.checksums import json_sha256

    _, work, _ = killed_run
    for path in [*(work / "layers").iterdir(), *(work / "hidden" / "L00001.rank0").iterdir()]:
        with safe_open(str(path), "pt") as f:
            assert len((f.metadata() or {}).get("sha256", "")) == 64, path
    for path in [work / "run.json", work / "state" / "L00001.rank0.json"]:
        data = json.loads(path.read_text())
        assert data["sha256"] == json_sha256(data), path


def test_resume_true_needs_an_explicit_output_dir(shared_path, tmp_path):
    model = shared_path("models", "stories260k")
    result = run_cli(*RUN, f"model.path={model}", "resume=true", f"hydra.run.dir={tmp_path / 'outputs' / 'now'}")
    assert_one_line_error(result, "resume=true needs an explicit output_dir")
    assert not (tmp_path / "outputs" / "now").exists()


# ---------------------------------------------------------------------------------------------
# Bad input to convert / inspect / summary: one line, exit code 2
# ---------------------------------------------------------------------------------------------


def edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


JSON_CASES = {
    "config.json an array": (lambda d: (d / "config.json").write_text("[1, 2]"),
                             "config.json holds a JSON array, not an object"),
    "config.json random bytes": (lambda d: (d / "config.json").write_bytes(bytes(range(256)) * 3),
                                 "config.json is not a JSON text file"),
    "quantization_config a string": (lambda d: edit_config(d, lambda c: c.update(quantization_config="x")),
                                     "quantization_config is a JSON string, not an object"),
    "config_groups an array": (lambda d: edit_config(d, lambda c: c["quantization_config"].update(config_groups=[1])),
                               "quantization_config.config_groups is a JSON array"),
    "a config group a string": (
        lambda d: edit_config(d, lambda c: c["quantization_config"]["config_groups"].update(group_0="x")),
        "quantization_config.config_groups.group_0 is a JSON string"),
    "targets not strings": (
        lambda d: edit_config(d, lambda c: c["quantization_config"]["config_groups"]["group_0"].update(targets=[1])),
        "quantization_config.config_groups.group_0.targets must be a list of module names"),
}


@pytest.mark.parametrize("module", ["fabricq.inspect", "fabricq.convert"])
@pytest.mark.parametrize("case", list(JSON_CASES))
def test_wrong_json_types_are_one_line(ct_source, tmp_path, module, case):
    bad = Path(shutil.copytree(ct_source, tmp_path / "bad"))
    edit, expected = JSON_CASES[case]
    edit(bad)
    extra = [tmp_path / "out", "--to", "gptq"] if module == "fabricq.convert" else []
    assert_one_line_error(command(module, bad, *extra), expected)
    assert not (tmp_path / "out").exists()


def test_fabricq_debug_shows_the_traceback(ct_source, tmp_path):
    bad = Path(shutil.copytree(ct_source, tmp_path / "bad"))
    (bad / "config.json").write_text("[]")
    result = command("fabricq.inspect", bad, env={"FABRICQ_DEBUG": "1"})
    assert result.returncode == 1 and "Traceback" in result.stderr
    assert "FabricqError" in result.stderr and "holds a JSON array" in result.stderr


def test_unknown_model_type_is_a_short_line(ct_source, tmp_path):
    bad = Path(shutil.copytree(ct_source, tmp_path / "bad"))
    edit_config(bad, lambda c: c.update(model_type="llamma"))
    line = assert_one_line_error(command("fabricq.inspect", bad), "model_type 'llamma' is not one transformers",
                                 "closest: llama")
    assert len(line) < 300


@pytest.mark.parametrize("module, args, expected", [
    ("fabricq.convert", ["a", "b"], "the following arguments are required: --to"),
    ("fabricq.convert", ["a", "b", "--to", "gptq", "--fast"], "unrecognized arguments: --fast"),
    ("fabricq.inspect", ["a", "--engine", "foo"], "argument --engine: invalid choice: 'foo'"),
    ("fabricq.inspect", ["a", "--tp", "abc"], "argument --tp: invalid int value: 'abc'"),
    ("fabricq.summary", [], "the following arguments are required: sweep_dir"),
])
def test_argument_errors_are_one_line(module, args, expected):
    result = command(module, *args)
    assert_one_line_error(result, expected, f"(see python -m {module} --help)")
    assert result.stdout == ""


def test_convert_into_an_unwritable_folder(ct_source, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = command("fabricq.convert", ct_source, locked / "new" / "dst", "--to", "gptq", unprivileged=True)
    finally:
        locked.chmod(0o755)
    assert_one_line_error(result, f"{locked / 'new' / 'dst'} cannot be written", "ermission denied")
    assert list(locked.iterdir()) == []


def fake_sweep(folder: Path) -> Path:
    """A sweep folder whose jobs' report.json hold the wrong JSON types or random bytes."""
    folder.mkdir()
    reports = {
        "0": json.dumps({"method": "gptq", "scheme": {"bits": 4, "group_size": 128}, "ppl_after": 12.5}),
        "1": "[1, 2, 3]",
        "2": json.dumps({"method": ["gptq"], "scheme": "W4", "size_on_disk": "big", "ppl_before": "low",
                         "ppl_after": {"x": 1}, "modules": [1], "wall_s": True}),
        "3": bytes(range(256)) * 2,
        "4": json.dumps({"scheme": {"bits": "4"}, "modules": {"m": "x", "n": {"group_size": [1]}},
                         "size_on_disk": {"checkpoint_bytes": "1", "original_bytes": -5}}),
    }
    for num, report in reports.items():
        job = folder / num
        job.mkdir()
        (job / "report.json").write_bytes(report if isinstance(report, bytes) else report.encode())
        (job / "fabricq_config.yaml").write_bytes(bytes(range(256)) if num == "3" else b"quant: [bits: 4\n")
    return folder


def test_summary_of_jobs_with_wrong_json_types(tmp_path):
    sweep = fake_sweep(tmp_path / "sweep")
    result = command("fabricq.summary", sweep)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    import csv

    with (sweep / "summary.csv").open(newline="") as handle:
        rows = {row["job"]: row for row in csv.DictReader(handle)}
    assert rows["0"]["status"] == "ok" and rows["0"]["bits"] == "4" and float(rows["0"]["ppl_after"]) == 12.5
    assert rows["1"]["status"] == "failed (report.json is not a JSON object)"
    assert rows["3"]["status"] == "failed (unreadable report.json)"
    for num in ("2", "4"):  # fields of the wrong type read as absent
        assert rows[num]["status"] == "ok"
        assert all(rows[num][key] == "" for key in ("method", "bits", "size_mib", "ppl_before", "ppl_after", "wall_s"))


def test_summary_of_jobs_with_nan_and_infinite_figures(tmp_path):
    """A diverged job's NaN perplexity and infinite KL stay in the table; the plot leaves them out
    (matplotlib refused the axis limits: the summary, and a sweep's end, failed with a traceback)."""
    sweep = tmp_path / "sweep"
    size = {"checkpoint_bytes": 1000, "original_bytes": 4000}
    for num, (ppl, kl) in enumerate([(12.5, 0.1), (float("nan"), float("inf"))]):
        (sweep / str(num)).mkdir(parents=True)
        (sweep / str(num) / "report.json").write_text(json.dumps(
            {"method": "gptq", "scheme": {"bits": 4 - num, "group_size": 128}, "ppl_before": 10.0, "ppl_after": ppl,
             "kl_after": kl, "size_on_disk": size}))
    result = command("fabricq.summary", sweep)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| 1 | ok | gptq | 3 | 128 |" in result.stdout and "| nan | inf |" in result.stdout
    assert (sweep / "summary.png").is_file()


def test_summary_into_an_unwritable_sweep_folder(tmp_path):
    sweep = fake_sweep(tmp_path / "sweep")
    sweep.chmod(0o555)
    try:
        result = command("fabricq.summary", sweep, unprivileged=True)
    finally:
        sweep.chmod(0o755)
    assert_one_line_error(result, f"permission denied: {sweep / 'summary.csv'}")
    assert not (sweep / "summary.md").exists()


# ---------------------------------------------------------------------------------------------
# The Python API
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized_copy(stories260k_path, tmp_path_factory):
    """stories260k copied and loaded from the copy, quantized through the API."""
    import fabricq
    from cli_reference import load_tiny

    folder = Path(shutil.copytree(stories260k_path, tmp_path_factory.mktemp("api") / "model"))
    result = fabricq.quantize(load_tiny(folder), torch.randint(3, 500, (4, 32), generator=torch.Generator().manual_seed(0)),
                              overrides=["data.batch_size=2"])
    return folder, result


def test_save_never_writes_over_the_folder_the_model_came_from(quantized_copy):
    folder, result = quantized_copy
    before = tree(folder)
    with pytest.raises(FabricqError, match="is the folder the model was loaded from .*even with overwrite=true"):
        result.save(folder, overwrite=True)
    with pytest.raises(FabricqError, match="contains the folder the model was loaded from"):
        result.save(folder.parent, overwrite=True)
    assert tree(folder) == before


def test_save_wants_a_tokenizer(quantized_copy, tmp_path):
    _, result = quantized_copy
    with pytest.raises(FabricqError, match="tokenizer is of type str: pass a Hugging Face tokenizer"):
        result.save(tmp_path / "out", tokenizer="not a tokenizer")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kwargs, expected", [
    ({"calibration_ids": torch.full((2, 8), 10**6)}, "calibration_ids hold token id 1000000, outside the model's "
                                                     "vocabulary of 512 (0 to 511)"),
    ({"calibration_ids": torch.full((2, 8), -3)}, "calibration_ids hold token id -3"),
    ({"calibration_ids": torch.ones(2, 8, dtype=torch.bool)}, "calibration_ids is a torch.bool tensor"),
    ({"eval_ids": torch.full((2, 1), 5)}, "eval_ids are windows of 1 token: perplexity needs at least 2"),
    ({"eval_ids": torch.full((2, 8), 512)}, "eval_ids hold token id 512"),
])
def test_quantize_refuses_ids_the_model_cannot_read(stories260k_path, kwargs, expected):
    """Refused before any weight changes (they failed deep in torch: "index out of range in self",
    a ZeroDivisionError; boolean ids quantized on tokens 0 and 1)."""
    import fabricq
    from cli_reference import load_tiny

    model = load_tiny(stories260k_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = {"calibration_ids": torch.ones(4, 16, dtype=torch.long), "overrides": ["data.batch_size=2"], **kwargs}
    with pytest.raises(FabricqError) as caught:
        fabricq.quantize(model, **args)
    assert expected in str(caught.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_quantize_refuses_a_model_on_the_meta_device(stories260k_path):
    import fabricq
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(stories260k_path))
    with pytest.raises(FabricqError, match="has weights on the meta device"):
        fabricq.quantize(model, torch.ones(2, 8, dtype=torch.long))


@pytest.mark.parametrize("model, expected", [
    ("/does/not/exist", "the model is the path '/does/not/exist' (a path that does not exist): fabricq.quantize "
                        "wants a loaded model"),
    (Path("."), "(a folder: load it first): fabricq.quantize wants a loaded model"),
    (None, "the model is of type NoneType: fabricq.quantize wants a loaded model"),
])
def test_quantize_wants_a_loaded_model(model, expected):
    import fabricq

    with pytest.raises(FabricqError) as caught:
        fabricq.quantize(model, torch.ones(2, 8, dtype=torch.long))
    assert expected in str(caught.value) and "unknown architecture" not in str(caught.value)
