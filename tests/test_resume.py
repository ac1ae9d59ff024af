"""Resume after a crash: a run killed with SIGKILL mid-calibration and re-run with the same command
writes a checkpoint bit-identical to an uninterrupted run's; a different config or model is
refused; partial state never looks finished."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT, run_cli
from in_process import run_app
from fabricq import resume
from fabricq.errors import FabricqError

# float32 forwards pinned: the budgets and bit-identity below are sized for float32 hidden states
# (tests/test_bf16_paths.py resumes a bf16 run).
ARGS = ["recipe=gptq_w4", "model.dtype=float32", "data.num_samples=8", "data.seq_len=64", "data.batch_size=2", "eval.enabled=false", "eval.seq_len=64"]
# About three batches of hidden states in host memory: the rest is spilled to disk.
# Budgets need the two-forward mode (quant.true_sequential=false).
LAYER_MODE = ["quant.true_sequential=false"]
SPILL = ["cache.host_mib=0.1", *LAYER_MODE]
TWO_RANK_SETTINGS = ["distributed.cpu_oversubscribe=true", "distributed.timeout_s=60"]

# Runs fabricq in this process after patching it to SIGKILL itself at a chosen point, so the kill
# lands exactly where the test wants it (no cleanup handler can run).
KILLER = """
import os, signal, sys, time
import fabricq.resume as resume
import fabricq.calibration.cache as cache
mode, layer = os.environ["KILL_MODE"], int(os.environ["KILL_LAYER"])
save_hidden = resume.WorkDirectory.save_hidden
def patched_save_hidden(self, index, next_inputs):
    if mode == "mid-snapshot" and index == layer:
        def save_one_then_die(stage, folder):
            folder.mkdir(parents=True, exist_ok=True)
            cache.write_hidden(folder / "b00000.safetensors", next(iter(stage)))
            os.kill(os.getpid(), signal.SIGKILL)
        cache.Stage.save = save_one_then_die
    return save_hidden(self, index, next_inputs)
resume.WorkDirectory.save_hidden = patched_save_hidden
commit = resume.WorkDirectory.commit_layer
def patched_commit(self, *args):
    commit(self, *args)
    if mode == "slow":
        time.sleep(1.0)
resume.WorkDirectory.commit_layer = patched_commit
if __name__ == "__main__":
    # Run as a script file, Fabric's launcher re-executes this very file for ranks 1..N-1, so
    # every rank is patched; from `-c`, run it as `python -m fabricq`.
    if sys.argv[0] == "-c":
        import runpy
        sys.argv = ["fabricq", *sys.argv[1:]]
        runpy.run_module("fabricq", run_name="__main__", alter_sys=True)
    else:
        from fabricq.__main__ import main
        main()
