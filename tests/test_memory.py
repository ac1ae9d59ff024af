"""The heap policy: freed large tensors leave the process's resident memory at once."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from fabricq.memory import _glibc

# Big temporaries freed between small results that stay alive: the pattern of packing every
# module for export (and of each calibrated layer). Prints RssAnon growth and the live MiB kept.
PATTERN = textwrap.dedent("""
    import sys, torch
    from fabricq.memory import return_large_blocks_to_os
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
    from fabricq.memory import huge_pages_for_large_tensors
    in_effect = huge_pages_for_large_tensors()
    import torch
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 << 20, dtype=torch.float32)
    print(in_effect, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _thp_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
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
    import fabricq.app
    from in_process import run_app

    calls = []
    monkeypatch.setattr(fabricq.app, "return_large_blocks_to_os", lambda: calls.append("policy") or True)

    def stop(*args, **kwargs):
        raise RuntimeError("stop here")

    monkeypatch.setattr(fabricq.app, "check_output_dir", stop)
    model = shared_path("models", "stories260k")
    with pytest.raises(RuntimeError, match="stop here"):
        run_app("+recipe=gptq_w4", f"model.path={model}", f"cache.heap={heap}", f"output_dir={tmp_path / 'out'}")
    assert calls == (["policy"] if applied else [])
