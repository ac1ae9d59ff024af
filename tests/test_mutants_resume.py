"""Resume decisions of fabricq.resume.WorkDirectory, one at a time on tiny files: when a work
directory counts as progress, what `resume=true|false|auto` does with it, which differences are
refused and how they are named, what a discard keeps, and the hidden-state snapshots. Written
against the mutants of benchmarks/mutation.py that the run-level tests in test_resume.py let
survive (see benchmarks/results/2026-11-28-mutation-testing.md)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from fabricq.calibration.cache import ActivationCache
from fabricq.errors import FabricqError
from fabricq.quant.gptq import gptq_quantize
from fabricq.quant.grid import QuantScheme
from fabricq.resume import WorkDirectory, load_results, save_results

IDENTITY = {"config": {"quant": {"bits": 4, "group_size": 128}}, "model": {"files": {"config.json": {"size": 10}}},
            "data_sha256": "aa", "world_size": 1}


def one_result(bits: int = 4, columns: int = 32):
    g = torch.Generator().manual_seed(columns)
    w, x = torch.randn(6, columns, generator=g), torch.randn(64, columns, generator=g)
    qw = gptq_quantize(w, x.T @ x / 64, QuantScheme(bits, -1, True, "none"), block_size=8)
    return {"m": (qw, {"loss": 0.5})}


def committed(path, layers: int = 1, identity: dict = IDENTITY, batches: int = 0) -> WorkDirectory:
    """A work directory as a run leaves it after committing layers 0…layers-1, lock released."""
    work = WorkDirectory(path)
    work.prepare("auto", identity)
    for k in range(layers):
        work.commit_layer(k, one_result(), batches)
    work.close()
    return work


def files(path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_a_fresh_run_creates_nothing_until_the_first_commit(tmp_path):
    work = WorkDirectory(tmp_path / "w")
    assert work.prepare("auto", IDENTITY) is False
    assert not work.path.exists()
    work.commit_layer(0, one_result(), 0)
    assert json.loads((work.path / "run.json").read_text())["identity"] == IDENTITY
    # The documented layout, nothing else (no temporary names left behind).
    assert files(work.path) == ["hidden", "layers", "layers/L00000.safetensors", "lock.rank0", "run.json",
                                "state", "state/L00000.rank0.json"]
    work.close()


def test_a_work_directory_whose_parent_folders_do_not_exist_yet(tmp_path):
    # output_dir=runs/new/out: the work directory runs/new/.out.work is the first thing created.
    work = WorkDirectory(tmp_path / "runs" / "new" / ".out.work")
    assert work.prepare("auto", IDENTITY) is False
    work.commit_layer(0, one_result(), 0)
    assert work.latest_finished_layer() == 0
    work.close()


def test_only_rank_0_writes_run_json_and_the_layer_results(tmp_path):
    """Another rank commits its own marker only, even when it gets there before rank 0."""
    path = tmp_path / "w"
    peer = WorkDirectory(path, rank=1, world_size=2)
    assert peer.prepare("auto", IDENTITY) is False
    peer.commit_layer(0, one_result(), 0)
    assert files(path) == ["hidden", "layers", "lock.rank1", "state", "state/L00000.rank1.json"]
    peer.close()


def test_alone_by_default_only_the_last_committed_layer_is_kept(tmp_path):
    work = WorkDirectory(tmp_path / "w")  # rank 0 of a world of 1
    work.prepare("auto", IDENTITY)
    for k in range(3):
        work.commit_layer(k, one_result(), 0)
        work.release_older(k)
    assert sorted(p.name for p in (work.path / "state").iterdir()) == ["L00002.rank0.json"]
    work.close()


def test_close_twice_then_prepare_again_holds_the_lock_again(tmp_path):
    work = committed(tmp_path / "w")
    work.close()  # committed() closed it already: a second close is harmless
    assert work.prepare(True, IDENTITY) is True
    with pytest.raises(FabricqError, match="another fabricq run is using"):
        WorkDirectory(work.path).prepare(True, IDENTITY)
    work.close()


@pytest.mark.parametrize("mode", ["auto", True])
def test_committed_progress_is_resumed_and_kept(tmp_path, mode):
    before = files(committed(tmp_path / "w", layers=2).path)
    work = WorkDirectory(tmp_path / "w")
    assert work.prepare(mode, IDENTITY) is True
    assert work.latest_finished_layer() == 1
    assert files(work.path) == before
    work.close()


def test_resume_true_without_progress_is_refused(tmp_path):
    with pytest.raises(FabricqError, match=r"resume=true but there is no unfinished run to resume in .*w$"):
        WorkDirectory(tmp_path / "w").prepare(True, IDENTITY)
    assert not (tmp_path / "w").exists()


def test_resume_false_discards_progress_but_keeps_the_lock_file(tmp_path, caplog):
    path = committed(tmp_path / "w", layers=2).path
    work = WorkDirectory(path)
    with caplog.at_level(logging.INFO, logger="fabricq"):
        assert work.prepare(False, IDENTITY) is False
    assert files(path) == ["lock.rank0"]
    assert f"Discarding the unfinished run in {path} (resume=false)" in caplog.messages
    work.close()


def test_run_json_without_a_committed_state_is_no_progress(tmp_path):
    path = committed(tmp_path / "w", layers=1).path
    (path / "state" / "L00000.rank0.json").unlink()
    work = WorkDirectory(path)
    with pytest.raises(FabricqError, match="no unfinished run to resume"):
        work.prepare(True, IDENTITY)
    assert work.prepare("auto", IDENTITY) is False
    assert files(path) == ["lock.rank0"]  # started over: the stale layer file is gone
    work.close()


def test_a_state_marker_counts_only_when_every_earlier_layer_file_exists(tmp_path):
    path = committed(tmp_path / "w", layers=3).path
    work = WorkDirectory(path)
    assert work.latest_finished_layer() == 2
    (path / "layers" / "L00001.safetensors").unlink()
    assert work.latest_finished_layer() == 0
    (path / "layers" / "L00000.safetensors").unlink()
    assert work.latest_finished_layer() is None


def test_other_ranks_never_discard_rank_0s_work(tmp_path):
    path = committed(tmp_path / "w", layers=1).path
    before = files(path)
    assert WorkDirectory(path, rank=1, world_size=2).prepare(False, IDENTITY) is False
    assert files(path) == before


@pytest.mark.parametrize("change, what, shown", [
    ({"config": {"quant": {"bits": 8, "group_size": 128}}}, "a different config", "config.quant.bits: 4 → 8"),
    ({"config": {"quant": {"bits": 4}}}, "a different config", "config.quant.group_size: 128 → None"),
    ({"model": {"files": {"config.json": {"size": 11}}}}, "a different model", "model.files.config.json.size: 10 → 11"),
    ({"data_sha256": "bb"}, "different calibration data", "data_sha256: 'aa' → 'bb'"),
])
def test_a_different_run_is_refused_naming_the_difference(tmp_path, change, what, shown):
    path = committed(tmp_path / "w").path
    before = files(path)
    work = WorkDirectory(path)
    with pytest.raises(FabricqError) as err:
        work.prepare("auto", {**IDENTITY, **change})
    assert str(err.value) == (
        f"{path} holds an unfinished run of {what} ({shown}): re-run it with its own settings to finish it, "
        "pass resume=false to discard it, or choose another output_dir")
    assert files(path) == before
    # The refusal released the lock: the right run resumes at once, in this very process.
    assert WorkDirectory(path).prepare(True, IDENTITY) is True


def test_the_first_three_differences_are_named(tmp_path):
    path = committed(tmp_path / "w").path
    new = {**IDENTITY, "config": {"quant": {"bits": 8, "group_size": 64}}, "data_sha256": "bb", "world_size": 2}
    with pytest.raises(FabricqError, match=r"of different calibration data \(config.quant.bits: 4 → 8; "
                                           r"config.quant.group_size: 128 → 64; data_sha256: 'aa' → 'bb'\):"):
        WorkDirectory(path).prepare("auto", new)


def test_an_unknown_work_format_is_refused(tmp_path):
    path = committed(tmp_path / "w").path
    run = json.loads((path / "run.json").read_text())
    (path / "run.json").write_text(json.dumps({**run, "format": 0}))
    with pytest.raises(FabricqError, match=r"unfinished run written by another fabricq version \(resume format 0, "
                                           r"this one reads 2\): pass resume=false"):
        WorkDirectory(path).prepare("auto", IDENTITY)


def test_key_order_of_the_identity_does_not_matter(tmp_path):
    path = committed(tmp_path / "w").path
    reordered = dict(reversed(list(IDENTITY.items())))
    assert WorkDirectory(path).prepare(True, reordered) is True


def test_a_second_process_on_the_work_directory_is_refused(tmp_path):
    path = committed(tmp_path / "w").path
    first = WorkDirectory(path)
    assert first.prepare(True, IDENTITY) is True
    with pytest.raises(FabricqError, match="another fabricq run is using"):
        WorkDirectory(path).prepare(True, IDENTITY)
    first.close()
    second = WorkDirectory(path)
    assert second.prepare(True, IDENTITY) is True
    second.close()


def hidden_stage(batches: int):
    cache = ActivationCache("cpu")
    stage = cache.new_stage()
    for b in range(batches):
        stage.append(torch.full((1, 2, 4), float(b)))
    return cache, stage


def test_hidden_states_replace_a_stale_snapshot_and_restore_checks_the_count(tmp_path):
    work = WorkDirectory(tmp_path / "w")
    work.prepare("auto", IDENTITY)
    hidden = work.path / "hidden" / "L00000.rank0"
    hidden.mkdir(parents=True)
    for stale in ("b00000.safetensors", "b00007.safetensors"):  # an earlier, crashed attempt's
        (hidden / stale).write_bytes(b"stale")
    cache, stage = hidden_stage(2)
    assert work.save_hidden(0, stage) == 2
    assert sorted(p.name for p in hidden.iterdir()) == ["b00000.safetensors", "b00001.safetensors"]
    work.commit_layer(0, one_result(), 2)

    model = torch.nn.Module()
    model.m = torch.nn.Linear(32, 6)
    installed = {}

    class Gptq:
        def install(self, name, module, result, stats):
            installed[name] = (module, result.dequantize(), stats)

    restored = work.restore(0, model, Gptq(), cache)
    assert [float(t.flatten()[0]) for t in restored] == [0.0, 1.0]
    assert installed["m"][0] is model.m and installed["m"][2] == {"loss": 0.5}
    assert torch.equal(installed["m"][1], one_result()["m"][0].dequantize())

    (hidden / "b00001.safetensors").unlink()
    with pytest.raises(FabricqError, match=r"L00000.rank0 is incomplete: pass resume=false to start over"):
        work.restore(0, model, Gptq(), cache)
    work.close()


def test_restore_warns_when_the_thread_count_changed(tmp_path, caplog):
    work = committed(tmp_path / "w")
    state = work.path / "state" / "L00000.rank0.json"
    from fabricq.resume import _write_json  # with its checksum: the run wrote it so

    _write_json(state, {**json.loads(state.read_text()), "threads": torch.get_num_threads() + 3})
    model = torch.nn.Module()
    model.m = torch.nn.Linear(32, 6)

    class Gptq:
        def install(self, *args):
            pass

    with caplog.at_level(logging.WARNING, logger="fabricq"):
        assert work.restore(0, model, Gptq(), ActivationCache("cpu")) is None
    assert (f"Resuming with {torch.get_num_threads()} threads where the run used {torch.get_num_threads() + 3}: "
            "results may differ in the last bits") in caplog.messages


class FakeCudaRng:
    """torch.cuda's generator-state calls on a host without CUDA: two devices whose states are
    byte strings, so a resumed run's restore can be compared with what the crashed run saved."""

    def __init__(self, monkeypatch, states):
        self.states = [torch.tensor(s, dtype=torch.uint8) for s in states]
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in self.states])
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self.set_all)

    def set_all(self, states):
        self.states = [s.clone() for s in states]


