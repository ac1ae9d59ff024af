"""The evaluation cache: hits only for the same inputs, never trusting a damaged entry, atomic
under concurrent writers, per-window so any rank split reads it, and wired into the app."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fabricq.eval_cache import ReferenceCache, reference_cache, reference_key
from fabricq.evaluate import WindowResult, evaluate, evaluate_sharded

VOCAB = 64


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


WINDOWS = torch.randint(0, VOCAB, (4, 40), generator=torch.Generator().manual_seed(0))
BASE = {"stride": None, "kl_windows": 2, "top_k": 8, "dtype": torch.float32, "device_type": "cpu"}
IDENTITY = {"files": {"model.safetensors": {"size": 1, "sampled_sha256": "a"}}}


def key(**changes) -> dict:
    kwargs = {**BASE, **changes}
    identity = kwargs.pop("identity", IDENTITY)
    return reference_key(identity, kwargs.pop("windows", WINDOWS), **kwargs)


class CountingModel(torch.nn.Module):
    """A model that counts its decoder forwards (a cache hit needs none)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0
        model.get_decoder().register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))

    def forward(self, **kwargs):
        return self.model(**kwargs)

    def get_decoder(self):
        return self.model.get_decoder()

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()


def test_every_input_that_changes_the_result_changes_the_entry(monkeypatch):
    base = ReferenceCache(key()).path
    changed = {
        "model": key(identity={"files": {"model.safetensors": {"size": 1, "sampled_sha256": "b"}}}),
        "windows": key(windows=WINDOWS.flip(0)),
        "window shape": key(windows=WINDOWS.reshape(8, 20)),
        "stride": key(stride=10),
        "kl_windows": key(kl_windows=3),
        "kl_top_k": key(top_k=16),
        "dtype": key(dtype=torch.bfloat16),
        "device": key(device_type="cuda"),
    }
    paths = {name: ReferenceCache(k).path for name, k in changed.items()}
    assert base not in paths.values() and len(set(paths.values())) == len(paths)
    assert ReferenceCache(key()).path == base  # the same inputs: the same entry
    monkeypatch.setattr("fabricq.eval_cache.EVALUATOR_VERSION", 999)
    assert ReferenceCache(key()).path != base  # a new evaluator: nothing old is reused
    # kl_windows beyond the windows there are means the same evaluation as all of them.
    assert ReferenceCache(key(kl_windows=4)).path == ReferenceCache(key(kl_windows=50)).path


def test_eval_cache_false_turns_it_off(tmp_path, monkeypatch):
    monkeypatch.setenv("FABRICQ_CACHE", str(tmp_path))
    settings = SimpleNamespace(cache=False, stride=None, kl_windows=2, kl_top_k=8)
    assert reference_cache(settings, IDENTITY, WINDOWS, torch.float32, "cpu") is None
    settings.cache = True
    assert reference_cache(settings, IDENTITY, WINDOWS, torch.float32, "cpu").path.is_relative_to(tmp_path / "eval")


