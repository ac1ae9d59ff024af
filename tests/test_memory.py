"""The heap policy: freed large tensors leave the process's resident memory at once."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fabricq.sysmem import _glibc

# Big temporaries freed between small results that stay alive: the pattern of packing every
# module for export (and of each calibrated layer). Prints RssAnon growth and the live MiB kept.
PATTERN = textwrap.dedent("""
    import sys, torch
    from fabricq.sysmem import return_large_blocks_to_os
    if sys.argv[1] == "policy":
        assert return_large_blocks_to_os()
    def anon():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) / 1024 for l in f if l.startswith("RssAnon"))
    before, kept = anon(), []
    for i in range(60):
        temporary = torch.ones(1536, 576, dtype=torch.int64) + i   # 6.75 MiB, freed below
        kept.append(temporary[:, :32].to(torch.int32).contiguous())  # 0.19 MiB, kept
        del temporary
    print(anon() - before, sum(k.numel() * 4 for k in kept) / 2**20)
""")


def growth(mode: str) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", PATTERN, mode], capture_output=True, text=True, check=True)
    grown, live = (float(v) for v in out.stdout.split())
    return grown, live


@pytest.mark.skipif(_glibc() is None, reason="the heap policy only exists for glibc")
def test_freed_large_blocks_are_returned_to_the_os():
    default_growth, live = growth("default")
    policy_growth, _ = growth("policy")
    # glibc's default keeps the freed temporaries' pages (the problem this policy solves)...
    assert default_growth > live + 100
    # ...with the policy, resident memory grows by about what is alive.
    assert policy_growth < live + 16


# Faults taken to write a fresh 64 MiB tensor: 16384 with 4 KiB pages, ~32 with 2 MiB huge pages.
FAULTS = textwrap.dedent("""
    import resource, sys
    from fabricq.sysmem import huge_pages_for_large_tensors
    in_effect = huge_pages_for_large_tensors()
    import torch
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 << 20, dtype=torch.float32)
    print(in_effect, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "absent"
    return text.split("[")[1].split("]")[0]


# With "always" every large mapping gets huge pages anyway; "never": none to ask for.
@pytest.mark.skipif(_thp_mode() != "madvise", reason="transparent huge pages are not on request (madvise) here")
def test_large_tensors_fault_in_huge_pages_unless_the_environment_says_otherwise():
    def faults(env_value):
        import os
        env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
        if env_value is not None:
            env["THP_MEM_ALLOC_ENABLE"] = env_value
        out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, check=True, env=env)
        in_effect, count = out.stdout.split()
        return in_effect == "True", int(count)

    on, huge = faults(None)
    off, small = faults("0")  # an explicit choice wins
    assert on and not off
    assert small > 8000  # 4 KiB pages (at least half of the 16384)
    assert huge < small / 20


@pytest.mark.parametrize("heap, applied", [("compact", True), ("fast", False)])
def test_cache_heap_selects_the_heap_policy(heap, applied, tmp_path, shared_path, monkeypatch):
    """`cache.heap=compact` (the default) applies the policy before any work; `fast` leaves the C
    library's own policy in place. Stops right after the policy would be set."""
    from in_process import run_app

    import fabricq.app

    calls = []
    monkeypatch.setattr(fabricq.app, "return_large_blocks_to_os", lambda: calls.append("policy") or True)

    def stop(*args, **kwargs):
        raise RuntimeError("stop here")

    monkeypatch.setattr(fabricq.app, "check_output_dir", stop)
    model = shared_path("models", "stories260k")
    with pytest.raises(RuntimeError, match="stop here"):
        run_app("recipe=gptq_w4", f"model.path={model}", f"cache.heap={heap}", f"output_dir={tmp_path / 'out'}")
    assert calls == (["policy"] if applied else [])


def _rss_file_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) / 1024 for l in f if l.startswith("RssFile"))


