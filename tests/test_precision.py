"""fabricq.precision: host detection, the cached rate measurement, the forward-dtype choice (with
faked rates and CPU flags for both kinds of host), and bf16 Gram products for the Hessian."""

from __future__ import annotations

import json

import pytest
import torch

from fabricq import precision
from fabricq.precision import (
    MIN_BF16_SPEEDUP,
    bf16_products_pay,
    cached_matmul_rates,
    choose_forward_dtype,
    cpu_flags,
    cpu_model,
    decide_precision,
    measure_matmul_rates,
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
# The measurements: a 4096×512 @ 512×1536 product per core on an AVX-512 BF16 host, and
# an AVX2-only host where bf16 is emulated.
NATIVE_RATES = {"float32": 87e9, "bfloat16": 214e9}
EMULATED_RATES = {"float32": 90e9, "bfloat16": 2.5e9}


@pytest.fixture(autouse=True)
def products_off():
    """The bf16-products switch is process-wide: every test starts and ends with it off."""
    enable_bf16_products(False)
    yield
    enable_bf16_products(False)


def no_measurement():
    raise AssertionError("nothing should be measured here")


# ---------------------------------------------------------------- host detection


def test_flags_and_model_of_each_kind_of_host():
    assert native_bf16_flags(cpu_flags(AVX2_CPUINFO)) == []
    assert "avx2" in cpu_flags(AVX2_CPUINFO) and cpu_model(AVX2_CPUINFO) == "AMD EPYC"
    assert native_bf16_flags(cpu_flags(AVX512_BF16_CPUINFO)) == ["avx512_bf16"]
    assert cpu_model(AVX512_BF16_CPUINFO).startswith("Intel(R) Xeon(R) Platinum 8375C")
    assert native_bf16_flags(cpu_flags(ARM_CPUINFO)) == ["bf16"]
    assert cpu_model(ARM_CPUINFO) == "0xd40"
    assert cpu_flags("") == frozenset()


def test_this_host_never_runs_bf16_without_native_flags(tmp_path):
    """On this very host: where /proc/cpuinfo shows no native bf16 (AVX2-only), auto keeps
    float32, Hessians convert, and nothing is measured."""
    info = precision.read_cpuinfo()
    if native_bf16_flags(cpu_flags(info)):
        pytest.skip("this host has native bf16 flags")
    choice = decide_precision("auto", "float32", True, directory=tmp_path, measure=no_measurement)
    assert (choice.forward_dtype, choice.bf16_hessian_products, choice.native_bf16) == ("float32", False, False)
    assert choice.rates is None and not (tmp_path / "precision").exists()


# ---------------------------------------------------------------- the choice (pure)


@pytest.mark.parametrize(("source", "rates", "quality_ok", "requested", "native", "expected"), [
    # AVX2-only: never bf16, whatever a (mis)measurement says.
    ("float32", {"float32": 1e9, "bfloat16": 100e9}, True, "auto", False, "float32"),
    ("float32", EMULATED_RATES, True, "auto", False, "float32"),
    # Native bf16, measured faster: a float32 source runs bf16.
    ("float32", NATIVE_RATES, True, "auto", True, "bfloat16"),
    # Native flags but bf16 not clearly faster, or not measured, or full precision asked for.
    ("float32", {"float32": 100e9, "bfloat16": 120e9}, True, "auto", True, "float32"),
    ("float32", None, True, "auto", True, "float32"),
    ("float32", NATIVE_RATES, False, "auto", True, "float32"),
    # Reduced-precision sources stay as saved; an unknown one is left to the loader.
    ("bfloat16", EMULATED_RATES, True, "auto", False, "bfloat16"),
    ("float16", NATIVE_RATES, True, "auto", True, "float16"),
    (None, NATIVE_RATES, True, "auto", True, "auto"),
    # An explicit model.dtype is obeyed.
    ("float32", NATIVE_RATES, True, "float32", True, "float32"),
    ("float32", EMULATED_RATES, True, "bfloat16", False, "bfloat16"),
])
def test_choose_forward_dtype(source, rates, quality_ok, requested, native, expected):
    dtype, reason = choose_forward_dtype(source, rates, quality_ok, requested=requested, native=native)
    assert dtype == expected and reason


def test_threshold_is_inclusive_and_ratio_is_in_the_reason():
    at = {"float32": 100e9, "bfloat16": 100e9 * MIN_BF16_SPEEDUP}
    below = {"float32": 100e9, "bfloat16": 100e9 * MIN_BF16_SPEEDUP * 0.9}
    assert choose_forward_dtype("float32", at, True, native=True)[0] == "bfloat16"
    dtype, reason = choose_forward_dtype("float32", below, True, native=True)
    assert dtype == "float32" and f"{MIN_BF16_SPEEDUP * 0.9:.2f}x" in reason
    assert bf16_products_pay(at, True) and not bf16_products_pay(below, True)
    assert not bf16_products_pay(NATIVE_RATES, False) and not bf16_products_pay(None, True)
    assert not bf16_products_pay({"float32": 0.0, "bfloat16": 1e9}, True)


# ---------------------------------------------------------------- decide: detection + cache + choice


def test_decide_on_an_avx2_host_measures_nothing(tmp_path):
    choice = decide_precision("auto", "float32", True, cpuinfo=AVX2_CPUINFO, directory=tmp_path,
                              measure=no_measurement, kernels=lambda: True)
    assert (choice.forward_dtype, choice.bf16_hessian_products) == ("float32", False)
    report = choice.report()
    assert report["rates"] is None and report["native_flags"] == [] and report["bf16_speedup"] is None
    json.dumps(report)  # goes into report.json as it is


def test_decide_on_a_native_host_measures_once_then_reads_the_cache(tmp_path):
    calls = []

    def measure():
        calls.append(1)
        return dict(NATIVE_RATES)

    first = decide_precision("auto", "float32", True, cpuinfo=AVX512_BF16_CPUINFO, directory=tmp_path,
                             measure=measure, kernels=lambda: True)
    assert (first.forward_dtype, first.bf16_hessian_products, first.rates_cached) == ("bfloat16", True, False)
    assert first.report()["bf16_speedup"] == pytest.approx(214 / 87)
    again = decide_precision("auto", "float32", True, cpuinfo=AVX512_BF16_CPUINFO, directory=tmp_path,
                             measure=no_measurement, kernels=lambda: True)
    assert (again.forward_dtype, again.rates, again.rates_cached) == ("bfloat16", NATIVE_RATES, True)
    assert calls == [1]
    # A bf16 checkpoint runs as saved, with bf16 Hessian products; float64 Hessians keep float32 forwards.
    saved_bf16 = decide_precision("auto", "bfloat16", True, cpuinfo=AVX512_BF16_CPUINFO, directory=tmp_path,
                                  measure=no_measurement, kernels=lambda: True)
    assert (saved_bf16.forward_dtype, saved_bf16.bf16_hessian_products) == ("bfloat16", True)
    careful = decide_precision("auto", "float32", False, cpuinfo=AVX512_BF16_CPUINFO, directory=tmp_path,
                               measure=no_measurement, kernels=lambda: True)
    assert (careful.forward_dtype, careful.bf16_hessian_products) == ("float32", False)


def test_flags_without_torch_kernels_are_not_native(tmp_path):
    choice = decide_precision("auto", "float32", True, cpuinfo=AVX512_BF16_CPUINFO, directory=tmp_path,
                              measure=no_measurement, kernels=lambda: False)
    assert (choice.forward_dtype, choice.native_bf16, choice.native_flags) == ("float32", False, ("avx512_bf16",))


def test_slow_bf16_despite_the_flags_keeps_float32_and_converts_for_hessians(tmp_path):
    """The flags only allow bf16; the measured rates have the last word. model.dtype=bfloat16 is
    obeyed even then, but its Hessians convert to float32 instead of using slow bf16 products."""
    slow = {"measure": lambda: dict(EMULATED_RATES), "kernels": lambda: True, "cpuinfo": AVX512_BF16_CPUINFO}
    auto = decide_precision("auto", "float32", True, directory=tmp_path, **slow)
    assert (auto.forward_dtype, auto.bf16_hessian_products, auto.rates) == ("float32", False, EMULATED_RATES)
    asked = decide_precision("bfloat16", None, True, directory=tmp_path, **slow)
    assert (asked.forward_dtype, asked.bf16_hessian_products) == ("bfloat16", False)


def test_cache_is_keyed_by_threads_and_torch(tmp_path, monkeypatch):
    measured = []

    def measure():
        measured.append(1)
        return {"float32": 1e9 * len(measured), "bfloat16": 2e9}

    rates, cached = cached_matmul_rates(AVX512_BF16_CPUINFO, 1, tmp_path, measure)
    assert not cached and cached_matmul_rates(AVX512_BF16_CPUINFO, 1, tmp_path, no_measurement) == (rates, True)
    assert cached_matmul_rates(AVX512_BF16_CPUINFO, 2, tmp_path, measure)[1] is False  # other threads
    assert cached_matmul_rates(ARM_CPUINFO, 1, tmp_path, measure)[1] is False  # other CPU
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert cached_matmul_rates(AVX512_BF16_CPUINFO, 1, tmp_path, measure)[1] is False  # other torch
    assert len(measured) == 4
    files = list((tmp_path / "precision").iterdir())
    assert len(files) == 4 and not [f for f in files if f.name.startswith(".partial")]


def test_corrupt_or_unwritable_cache_only_costs_a_measurement(tmp_path, monkeypatch):
    cached_matmul_rates(AVX2_CPUINFO, 1, tmp_path, lambda: dict(NATIVE_RATES))
    (entry,) = (tmp_path / "precision").iterdir()
    entry.write_text("{not json")
    assert cached_matmul_rates(AVX2_CPUINFO, 1, tmp_path, lambda: dict(EMULATED_RATES)) == (EMULATED_RATES, False)
    assert json.loads(entry.read_text())["rates"] == EMULATED_RATES  # rewritten whole
    entry.write_text(json.dumps({"key": json.loads(entry.read_text())["key"], "rates": {"float32": -1}}))
    assert cached_matmul_rates(AVX2_CPUINFO, 1, tmp_path, lambda: dict(NATIVE_RATES))[1] is False
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the cache folder would go
    assert cached_matmul_rates(AVX2_CPUINFO, 1, blocker, lambda: dict(NATIVE_RATES)) == (NATIVE_RATES, False)
    monkeypatch.setenv("FABRICQ_CACHE", str(tmp_path / "env"))
    cached_matmul_rates(AVX2_CPUINFO, 1, None, lambda: dict(NATIVE_RATES))
    assert len(list((tmp_path / "env" / "precision").iterdir())) == 1


def test_measure_matmul_rates_times_both_dtypes():
    rates = measure_matmul_rates(shape=(64, 32, 48), seconds=0.02, rounds=1)
    assert set(rates) == {"float32", "bfloat16"} and all(r > 0 for r in rates.values())


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
    monkeypatch.setenv("FABRICQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(precision, "read_cpuinfo", lambda: AVX2_CPUINFO)
    monkeypatch.setattr(precision, "measure_matmul_rates", no_measurement)
    report = _run(shared_path, tmp_path)["precision"]
    assert (report["forward_dtype"], report["model_dtype"], report["bf16_hessian_products"]) == (
        "float32", "float32", False)
    assert report["source_dtype"] == "float32" and report["rates"] is None and not bf16_products_enabled()


def test_run_on_a_faked_native_host_forwards_in_bf16(shared_path, tmp_path, monkeypatch):
    """stories260k is saved in float32: with native bf16 measured faster, auto loads it in bf16
    and its Hessians use bf16 products; `quant.hessian_dtype=float64` keeps float32."""
    monkeypatch.setenv("FABRICQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(precision, "read_cpuinfo", lambda: AVX512_BF16_CPUINFO)
    monkeypatch.setattr(precision, "torch_bf16_kernels", lambda: True)
    monkeypatch.setattr(precision, "measure_matmul_rates", lambda: dict(NATIVE_RATES))
    seen = []
    original_add = HessianAccumulator.add
    monkeypatch.setattr(HessianAccumulator, "add", lambda self, x: (seen.append(x.dtype), original_add(self, x)))
    result = _run(shared_path, tmp_path)
    report = result["precision"]
    assert (report["forward_dtype"], report["model_dtype"], report["bf16_hessian_products"]) == (
        "bfloat16", "bfloat16", True)
    assert report["rates"] == NATIVE_RATES and report["native_flags"] == ["avx512_bf16"]
    assert set(seen) == {torch.bfloat16} and result["modules"]
    seen.clear()
    careful = _run(shared_path, tmp_path, "quant.hessian_dtype=float64", "overwrite=true")["precision"]
    assert (careful["forward_dtype"], careful["bf16_hessian_products"], careful["rates_cached"]) == (
        "float32", False, True)
    assert set(seen) == {torch.float32}


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
    monkeypatch.setenv("FABRICQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(precision, "read_cpuinfo", lambda: AVX2_CPUINFO)
    seen = []
    original_add = HessianAccumulator.add
    monkeypatch.setattr(HessianAccumulator, "add", lambda self, x: (seen.append(x.dtype), original_add(self, x)))
    calib = shared_path("data", "tinystories-sample.txt")
    report = run_app(f"model.path={folder}", f"data.path={calib}", *RUN, f"output_dir={tmp_path / 'out'}")
    assert (report["precision"]["forward_dtype"], report["precision"]["model_dtype"]) == ("bfloat16", "bfloat16")
    assert report["precision"]["bf16_hessian_products"] is False and set(seen) == {torch.bfloat16}
    assert len(report["modules"]) == 2 * 7