def restore_layer_0(work):
    model = torch.nn.Module()
    model.m = torch.nn.Linear(32, 6)

    class Gptq:
        def install(self, *args):
            pass

    return work.restore(0, model, Gptq(), ActivationCache("cpu"))


def test_cuda_generator_states_are_restored_on_resume(tmp_path, monkeypatch):
    result = one_result()
    cuda = FakeCudaRng(monkeypatch, [[1, 2, 3], [250, 0, 7]])
    work = WorkDirectory(tmp_path / "w")
    work.prepare("auto", IDENTITY)
    work.commit_layer(0, result, 0)
    cuda.states = [torch.zeros(3, dtype=torch.uint8)] * 2  # the resumed process starts elsewhere
    restore_layer_0(work)
    assert [s.tolist() for s in cuda.states] == [[1, 2, 3], [250, 0, 7]]
    work.close()


def test_a_cpu_checkpoint_resumes_on_a_cuda_host_leaving_its_generators_alone(tmp_path, monkeypatch):
    work = committed(tmp_path / "w")  # no CUDA while it ran: no CUDA states saved
    cuda = FakeCudaRng(monkeypatch, [[9, 9]])
    restore_layer_0(work)
    assert [s.tolist() for s in cuda.states] == [[9, 9]]


def test_a_nested_value_against_a_plain_one_is_refused_naming_it(tmp_path):
    """A config entry that was null and is now a mapping (or the reverse) is one difference."""
    old = {**IDENTITY, "config": {"quant": {"bits": 4, "group_size": 128}, "recovery": None}}
    path = committed(tmp_path / "w", identity=old).path
    new = {**old, "config": {**old["config"], "recovery": {"rank": 32}}}
    with pytest.raises(FabricqError, match=r"of a different config \(config.recovery: None → \{'rank': 32\}\):"):
        WorkDirectory(path).prepare("auto", new)
    with pytest.raises(FabricqError, match=r"of a different config \(config.recovery: None → 'lora'\):"):
        WorkDirectory(path).prepare("auto", {**old, "config": {**old["config"], "recovery": "lora"}})