"""


def build_tiny_llama(folder: Path, seed: int) -> Path:
    """A random 4-layer Llama with a small BPE tokenizer trained on the built-in text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from fabricq.data import builtin_documents

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(builtin_documents(), trainers.BpeTrainer(vocab_size=384, special_tokens=["<unk>", "<s>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_models")
    return build_tiny_llama(root / "a", seed=0), build_tiny_llama(root / "b", seed=1)


@pytest.fixture(scope="module")
def uninterrupted(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume_ref") / "out"
    result = run_cli(*ARGS, f"model.path={models[0]}", f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def uninterrupted_layer_mode(models, tmp_path_factory):
    """The same run in the two-forward mode, all in memory: the reference of the spilling runs."""
    out = tmp_path_factory.mktemp("resume_ref_layer_mode") / "out"
    result = run_cli(*ARGS, *LAYER_MODE, f"model.path={models[0]}", f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def start_killable(mode: str, layer: int, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", "KILL_MODE": mode, "KILL_LAYER": str(layer)}
    return subprocess.Popen([sys.executable, "-c", KILLER, *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Poll until `path` exists (the run committed that far) while `proc` is still running."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)


def assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    ra, rb = (json.loads((d / "report.json").read_text())["modules"] for d in (a, b))
    assert {n: s["loss"] for n, s in ra.items()} == {n: s["loss"] for n, s in rb.items()}


def work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.work"


def test_sigkill_between_layers_then_same_command_resumes_bit_identical(models, uninterrupted_layer_mode, tmp_path):
    """Poll the work directory for layer 1's state file, SIGKILL the run, re-run the same command
    (with a host budget that spills to disk, which must not change the result either)."""
    out = tmp_path / "out"
    args = [*ARGS, *SPILL, f"model.path={models[0]}", f"output_dir={out}"]
    proc = start_killable("slow", -1, *args)  # sleeps 1 s after each commit: time to poll and kill
    wait_for(work_dir(out) / "state" / "L00001.rank0.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed run must not leave an output that looks finished"
    assert (work_dir(out) / "layers" / "L00001.safetensors").is_file()

    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming" in result.stdout + result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_after_layer"] in (1, 2)
    assert report["cache"]["disk"]["spilled_batches"] > 0
    assert report["cache"]["host"]["peak_mib"] <= 0.1
    assert not work_dir(out).exists()
    assert_same_checkpoint(out, uninterrupted_layer_mode)


def test_kill_mid_snapshot_refuses_other_config_or_model_then_resumes(models, uninterrupted, tmp_path):
    out = tmp_path / "out"
    args = [*ARGS, f"model.path={models[0]}", f"output_dir={out}"]
    proc = start_killable("mid-snapshot", 2, *args)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
    work = work_dir(out)
    # Layer 2's hidden states were being written: a temporary directory, no state file.
    assert (work / "hidden" / ".tmp-L00002.rank0").is_dir()
    assert not (work / "state" / "L00002.rank0.json").exists()
    assert (work / "state" / "L00001.rank0.json").exists()

    with pytest.raises(FabricqError, match=r"holds an unfinished run of a different config \(config.quant.bits: 4 → 8\)"):
        run_app(*args, "quant.bits=8")
    with pytest.raises(FabricqError, match="holds an unfinished run of a different model .*resume=false"):
        run_app(*ARGS, f"model.path={models[1]}", f"output_dir={out}")
    with pytest.raises(FabricqError, match="there is no unfinished run to resume"):
        run_app(*args[:-1], f"output_dir={tmp_path / 'elsewhere'}", "resume=true")
    assert not out.exists() and (work / "state" / "L00001.rank0.json").exists()

    result = run_cli(*args, "resume=true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "report.json").read_text())["resumed_after_layer"] == 1
    assert_same_checkpoint(out, uninterrupted)


def test_two_ranks_killed_then_resumed_bit_identical(models, tmp_path):
    """2 ranks (each layer solved by owners: the two-forward mode). SIGKILL both ranks once each
    has committed layer 0; the same command resumes from the last layer both finished and writes
    the uninterrupted 2-rank run's checkpoint."""
    two_ranks = [*ARGS, *LAYER_MODE, "trainer.devices=2", *TWO_RANK_SETTINGS, f"model.path={models[0]}"]
    reference = tmp_path / "reference"
    result = run_cli(*two_ranks, f"output_dir={reference}")
    assert result.returncode == 0, result.stderr[-3000:]
    owners = {g["owner"] for layer in json.loads((reference / "report.json").read_text())["distributed"]["layers"]
              for g in layer["groups"]}
    assert owners == {0, 1}

    out = tmp_path / "out"
    args = [*two_ranks, f"output_dir={out}"]
    (tmp_path / "killer.py").write_text(KILLER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", "KILL_MODE": "slow", "KILL_LAYER": "-1",
           "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, str(tmp_path / "killer.py"), *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    for rank in (0, 1):  # a run resumes from the last layer every rank committed
        wait_for(work_dir(out) / "state" / f"L00000.rank{rank}.json", proc)
    os.killpg(proc.pid, signal.SIGKILL)  # both ranks (rank 1 is rank 0's child, same session)
    proc.wait()
    assert not out.exists()
    finished = [resume.WorkDirectory(work_dir(out), rank, 2).latest_finished_layer() for rank in (0, 1)]
    assert all(f is not None for f in finished) and abs(finished[0] - finished[1]) <= 1, finished

    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "report.json").read_text())["resumed_after_layer"] == min(finished)
    assert_same_checkpoint(out, reference)


@pytest.mark.parametrize("world", [1, 2])
def test_commits_keep_what_a_lagging_peer_resumes_from(tmp_path, world):
    """Alone, a rank keeps only its last committed layer's marker and hidden states; with several
    ranks also the layer before, where a peer still one layer behind resumes from."""
    from fabricq.calibration.cache import ActivationCache

    work = resume.WorkDirectory(tmp_path / ".out.work", rank=0, world_size=world)
    work.prepare("auto", {"x": 1})
    cache = ActivationCache("cpu")
    for k in range(6):
        stage = cache.new_stage()
        stage.append(torch.full((1, 2, 3), float(k)))
        assert work.save_hidden(k, stage) == 1
        work.commit_layer(k, {}, 1)
        work.release_older(k)
        markers = sorted(p.name for p in (work.path / "state").iterdir())
        hidden = sorted(p.name for p in (work.path / "hidden").iterdir())
        kept = [k] if world == 1 else [j for j in (k - 1, k) if j >= 0]
        assert markers == [f"L{j:05d}.rank0.json" for j in kept]
        assert hidden == [f"L{j:05d}.rank0" for j in kept]
        assert work.latest_finished_layer() == k


@pytest.mark.parametrize("bits, symmetric", [(3, False), (4, True), (8, True)])
def test_layer_results_round_trip_exactly(tmp_path, bits, symmetric):
    from fabricq.quant.gptq import gptq_quantize
    from fabricq.quant.grid import QuantScheme
    from fabricq.resume import load_results, save_results

    g = torch.Generator().manual_seed(bits)
    w, x = torch.randn(24, 64, generator=g), torch.randn(256, 64, generator=g)
    qw = gptq_quantize(w, x.T @ x / 256, QuantScheme(bits, 16, symmetric, "dynamic"), block_size=32)
    stats = {"loss": 0.1 + 1e-17, "seconds": 0.5, "method": "gptq"}
    save_results(tmp_path / "L.safetensors", {"m": (qw, stats)})
    back, back_stats = load_results(tmp_path / "L.safetensors")["m"]
    for part in ("codes", "scale", "zero", "g_idx"):
        a, b = getattr(qw, part), getattr(back, part)
        assert a.dtype == b.dtype and torch.equal(a, b), part
    assert back.scheme == qw.scheme and back.info == qw.info and back_stats == stats
    assert torch.equal(back.dequantize(), qw.dequantize())


class Crash(Exception):
    pass


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_in_process_resume_matches_uninterrupted(tmp_path, method):
    """The loop entry point: crash after layer 1's commit, restore into a fresh model, continue at
    layer 2 from the saved hidden states: the same quantized results as one uninterrupted run."""
    from fabricq.calibration.cache import ActivationCache
    from fabricq.calibration.loop import CalibrationLoop
    from fabricq.callbacks.checkpoint import CheckpointCallback
    from fabricq.callbacks.gptq import GPTQCallback, GPTQSettings
    from fabricq.quant.grid import QuantScheme
    from fabricq.resume import WorkDirectory
    from test_calibration import SAMPLES, tiny_llama

    settings = GPTQSettings(method=method, scheme=QuantScheme(4, 16, True, "static"))

    def loop_for(model, gptq, extra=()):
        cache = ActivationCache("cpu", host_bytes=2 * 16 * 32 * 4, spill_dir=tmp_path / "spill")
        return CalibrationLoop(model, SAMPLES, device="cpu", batch_size=2, callbacks=[gptq, *extra], cache=cache)

    reference = GPTQCallback(settings)
    loop_for(tiny_llama(), reference).run()

    class CrashAfter(CheckpointCallback):
        def on_layer_complete(self, loop, index, next_inputs):
            super().on_layer_complete(loop, index, next_inputs)
            if index == 1:
                raise Crash

    work = WorkDirectory(tmp_path / ".out.work")
    assert work.prepare("auto", {"x": 1}) is False
    first = GPTQCallback(settings)
    with pytest.raises(Crash):
        loop_for(tiny_llama(), first, [CrashAfter(work, first)]).run()
    assert work.latest_finished_layer() == 1

    work = WorkDirectory(tmp_path / ".out.work")
    assert work.prepare("auto", {"x": 1}) is True
    model, resumed = tiny_llama(), GPTQCallback(settings)
    loop = loop_for(model, resumed, [CheckpointCallback(work, resumed)])
    inputs = work.restore(1, model, resumed, loop.cache)
    assert (inputs is None) == (method == "rtn")
    loop.run(start_layer=2, inputs=inputs)
    assert resumed.quantized.keys() == reference.quantized.keys()
    for name, qw in reference.quantized.items():
        assert torch.equal(qw.codes, resumed.quantized[name].codes), name
        assert torch.equal(qw.scale, resumed.quantized[name].scale), name
    assert work.latest_finished_layer() == 2
    # Everything finished: continuing after the last layer runs nothing and fails nothing.
    loop.run(start_layer=3)

    other = WorkDirectory(tmp_path / ".out.work")
    with pytest.raises(FabricqError, match="another fabricq run is using"):
        other.prepare("auto", {"x": 1})
    work.close()
    with pytest.raises(FabricqError, match=r"holds an unfinished run of a different config \(x: 1 → 2\)"):
        other.prepare("auto", {"x": 2})
