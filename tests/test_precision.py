"""fabricq.precision: host detection, the forward-dtype choice (with faked CPU flags for every kind
of host), and bf16 Gram products for the Hessian."""

from __future__ import annotations

import json

import pytest
import torch

from fabricq import precision
from fabricq.precision import (
    bf16_products_used,
    choose_forward_dtype,
    cpu_flags,
    cpu_model,
    decide_precision,
    native_bf16_flags,
)
from fabricq.quant.gram import (
    accumulate_gram,
    bf16_products_enabled,
    enable_bf16_products,
)
from fabricq.quant.hessian import HessianAccumulator

# An AVX2-only AMD EPYC (this project's build hosts) and an AVX-512 BF16 Xeon, as /proc/cpuinfo
# shows them; an Arm Neoverse V1 (Features line).
AVX2_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni vaes vpclmulqdq
"""
AVX512_BF16_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags\t\t: fpu sse sse2 avx avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16 amx_tile
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes sha1 sha2 crc32 atomics fphp asimdhp cpuid sve bf16 i8mm
CPU part\t: 0xd40
"""
@pytest.fixture(autouse=True)
def products_off():
    """The bf16-products switch is process-wide: every test starts and ends with it off."""
    enable_bf16_products(False)
    yield
    enable_bf16_products(False)


# ---------------------------------------------------------------- host detection


def test_flags_and_model_of_each_kind_of_host():
    assert native_bf16_flags(cpu_flags(AVX2_CPUINFO)) == []
    assert "avx2" in cpu_flags(AVX2_CPUINFO) and cpu_model(AVX2_CPUINFO) == "AMD EPYC"
    assert native_bf16_flags(cpu_flags(AVX512_BF16_CPUINFO)) == ["avx512_bf16"]
    assert cpu_model(AVX512_BF16_CPUINFO).startswith("Intel(R) Xeon(R) Platinum 8375C")
    assert native_bf16_flags(cpu_flags(ARM_CPUINFO)) == ["bf16"]
    assert cpu_model(ARM_CPUINFO) == "0xd40"
    assert cpu_flags("") == frozenset()


def test_this_host_decides_from_its_own_flags():
    """On this very host, whatever kind it is: auto keeps a float32 model float32; an explicit bf16
    request uses bf16 products exactly where /proc/cpuinfo shows native bf16 (and torch has the
    kernels), so an AVX2-only host converts its activations instead."""
    info = precision.read_cpuinfo()
    native = bool(native_bf16_flags(cpu_flags(info))) and precision.torch_bf16_kernels()
    assert decide_precision("auto", "float32").forward_dtype == "float32"
    choice = decide_precision("bfloat16", "float32")
    assert (choice.forward_dtype, choice.bf16_hessian_products, choice.native_bf16) == ("bfloat16", native, native)


# ---------------------------------------------------------------- the choice (pure)


@pytest.mark.parametrize(("source", "requested", "expected"), [
    # auto keeps the saved dtype: a float32 model keeps float32's quality on every host.
    ("float32", "auto", "float32"),
    ("bfloat16", "auto", "bfloat16"),
    ("float16", "auto", "float16"),
    (None, "auto", "auto"),  # unknown: left to the loader
    # An explicit model.dtype is obeyed.
    ("float32", "bfloat16", "bfloat16"),
    ("bfloat16", "float32", "float32"),
    (None, "float16", "float16"),
])
def test_choose_forward_dtype(source, requested, expected):
    dtype, reason = choose_forward_dtype(source, requested=requested)
    assert dtype == expected and reason


@pytest.mark.parametrize(("forward", "hessian", "native", "expected"), [
    ("bfloat16", "float32", True, True),
    ("bfloat16", "float32", False, False),  # emulated bf16: convert instead
    ("bfloat16", "float64", True, False),  # float64 Hessians always convert
    ("float32", "float32", True, False),
    ("auto", "float32", True, False),  # unknown saved dtype: the safe side
])
def test_bf16_products_only_for_bf16_forwards_with_float32_sums_on_native_hosts(forward, hessian, native, expected):
    assert bf16_products_used(forward, hessian, native) is expected