@pytest.mark.parametrize("bits, columns", [(8, 30), (4, 30), (8, 32)])
def test_results_round_trip_with_columns_that_do_not_fill_the_last_word(tmp_path, bits, columns):
    (qw, stats), = one_result(bits, columns).values()
    save_results(tmp_path / "L.safetensors", {"m": (qw, stats)})
    back, _ = load_results(tmp_path / "L.safetensors")["m"]
    assert torch.equal(back.codes, qw.codes) and back.codes.shape == (6, columns)
    # Below 8 bits a run holds the packed form (memory); 8-bit codes stay unpacked.
    assert hasattr(back, "packed_codes") == (bits < 8)


# ------------------------------------------------------------------------------------------------
# The config part of the identity, from the config as the command line composes it
# ------------------------------------------------------------------------------------------------


def run_identity(*overrides: str) -> dict:
    """The identity fabricq.app.load builds, for `python -m fabricq OVERRIDES` (model and data
    fixed: only the config varies here)."""
    from in_process import compose_config

    from fabricq.resume import config_identity

    return {**IDENTITY, "config": config_identity(compose_config(*overrides))}


# Every field that changes the quantized layers, with the difference the refusal names.
CHANGES_THE_RESULT = [
    ("quant.damp=0.02", "quant.damp: 0.01 → 0.02"),
    ("quant.group_size=64", "quant.group_size: 128 → 64"),
    ("quant.symmetric=false", "quant.symmetric: True → False"),
    ("quant.actorder=dynamic", "quant.actorder: 'static' → 'dynamic'"),
    ("quant.hessian_dtype=float64", "quant.hessian_dtype: 'float32' → 'float64'"),
    ("quant.ignore=['.*down_proj']", "quant.ignore: [] → ['.*down_proj']"),
    ("quant.block_size=64", "quant.block_size: 128 → 64"),
    ("quant.bits=3", "quant.bits: 4 → 3"),
    ("recipe=gptq_w8", "quant.bits: 4 → 8"),
    ("quant.method=rtn", "quant.method: 'gptq' → 'rtn'"),
    ("quant.true_sequential=false", "quant.true_sequential: True → False"),
    ("data.num_samples=64", "data.num_samples: 128 → 64"),
    ("data.seq_len=256", "data.seq_len: 512 → 256"),
    ("data.batch_size=4", "data.batch_size: 8 → 4"),
    ("data.seed=1", "data.seed: 0 → 1"),
    ("data.path=/data/c4.txt", "data.path: None → '/data/c4.txt'"),
    ("data.text_field=content", "data.text_field: 'text' → 'content'"),
    ("data.eval_fraction=0.2", "data.eval_fraction: 0.1 → 0.2"),
    ("data.bos=false", "data.bos: 'auto' → False"),
    ("data.sampling=documents", "data.sampling: 'stream' → 'documents'"),
    ("data.chat_template=true", "data.chat_template: False → True"),
    ("seed=1", "seed: 0 → 1"),
    ("model.dtype=float32", "model.dtype: 'auto' → 'float32'"),
]