@pytest.mark.skipif(_glibc() is None, reason="madvise through glibc")
def test_drop_mapped_pages_leaves_resident_memory_and_keeps_clean_contents(tmp_path):
    """Pages of a private file mapping leave RSS; clean ones read back the same, written ones
    revert to the file; heap memory is never advised."""
    import mmap

    import torch

    from fabricq.sysmem import drop_mapped_pages

    path = tmp_path / "weights.safetensors"  # the suffix the loader's mappings have
    values = torch.arange(16 << 20, dtype=torch.float32)  # 64 MiB
    path.write_bytes(values.numpy().tobytes())
    with path.open("rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    weight = torch.frombuffer(mapped, dtype=torch.float32)
    assert torch.equal(weight, values)  # every page resident now
    before = _rss_file_mib()
    advised = drop_mapped_pages([weight])
    assert advised >= (64 << 20) - 8192
    assert before - _rss_file_mib() > 60
    assert torch.equal(weight, values)  # clean pages: re-read from the file
    weight[:1024].fill_(-1.0)  # a copy-on-write page
    drop_mapped_pages([weight])
    assert torch.equal(weight[:1024], values[:1024])  # discarded: the file's contents again
    heap = values.clone()
    assert drop_mapped_pages([heap]) == 0 and torch.equal(heap, values)
    del weight
    mapped.close()


@pytest.mark.skipif(_glibc() is None, reason="madvise through glibc")
def test_drop_mapped_pages_keep_written_drops_clean_pages_and_keeps_changes(tmp_path):
    """With keep_written, clean pages leave RSS as before, but a page written since mapping
    (a change to the tensor that the file does not hold) keeps its new contents."""
    import mmap

    import torch

    from fabricq.sysmem import drop_mapped_pages

    path = tmp_path / "weights.safetensors"
    values = torch.arange(8 << 20, dtype=torch.float32)  # 32 MiB
    path.write_bytes(values.numpy().tobytes())
    with path.open("rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    weight = torch.frombuffer(mapped, dtype=torch.float32)
    assert torch.equal(weight, values)
    changed = values.clone()
    changed[5 << 20 : (5 << 20) + 4096] = -2.0  # four written pages in the middle
    weight[5 << 20 : (5 << 20) + 4096] = -2.0
    before = _rss_file_mib()
    advised = drop_mapped_pages([weight], keep_written=True)
    if mmap.PAGESIZE == 4096:
        assert advised == (32 << 20) - 16384  # all but the four written pages
    assert before - _rss_file_mib() > 28
    assert torch.equal(weight, changed)  # the change survived, the rest reads as the file
    drop_mapped_pages([weight])  # without keep_written a written page reverts: the flag is what keeps it
    assert torch.equal(weight, values)
    del weight
    mapped.close()

def test_finished_layers_give_up_their_dense_weights_and_restore_rebuilds_them():
    import torch
    from test_calibration import SAMPLES, tiny_llama

    from fabricq.calibration.loop import CalibrationLoop
    from fabricq.callbacks.base import Callback
    from fabricq.callbacks.gptq import GPTQCallback, GPTQSettings
    from fabricq.callbacks.release import ReleaseFinishedWeights
    from fabricq.quant.grid import QuantScheme

    model = tiny_llama()
    gptq = GPTQCallback(GPTQSettings(scheme=QuantScheme(4, 16, True, "static"), block_size=8))
    release = ReleaseFinishedWeights(gptq)
    seen = {}

    class Watch(Callback):  # what layers 0 and 2 hold once layer 1 is complete
        def on_layer_complete(self, loop, index, next_inputs):
            if index == 1:
                seen["layer0"] = {m.weight.device.type for m in loop.layers[0].modules()
                                  if isinstance(m, torch.nn.Linear)}
                seen["layer2"] = {m.weight.device.type for m in loop.layers[2].modules()
                                  if isinstance(m, torch.nn.Linear)}

    CalibrationLoop(model, SAMPLES, device="cpu", batch_size=2, callbacks=[gptq, release, Watch()]).run()
    assert seen == {"layer0": {"meta"}, "layer2": {"cpu"}}  # finished layers only
    modules = dict(model.named_modules())
    assert len(gptq.quantized) == 21
    assert all(modules[name].weight.is_meta for name in gptq.quantized)
    release.restore(model)
    for name, result in gptq.quantized.items():
        assert torch.equal(modules[name].weight, result.dequantize()), name
    logits = model(input_ids=SAMPLES[:1]).logits
    assert torch.isfinite(logits).all()


def _resident_pages(tensor) -> int:
    """Pages of `tensor` present in this process's memory (from /proc/self/pagemap)."""
    import numpy as np

    page = 4096
    start = tensor.data_ptr() // page * page
    end = tensor.data_ptr() + tensor.numel() * tensor.element_size()
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(start // page * 8)
        entries = np.frombuffer(f.read(-(-(end - start) // page) * 8), dtype="<u8")
    return int(((entries >> np.uint64(63)) & np.uint64(1)).sum())


@pytest.mark.skipif(_glibc() is None, reason="madvise through glibc")
def test_capture_leaves_the_embeddings_out_of_resident_memory_and_keeps_changed_rows(tmp_path):
    """After the first layer's inputs are captured, the pages of the memory-mapped embeddings
    are no longer resident; rows written before (not the file's contents) keep their values."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fabricq.calibration.loop import CalibrationLoop
    from fabricq.models import ModelSource, load_model

    config = LlamaConfig(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    model = load_model(ModelSource(tmp_path), "float32")
    embedding = model.get_input_embeddings().weight
    saved = embedding.detach().clone()
    with torch.no_grad():
        embedding[3].fill_(7.0)  # a change made in memory before calibration
    saved[3] = 7.0
    assert _resident_pages(embedding) > 0
    samples = torch.randint(0, 8192, (4, 16), generator=torch.Generator().manual_seed(0))
    loop = CalibrationLoop(model, samples, device="cpu", batch_size=2, callbacks=[])
    stage = loop.capture()
    assert len(stage) == 2
    assert _resident_pages(embedding) <= 2  # only the written page (and a shared edge) stay
    assert torch.equal(embedding, saved)


# Where glibc places an 8 MiB tensor allocated after another was freed, before, inside and after
# `reusing_freed_blocks`: glibc's own count of bytes in mmapped blocks (mallinfo2's hblkhd) says
# whether it got its own mapping or came from the heap. That is the policy itself, which page-fault
# or timing counts only show through the kernel's huge pages and whatever else runs on the machine.
REUSE = textwrap.dedent("""
    import ctypes, torch
    from fabricq.sysmem import return_large_blocks_to_os, reusing_freed_blocks

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    assert return_large_blocks_to_os()

    def mapped_by_second():
        torch.ones(2 << 20, dtype=torch.float32).add_(1)  # 8 MiB, freed at once
        before = libc.mallinfo2().hblkhd
        kept = torch.ones(2 << 20, dtype=torch.float32)  # the next window's temporary
        return libc.mallinfo2().hblkhd - before

    first = mapped_by_second()
    with reusing_freed_blocks():
        inside = mapped_by_second()
    print(first, inside, mapped_by_second())
""")


@pytest.mark.skipif(_glibc() is None, reason="the heap policy only exists for glibc")
def test_reusing_freed_blocks_serves_repeated_temporaries_from_the_heap_then_restores_the_policy():
    out = subprocess.run([sys.executable, "-c", REUSE], capture_output=True, text=True, check=True,
                         env={**os.environ, "THP_MEM_ALLOC_ENABLE": "0"})
    first, inside, after = (int(v) for v in out.stdout.split())
    block = 8 << 20
    assert first >= block  # the compact policy maps each 8 MiB block on its own
    assert inside == 0  # inside, the freed block's heap memory serves the next one
    assert after >= block  # the policy is back on leaving