# ---------------------------------------------------------------- decide: flags + choice


CPUINFOS = {"avx2": AVX2_CPUINFO, "avx512_bf16": AVX512_BF16_CPUINFO, "arm_bf16": ARM_CPUINFO}


@pytest.mark.parametrize("host", sorted(CPUINFOS))
def test_auto_keeps_a_float32_model_float32_on_every_host(host):
    choice = decide_precision("auto", "float32", cpuinfo=CPUINFOS[host], kernels=lambda: True)
    assert (choice.forward_dtype, choice.bf16_hessian_products) == ("float32", False)
    assert choice.native_bf16 is (host != "avx2")
    report = choice.report()
    assert report["native_flags"] == native_bf16_flags(cpu_flags(CPUINFOS[host]))
    json.dumps(report)  # goes into report.json as it is


def test_explicit_bf16_uses_bf16_products_only_on_native_hosts():
    native = decide_precision("bfloat16", "float32", cpuinfo=AVX512_BF16_CPUINFO, kernels=lambda: True)
    assert (native.forward_dtype, native.bf16_hessian_products, native.reason) == ("bfloat16", True, "model.dtype")
    emulated = decide_precision("bfloat16", "float32", cpuinfo=AVX2_CPUINFO, kernels=lambda: True)
    assert (emulated.forward_dtype, emulated.bf16_hessian_products) == ("bfloat16", False)
    saved_bf16 = decide_precision("auto", "bfloat16", cpuinfo=ARM_CPUINFO, kernels=lambda: True)
    assert (saved_bf16.forward_dtype, saved_bf16.bf16_hessian_products) == ("bfloat16", True)
    careful = decide_precision("auto", "bfloat16", "float64", cpuinfo=ARM_CPUINFO, kernels=lambda: True)
    assert (careful.forward_dtype, careful.bf16_hessian_products) == ("bfloat16", False)


def test_flags_without_torch_kernels_are_not_native():
    choice = decide_precision("bfloat16", "float32", cpuinfo=AVX512_BF16_CPUINFO, kernels=lambda: False)
    assert (choice.bf16_hessian_products, choice.native_bf16, choice.native_flags) == (False, False, ("avx512_bf16",))


def test_the_decision_times_nothing_so_load_cannot_flip_it(monkeypatch):
    """Same host, same command, same decision, whatever runs beside it: nothing is timed (a clock
    that jumps between calls, as a busy core makes it, changes nothing) and nothing is cached."""
    import time

    ticks = iter(range(0, 10**6, 7919))
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(ticks)))
    monkeypatch.setattr(time, "monotonic", lambda: float(next(ticks)))
    monkeypatch.setattr(torch, "mm", lambda *a, **k: pytest.fail("the decision must not time products"))
    decisions = {decide_precision("auto", "float32", cpuinfo=AVX512_BF16_CPUINFO, kernels=lambda: True)
                 for _ in range(3)}
    assert len(decisions) == 1 and next(iter(decisions)).forward_dtype == "float32"


def test_forward_dtype_is_part_of_the_resume_identity():
    f32 = decide_precision("auto", "float32", cpuinfo=AVX512_BF16_CPUINFO, kernels=lambda: True)
    bf16 = decide_precision("bfloat16", "float32", cpuinfo=AVX512_BF16_CPUINFO, kernels=lambda: True)
    converted = decide_precision("bfloat16", "float32", cpuinfo=AVX2_CPUINFO, kernels=lambda: True)
    assert len({json.dumps(c.identity(), sort_keys=True) for c in (f32, bf16, converted)}) == 3


# ---------------------------------------------------------------- Gram products