@pytest.mark.parametrize("override, shown", CHANGES_THE_RESULT, ids=[o for o, _ in CHANGES_THE_RESULT])
def test_every_field_that_changes_the_result_changes_the_resume_identity(tmp_path, override, shown):
    """A run left unfinished with the default config is not resumed by a command that changes any
    of these fields: the refusal names the field with both values."""
    path = committed(tmp_path / "w", identity=run_identity()).path
    with pytest.raises(FabricqError) as err:
        WorkDirectory(path).prepare("auto", run_identity(override))
    assert f"holds an unfinished run of a different config (config.{shown}" in str(err.value)
    assert WorkDirectory(path).prepare(True, run_identity()) is True  # the same command still resumes


@pytest.mark.parametrize("override", [
    "output_dir=/tmp/elsewhere", "overwrite=true", "resume=true", "eval.enabled=false", "eval.max_windows=2",
    "eval.kl_top_k=8", "cache.heap=fast", "cache.host_mib=64", "distributed.timeout_s=30",
    "distributed.cpu_oversubscribe=true", "pipeline.solve_threads=2", "model.path=/models/moved",
])
def test_fields_that_cannot_change_the_result_leave_the_identity_alone(tmp_path, override):
    path = committed(tmp_path / "w", identity=run_identity()).path
    assert run_identity(override) == run_identity()
    assert WorkDirectory(path).prepare(True, run_identity(override)) is True