def test_second_evaluation_reads_everything_back_without_a_forward(tmp_path):
    model = CountingModel(tiny_model())
    cache = ReferenceCache(key(), tmp_path)
    first = evaluate(model, WINDOWS, "cpu", keep=2, top_k=8, cache=cache)
    computed = model.calls
    assert first["cached_windows"] == 0 and computed >= 4
    assert len(list(cache.path.glob("window-*.safetensors"))) == 4
    again = evaluate(model, WINDOWS, "cpu", keep=2, top_k=8, cache=ReferenceCache(key(), tmp_path))
    assert model.calls == computed, "a hit runs no forward"
    assert again["cached_windows"] == 4 and again["ppl"] == first["ppl"] and again["saved_s"] > 0
    for a, b in zip(first["logprobs"], again["logprobs"]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    # The reference read back gives the same KL as the one computed.
    other = tiny_model(1)
    assert evaluate(other, WINDOWS, "cpu", reference=again["logprobs"])["kl"] == \
        evaluate(other, WINDOWS, "cpu", reference=first["logprobs"])["kl"]


def test_a_rank_split_reads_the_windows_of_its_shard(tmp_path):
    """Entries are per window: a one-rank evaluation serves any shard (first_index), and shards
    written separately serve a one-rank evaluation."""
    model = CountingModel(tiny_model())
    whole = evaluate(model, WINDOWS, "cpu", keep=2, top_k=8, cache=ReferenceCache(key(), tmp_path / "a"))
    calls = model.calls
    head = evaluate(model, WINDOWS[:2], "cpu", keep=2, top_k=8, cache=ReferenceCache(key(), tmp_path / "a"))
    tail = evaluate(model, WINDOWS[2:], "cpu", top_k=8, first_index=2, cache=ReferenceCache(key(), tmp_path / "a"))
    assert model.calls == calls and head["cached_windows"] + tail["cached_windows"] == 4
    assert head["nll"] + tail["nll"] == pytest.approx(whole["nll"], rel=1e-12)
    evaluate(model, WINDOWS[:2], "cpu", keep=2, top_k=8, cache=ReferenceCache(key(), tmp_path / "b"))
    evaluate(model, WINDOWS[2:], "cpu", top_k=8, first_index=2, cache=ReferenceCache(key(), tmp_path / "b"))
    joined = evaluate(model, WINDOWS, "cpu", keep=2, top_k=8, cache=ReferenceCache(key(), tmp_path / "b"))
    assert joined["cached_windows"] == 4 and joined["ppl"] == pytest.approx(whole["ppl"], rel=1e-12)


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "foreign key"])
def test_a_damaged_entry_is_reported_and_recomputed(tmp_path, caplog, damage):
    model = tiny_model()
    cache = ReferenceCache(key(), tmp_path)
    first = evaluate(model, WINDOWS, "cpu", keep=2, top_k=8, cache=cache)
    file = cache.path / "window-000001.safetensors"
    data = bytearray(file.read_bytes())
    if damage == "flip a byte":
        data[-5] ^= 0x40  # inside the last tensor's data: the file still parses
        file.write_bytes(bytes(data))
    elif damage == "truncate":
        file.write_bytes(bytes(data[: len(data) // 2]))
    else:  # a valid file of another entry copied in
        other = ReferenceCache(key(top_k=4), tmp_path)
        evaluate(model, WINDOWS[1:2], "cpu", keep=1, top_k=8, first_index=1, cache=other)
        file.write_bytes((other.path / "window-000001.safetensors").read_bytes())
    with caplog.at_level(logging.WARNING, logger="fabricq"):
        again = evaluate(model, WINDOWS, "cpu", keep=2, top_k=8, cache=ReferenceCache(key(), tmp_path))
    assert "recomputing" in caplog.text and "window-000001" in caplog.text
    assert again["cached_windows"] == 3 and again["ppl"] == pytest.approx(first["ppl"], rel=1e-12)
    assert all(torch.equal(x, y) for x, y in zip(first["logprobs"][1], again["logprobs"][1]))
    # The recomputed window was written back: the entry is whole again.
    assert evaluate(model, WINDOWS, "cpu", keep=2, top_k=8, cache=ReferenceCache(key(), tmp_path))["cached_windows"] == 4


WRITER = textwrap.dedent("""
    import sys, torch
    from fabricq.eval_cache import ReferenceCache
    from fabricq.evaluate import WindowResult
    key, root, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    import json
    cache = ReferenceCache(json.loads(key), root)
    g = torch.Generator().manual_seed(0)  # both writers hold the identical result
    ref = (torch.randint(0, 64, (2000, 8), generator=g, dtype=torch.int32), torch.randn(2000, 8, generator=g),
           torch.randn(2000, generator=g))
    bad = 0
    for i in range(20):
        cache.store(0, WindowResult(123.5, 2000, ref, 1.0))
        got = cache.load(0)  # whatever the other writer is doing, never half a file
        bad += got is None or got.nll != 123.5 or not torch.equal(got.reference[1], ref[1])
    print(bad)
""")


def test_concurrent_writers_end_with_one_valid_entry(tmp_path):
    k = json.dumps(key())
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, k, str(tmp_path), str(s)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for s in (1, 2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    assert [out.strip() for out, _ in outputs] == ["0", "0"], "a reader saw a torn or missing entry"
    cache = ReferenceCache(json.loads(k), tmp_path)
    assert sorted(p.name for p in cache.path.iterdir()) == ["key.json", "window-000000.safetensors"]
    result = cache.load(0)
    assert isinstance(result, WindowResult) and result.nll == 123.5 and result.tokens == 2000


def _two_ranks(rank: int, init_file: str, root: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        fabric = SimpleNamespace(world_size=2, global_rank=rank, device=torch.device("cpu"))
        model = tiny_model()
        results = [evaluate_sharded(fabric, model, WINDOWS, "cpu", keep=2, top_k=8, cache=ReferenceCache(key(), root))
                   for _ in range(2)]
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_write_and_read_one_entry_that_one_rank_reads(tmp_path):
    """Two gloo ranks on an empty cache (each computes its shard), then again (each reads its
    shard); then one rank reads all four windows: the same perplexity throughout."""
    import torch.multiprocessing as mp

    mp.spawn(_two_ranks, args=(str(tmp_path / "init"), str(tmp_path / "cache"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    single = evaluate(tiny_model(), WINDOWS, "cpu", keep=2, top_k=8, cache=ReferenceCache(key(), tmp_path / "cache"))
    assert single["cached_windows"] == 4
    for miss, hit in ranks:
        assert (miss["cached_windows"], hit["cached_windows"], hit["windows"]) == (0, 4, 4)
        assert miss["ppl"] == pytest.approx(single["ppl"], rel=1e-12) and hit["ppl"] == pytest.approx(single["ppl"], rel=1e-12)
    assert len(ranks[0][1]["logprobs"]) == 2 and ranks[1][1]["logprobs"] == []  # rank 0 holds windows 0–1


def test_app_second_run_reads_the_reference_from_the_cache(tmp_path, shared_path, monkeypatch):
    """Two runs of the same model and evaluation (different recipes, as a sweep's jobs): the
    second reports eval.cached with the same ppl_before."""
    from in_process import run_app

    monkeypatch.setenv("FABRICQ_CACHE", str(tmp_path / "cache"))
    base = [f"model.path={shared_path('models', 'stories260k')}", "data.num_samples=4", "data.seq_len=32",
            "data.batch_size=4", "eval.seq_len=64", "eval.max_windows=3", "eval.kl_windows=2"]
    first = run_app("recipe=rtn_w4", *base, f"output_dir={tmp_path / 'a'}")
    second = run_app("recipe=gptq_w4", *base, f"output_dir={tmp_path / 'b'}")
    assert first["eval"]["cached"] is False and second["eval"]["cached"] is True
    assert second["eval"]["windows_cached"] == 3 and second["eval"]["saved_s"] > 0
    assert second["ppl_before"] == first["ppl_before"]
    assert second["kl_after"] > 0 and first["eval"]["kl_windows"] == 2
    assert Path(second["eval"]["cache_dir"]).is_relative_to(tmp_path / "cache")