def _activations(tokens, columns, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(columns, generator=g) * 3 + 0.1
    scale[1] = 40.0  # one outlier channel, as real activations have
    return ((torch.randn(tokens, columns, generator=g) + 0.5) * scale).to(dtype)


def test_float_inputs_are_exactly_addmm():
    x = _activations(70, 40, torch.float32)
    out = torch.randn(40, 40)
    expected = out.clone().addmm_(x.T, x)
    accumulate_gram(out, x)
    assert torch.equal(out, expected)


def test_bf16_product_matches_the_float32_converted_one():
    """One call: the float32-converted product (exact products, float32 sums) and the bf16 one
    differ by the bf16 rounding of the result (≤ 2⁻⁸ of each element) and float32 summation order."""
    x = _activations(300, 48)
    start = torch.randn(48, 48)
    out = start.clone()
    accumulate_gram(out, x)
    reference = x.float().T @ x.float()
    magnitude = x.float().abs().T @ x.float().abs()
    assert out.dtype == torch.float32
    assert ((out - start - reference).abs() <= 2 ** -8 * reference.abs() + 1e-5 * magnitude).all()
    assert not torch.equal(out - start, reference)  # it really went through bf16 (sanity of the test)


def test_bf16_product_into_a_strip_and_with_two_operands():
    x = _activations(64, 32)
    out = torch.zeros(32, 32)
    accumulate_gram(out[8:, 8:16], x[:, 8:], x[:, 8:16])
    reference = x.float()[:, 8:].T @ x.float()[:, 8:16]
    torch.testing.assert_close(out[8:, 8:16], reference, rtol=2 ** -8, atol=1e-4)
    assert out[:8].abs().sum() == 0 and out[:, :8].abs().sum() == 0 and out[:, 16:].abs().sum() == 0


def test_bf16_into_float64_converts():
    x = _activations(50, 20)
    out = torch.zeros(20, 20, dtype=torch.float64)
    accumulate_gram(out, x)
    assert torch.equal(out, x.double().T @ x.double())  # bf16 products are exact in float64


@pytest.mark.parametrize("columns", [48, 300])  # one product, and column strips (≥ 256)
def test_hessian_from_bf16_activations(columns):
    batches = [_activations(n, columns, seed=i) for i, n in enumerate((37, 128, 5))]
    converted, native = HessianAccumulator(columns), HessianAccumulator(columns)
    for b in batches:
        converted.add(b)
    enable_bf16_products(True)
    for b in batches:
        native.add(b)
    x = torch.cat(batches).double()
    exact = x.T @ x / x.shape[0]
    assert native.tokens == converted.tokens == x.shape[0]
    # Converting is exact up to float32 sums; bf16 products round each batch's product once.
    torch.testing.assert_close(converted.mean().double(), exact, rtol=1e-6, atol=1e-6 * exact.abs().max().item())
    error = (native.mean().double() - exact).norm() / exact.norm()
    assert 0 < error < 2 ** -8
    assert torch.equal(native.mean(), native.mean().T)


def test_switch_leaves_float_inputs_and_float64_sums_alone():
    x32 = _activations(90, 300, torch.float32)
    x16 = _activations(90, 300)
    off32, off64 = HessianAccumulator(300), HessianAccumulator(300, torch.float64)
    off32.add(x32)
    off64.add(x16)
    enable_bf16_products(True)
    assert bf16_products_enabled()
    on32, on64 = HessianAccumulator(300), HessianAccumulator(300, torch.float64)
    on32.add(x32)
    on64.add(x16)
    assert torch.equal(on32.sum, off32.sum) and torch.equal(on64.sum, off64.sum)
    # and without the switch a bf16 batch is today's conversion to float32
    enable_bf16_products(False)
    off16, as32 = HessianAccumulator(300), HessianAccumulator(300)
    off16.add(x16)
    as32.add(x16.float())
    assert torch.equal(off16.sum, as32.sum)


# ---------------------------------------------------------------- the run


RUN = ["data.num_samples=4", "data.seq_len=32", "data.batch_size=2", "eval.enabled=false"]


def _run(shared_path, tmp_path, *extra):
    from in_process import run_app

    model = shared_path("models", "stories260k")
    calib = shared_path("data", "tinystories-sample.txt")
    return run_app(f"model.path={model}", f"data.path={calib}", *RUN, *extra, f"output_dir={tmp_path / 'out'}")


def test_run_reports_its_precision_on_an_avx2_host(shared_path, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "read_cpuinfo", lambda: AVX2_CPUINFO)
    report = _run(shared_path, tmp_path)["precision"]
    assert (report["forward_dtype"], report["model_dtype"], report["bf16_hessian_products"]) == (
        "float32", "float32", False)
    assert report["source_dtype"] == "float32" and not bf16_products_enabled()


def test_run_on_a_faked_native_host_keeps_float32_unless_bf16_is_asked(shared_path, tmp_path, monkeypatch):
    """stories260k is saved in float32: on a native-bf16 host auto keeps it float32; with
    model.dtype=bfloat16 it runs bf16 and its Hessians use bf16 products; `quant.hessian_dtype=float64`
    converts them."""
    monkeypatch.setattr(precision, "read_cpuinfo", lambda: AVX512_BF16_CPUINFO)
    monkeypatch.setattr(precision, "torch_bf16_kernels", lambda: True)
    seen = []
    original_add = HessianAccumulator.add
    monkeypatch.setattr(HessianAccumulator, "add", lambda self, x: (seen.append(x.dtype), original_add(self, x)))
    report = _run(shared_path, tmp_path)["precision"]
    assert (report["forward_dtype"], report["model_dtype"], report["bf16_hessian_products"]) == (
        "float32", "float32", False)
    assert set(seen) == {torch.float32}
    seen.clear()
    result = _run(shared_path, tmp_path, "model.dtype=bfloat16", "overwrite=true")
    report = result["precision"]
    assert (report["forward_dtype"], report["model_dtype"], report["bf16_hessian_products"]) == (
        "bfloat16", "bfloat16", True)
    assert report["native_flags"] == ["avx512_bf16"]
    assert set(seen) == {torch.bfloat16} and result["modules"]
    careful = _run(shared_path, tmp_path, "model.dtype=bfloat16", "quant.hessian_dtype=float64",
                   "overwrite=true")["precision"]
    assert (careful["forward_dtype"], careful["bf16_hessian_products"]) == ("bfloat16", False)


def test_benchmark_random_llama_is_a_bf16_model_fabricq_runs_as_saved(shared_path, tmp_path, monkeypatch):
    """compare_llmcompressor.py --random-llama's model: saved in bf16, checked and loaded by fabricq
    as any checkpoint, calibrated in bf16 (as saved) with float32 Hessians on this host."""
    import importlib.util

    from conftest import REPO_ROOT
    from in_process import run_app
    from transformers import AutoTokenizer

    from fabricq.models import ModelSource, check_model_files, saved_dtype

    spec = importlib.util.spec_from_file_location("compare_llmcompressor", REPO_ROOT / "benchmarks" / "compare_llmcompressor.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.parse_llama_shape("8x512") == (8, 512)
    tokenizer = AutoTokenizer.from_pretrained(shared_path("models", "stories260k"))
    folder = bench.build_random_llama(tmp_path / "llama", tokenizer, 2, 64, torch.bfloat16)
    config = check_model_files(ModelSource(folder))
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (2, 64, 256)
    assert saved_dtype(ModelSource(folder)) == "bfloat16"
    monkeypatch.setattr(precision, "read_cpuinfo", lambda: AVX2_CPUINFO)
    seen = []
    original_add = HessianAccumulator.add
    monkeypatch.setattr(HessianAccumulator, "add", lambda self, x: (seen.append(x.dtype), original_add(self, x)))
    calib = shared_path("data", "tinystories-sample.txt")
    report = run_app(f"model.path={folder}", f"data.path={calib}", *RUN, f"output_dir={tmp_path / 'out'}")
    assert (report["precision"]["forward_dtype"], report["precision"]["model_dtype"]) == ("bfloat16", "bfloat16")
    assert report["precision"]["bf16_hessian_products"] is False and set(seen) == {torch.bfloat16}
    assert len(report["modules"]) == 2 * 7