def test_model_and_data_identities_are_contents_by_name(tmp_path):
    """The model by its files' names, sizes and sampled contents (first, middle and last 4 MiB),
    wherever the folder is; the calibration data as int64 token bytes. References written out."""
    import hashlib
    import shutil

    from fabricq.models import ModelSource
    from fabricq.resume import SAMPLE_BYTES, data_identity, model_identity

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"layers": 2}')
    big = torch.randint(0, 256, (2 * SAMPLE_BYTES + 12345,), generator=torch.Generator().manual_seed(0),
                        dtype=torch.uint8).numpy().tobytes()
    (folder / "model.safetensors").write_bytes(big)
    size, half = len(big), len(big) // 2 - SAMPLE_BYTES // 2
    sampled = big[:SAMPLE_BYTES] + big[half : half + SAMPLE_BYTES] + big[size - SAMPLE_BYTES :]
    expected = {"files": {
        "config.json": {"size": 13, "sampled_sha256": hashlib.sha256(b'{"layers": 2}').hexdigest()},
        "model.safetensors": {"size": size, "sampled_sha256": hashlib.sha256(sampled).hexdigest()}}}
    assert model_identity(ModelSource(folder)) == expected
    moved = tmp_path / "elsewhere"
    shutil.copytree(folder, moved)
    assert model_identity(ModelSource(moved)) == expected
    changed = bytearray(big)
    changed[size // 2] ^= 1  # one byte in the middle sample
    (moved / "model.safetensors").write_bytes(bytes(changed))
    assert model_identity(ModelSource(moved))["files"]["model.safetensors"]["sampled_sha256"] != \
        expected["files"]["model.safetensors"]["sampled_sha256"]
    gguf = tmp_path / "gguf"
    gguf.mkdir()
    (gguf / "m.gguf").write_bytes(b"GGUF" * 10)
    assert model_identity(ModelSource(gguf, "m.gguf")) == {
        "name": "m.gguf", "files": {"m.gguf": {"size": 40, "sampled_sha256": hashlib.sha256(b"GGUF" * 10).hexdigest()}}}

    tokens = torch.tensor([[1, 2, 3], [40000, 5, 6]], dtype=torch.int32)
    int64_bytes = b"".join(int(t).to_bytes(8, "little", signed=True) for t in tokens.flatten())
    assert data_identity(tokens) == data_identity(tokens.long()) == hashlib.sha256(int64_bytes).hexdigest()
