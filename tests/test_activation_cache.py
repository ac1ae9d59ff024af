"""The activation cache: budgets honoured, spilled batches read back exactly and in order, always
prefetched one step ahead (layers and batches), and the loop's results independent of where
batches live."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from in_process import run_app
from fabricq.calibration.cache import MIB, ActivationCache, check_budgets, check_spill_dir
from fabricq.calibration.loop import CalibrationLoop
from fabricq.errors import FabricqError
from test_calibration import SAMPLES, Recorder, tiny_llama


def batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 16, 32, generator=g) for _ in range(n)]


BATCH_BYTES = 2 * 16 * 32 * 4


def test_budget_then_spill_read_back_in_order(tmp_path):
    spill = tmp_path / "spill"
    cache = ActivationCache("cpu", host_bytes=2 * BATCH_BYTES, spill_dir=spill)
    data = batches(5)
    stage = cache.new_stage()
    for x in data:
        stage.append(x)
    assert [e.tier for e in stage.entries] == ["host", "host", "disk", "disk", "disk"]
    assert len(list(spill.glob("*.safetensors"))) == 3
    # A second stage while the first is held: the host budget is full, so it all goes to disk.
    second = cache.new_stage()
    second.append(data[0] * 2)
    assert second.entries[0].tier == "disk"
    for _ in range(2):  # a stage is read twice per layer (calibration pass, propagation pass)
        got = list(stage)
        assert len(got) == 5 and all(torch.equal(a, b) for a, b in zip(got, data))
    stage.release()
    second.release()
    assert not list(spill.glob("*.safetensors"))
    assert cache.used == {"device": 0, "host": 0, "disk": 0}
    report = cache.report()
    assert report["host"]["budget_mib"] == pytest.approx(2 * BATCH_BYTES / MIB, abs=1e-3)
    assert report["host"]["peak_mib"] == pytest.approx(2 * BATCH_BYTES / MIB, abs=1e-3)
    assert report["disk"]["spilled_batches"] == 4 and report["disk"]["peak_mib"] == pytest.approx(4 * BATCH_BYTES / MIB, abs=1e-3)
    assert report["device"] == "the compute device is the host"
    assert report["peak_inflight_mib"] <= 2 * BATCH_BYTES / MIB + 1e-3
    cache.close()
    assert not spill.exists()


def test_next_batch_is_fetched_before_the_current_one_is_used(tmp_path, monkeypatch):
    import threading

    import fabricq.calibration.cache

    cache = ActivationCache("cpu", host_bytes=0, spill_dir=tmp_path)
    stage = cache.new_stage()
    data = batches(3)
    for x in data:
        stage.append(x)
    events, opened = [], [threading.Event() for _ in data]
    real_open = fabricq.calibration.cache.safe_open

    def recording_open(path, *args, **kwargs):  # spilled batch files are named …-bNNNNN.safetensors
        b = int(Path(path).stem.rsplit("-b", 1)[1])
        events.append(f"fetch{b}")
        opened[b].set()
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(fabricq.calibration.cache, "safe_open", recording_open)
    for b, x in enumerate(stage):
        if b + 1 < len(data):  # without prefetch, nothing would open the next file meanwhile
            assert opened[b + 1].wait(timeout=10), f"batch {b + 1} was not fetched while batch {b} was in use"
        assert torch.equal(x, data[b])
        events.append(f"use{b}")
    assert events == ["fetch0", "fetch1", "use0", "fetch2", "use1", "use2"]
    cache.close()


def test_loop_results_do_not_depend_on_where_batches_live(tmp_path):
    """Same layer inputs (bit for bit) with everything in memory, with two batches in memory and
    the rest on disk, and with every batch on disk."""
    seen = {}
    for name, cache in [
        ("memory", None),
        ("spill", ActivationCache("cpu", host_bytes=2 * 16 * 32 * 4, spill_dir=tmp_path)),
        ("disk", ActivationCache("cpu", host_bytes=0, spill_dir=tmp_path)),
    ]:
        recorder = Recorder()
        loop = CalibrationLoop(tiny_llama(), SAMPLES, device="cpu", batch_size=2, callbacks=[recorder], cache=cache)
        loop.run()
        seen[name] = recorder.layer_inputs
        if cache is not None:
            assert cache.spilled_batches > 0 and cache.used["disk"] == 0
    for name in ("spill", "disk"):
        for layer in range(3):
            assert all(torch.equal(a, b) for a, b in zip(seen["memory"][layer], seen[name][layer]))


def test_next_layer_prefetched_and_at_most_two_layers_onloaded(monkeypatch):
    import fabricq.calibration.loop
    from fabricq.calibration.transfer import Prefetcher

    model = tiny_llama()
    recorder = Recorder()

    class RecordingPrefetcher(Prefetcher):
        """Logs each layer load when it is requested (the load itself runs on a thread, whose
        start the scheduler may delay past the layer's end on a busy machine)."""

        def __init__(self, name):
            super().__init__(name)
            self.loads_layers = name == "fabricq-layer"
            self.requests = 0

        def submit(self, fn):
            if self.loads_layers:
                recorder.events.append(f"request{self.requests}")
                self.requests += 1
            return super().submit(fn)

    monkeypatch.setattr(fabricq.calibration.loop, "Prefetcher", RecordingPrefetcher)
    loop = CalibrationLoop(model, SAMPLES, device="cpu", batch_size=2, callbacks=[recorder])
    resident, peak = set(), 0
    onload = loop.transfer.module_to_device

    def tracked_onload(layer):
        nonlocal peak
        index = list(loop.layers).index(layer)
        recorder.events.append(f"onload{index}")
        resident.add(index)
        peak = max(peak, len(resident))
        return onload(layer)

    loop.transfer.module_to_device = tracked_onload
    for i, layer in enumerate(loop.layers):
        to = layer.to
        layer.to = lambda *a, i=i, to=to, **k: (resident.discard(i), to(*a, **k))[1]
    loop.run()
    ev = recorder.events
    assert {e for e in ev if e.startswith("onload")} == {"onload0", "onload1", "onload2"}
    # Layer i+1 is requested before layer i's calibration ends, and it is never more than 2.
    for i in range(2):
        assert ev.index(f"request{i + 1}") < ev.index(f"end{i}")
    assert peak <= 2 and not resident


def test_budget_errors():
    check_budgets(BATCH_BYTES, None, BATCH_BYTES / MIB, "b")
    with pytest.raises(FabricqError, match=r"cache.host_mib=0.001 cannot hold one batch of hidden states \(2 × 16 × 32"):
        check_budgets(BATCH_BYTES, None, 0.001, "2 × 16 × 32 float32")
    # A budget's type and sign are checked by the config schema (tests/test_config.py).


def test_spill_dir_errors(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(FabricqError, match=f"cannot write spill files to {blocker}/spill"):
        check_spill_dir(blocker / "spill", 0)
    with pytest.raises(FabricqError, match="not enough free space for spilled hidden states"):
        check_spill_dir(tmp_path / "deep" / "spill", 1 << 60)
    assert not (tmp_path / "deep" / "spill").exists(), "the probe must not leave its directory behind"


def test_app_refuses_bad_budget_and_spill_dir_before_loading_the_model(tmp_path, shared_path, monkeypatch):
    import fabricq.app

    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(fabricq.app, "load_model", no_loading)
    model = shared_path("models", "stories260k")
    base = ["recipe=gptq_w4", f"model.path={model}", "data.num_samples=8", "data.seq_len=64",
            "data.batch_size=4", "eval.seq_len=64", f"output_dir={tmp_path / 'out'}"]
    with pytest.raises(FabricqError, match="quant.true_sequential=true holds every batch's activations"):
        run_app(*base, "cache.host_mib=1")  # the one-forward mode cannot honour a budget
    base.append("quant.true_sequential=false")
    with pytest.raises(FabricqError) as err:
        run_app(*base, "cache.host_mib=0.01")
    assert str(err.value) == ("cache.host_mib=0.01 cannot hold one batch of hidden states (4 × 64 × 64 float32 "
                              "= 0.06 MiB): raise it, lower data.batch_size, or set null (unlimited)")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(FabricqError, match=f"cannot write spill files to {blocker}/fabricq-"):
        run_app(*base, "cache.host_mib=1", f"cache.spill_dir={blocker}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"], "nothing may be left behind"

