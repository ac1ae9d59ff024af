"""fabricq vs llm-compressor: GPTQ W4A16 on the same model and the same calibration tokens.

    python benchmarks/compare_llmcompressor.py                       # 128 × 512 tokens, A B A B
    python benchmarks/compare_llmcompressor.py --repeats 1 --max-windows 8
    python benchmarks/compare_llmcompressor.py --num-samples 16 --repeats 1 --max-windows 2  # quick
    python benchmarks/compare_llmcompressor.py --dtype bfloat16       # the default model, saved in bf16
    python benchmarks/compare_llmcompressor.py --random-llama --num-samples 64 --seq-len 512  # 8 × 512 bf16 Llama

One invocation: tokenizes the calibration text once (with fabricq's own data code and config,
so it is exactly the windows `python -m fabricq` draws; fabricq's report fingerprints them and the
script checks the fingerprint), hands the same ids to llm-compressor, then runs both tools as
subprocesses with OMP_NUM_THREADS=--threads, repeats interleaved (llm-compressor, fabricq, ...).
Each run's wall time is measured around the whole process (imports, load, calibration, solves,
writing the compressed checkpoint) and its peak RSS comes from the kernel (wait4). Afterwards
the last checkpoint of each tool is read back with the SAME reader
(`fabricq.checkpoint.compressed_tensors.load_dequantized_state_dict`, dense dequantized weights) and evaluated with the
SAME evaluator (`fabricq.evaluate`) on WikiText-2 test windows, so perplexities are comparable.

llm-compressor pins transformers<=5.17 and compressed-tensors==0.19.0, so it lives in its own
virtual environment, created on first use in benchmarks/.venv-llmcompressor (gitignored):
`python -m venv DIR && DIR/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1`.

Model dtype: `--dtype bfloat16` (or float32) saves a copy of the model in that dtype to a
temporary folder, which both tools then load as saved (fabricq's model.dtype=auto, the peer's
dtype="auto"). `--random-llama [LAYERSxHIDDEN]` builds a random-initialised Llama-architecture
model instead (default 8x512: intermediate 4 × hidden, 64-wide heads, tied embeddings, the
default model's tokenizer and vocabulary, seed 0, bf16 unless --dtype says otherwise), also in
a temporary folder: nothing is downloaded. Perplexity is evaluated in float32 for every model and
checkpoint (an exact upcast of bf16 weights), so a CPU without native bf16 does not make the
untimed evaluation crawl. The JSON records the host's CPU flags and whether it computes bf16
natively (`fabricq.precision`).

Each finished run is appended to <out>/runs.jsonl at once: rerunning with the same --out resumes
an interrupted comparison without repeating its runs.

The FLOP floor: the script counts the floating-point work of fabricq's run (decoder forward
passes as fabricq runs them, Hessian products, GPTQ solves), measures this CPU's matrix-product
rate with the same thread count in float32 and bfloat16, and prints fabricq's time / floor.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DEFAULT_CALIB = SHARED / "c4-train-sample.jsonl"
DEFAULT_EVAL = SHARED / "wikitext-2-raw-test.txt"
DEFAULT_VENV = REPO / "benchmarks" / ".venv-llmcompressor"
PEER_RUNNER = REPO / "benchmarks" / "llmcompressor_runner.py"
PEER_REQUIREMENTS = ["torch==2.13.0", "llmcompressor==0.14.0.1"]
sys.path.insert(0, str(REPO))  # this checkout's fabricq, as `python -m fabricq` from REPO runs


def _quantize_module():
    """benchmarks/quantize.py, for its machine description and Hydra quoting."""
    spec = importlib.util.spec_from_file_location("fabricq_bench_quantize", REPO / "benchmarks" / "quantize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH = _quantize_module()


# ---------------------------------------------------------------- the peer's environment


def ensure_peer_venv(venv: Path) -> Path:
    """The venv's python, creating and installing llm-compressor into it if needed."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import llmcompressor, torch; print(torch.__version__)"]
    if python.exists() and subprocess.run(probe, capture_output=True, check=False).returncode == 0:
        return python
    print(f"# creating {venv} (llm-compressor's own environment; takes a few minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", *PEER_REQUIREMENTS], check=True)
    subprocess.run(probe, check=True)
    return python


# ---------------------------------------------------------------- processes


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def run_measured(cmd: list[str], log_path: Path, threads: int, cwd: Path) -> dict:
    """Run `cmd` to completion; wall time around the process and its peak RSS from wait4."""
    print("$", " ".join(cmd), flush=True)
    with open(log_path, "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=child_env(threads), stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log_path.read_text().splitlines()[-15:]
        raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}; log {log_path}:\n" + "\n".join(tail))
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024, "cpu_s": usage.ru_utime + usage.ru_stime,
            "log": str(log_path)}


def fabricq_overrides(args, output_dir: Path | None = None) -> list[str]:
    q = BENCH.hydra_value
    result = [
        "recipe=gptq_w4",
        f"quant.group_size={args.group_size}",
        "quant.damp=0.01",
        "quant.block_size=128",
        "quant.actorder=static",
        f"data.path={q(Path(args.calib).resolve())}",
        f"data.num_samples={args.num_samples}",
        f"data.seq_len={args.seq_len}",
        f"data.batch_size={args.batch_size}",
        "eval.enabled=false",
        f"eval.seq_len={args.eval_seq_len}",
    ]
    if args.model:
        result.append(f"model.path={q(Path(args.model).resolve())}")
    result += args.fabricq_override  # e.g. quant.true_sequential=false (the two-forward mode)
    if output_dir is not None:
        result += [f"output_dir={q(output_dir)}", "overwrite=true"]
    return result


def run_fabricq(args, run_dir: Path, repeat: int) -> dict:
    out = run_dir / f"fabricq-{repeat}"
    cmd = [sys.executable, "-m", "fabricq", *fabricq_overrides(args, out)]
    result = run_measured(cmd, run_dir / f"fabricq-{repeat}.log", args.threads, REPO)
    report = json.loads((out / "report.json").read_text())
    result.update(tool="fabricq", repeat=repeat, checkpoint=str(out), calibration=report["calibration"],
                  timings=report["timings"], internal_wall_s=report["wall_s"])
    return result


def run_peer(args, python: Path, model_dir: Path, ids_path: Path, run_dir: Path, repeat: int) -> dict:
    out = run_dir / f"llmcompressor-{repeat}"
    result_path = run_dir / f"llmcompressor-{repeat}.json"
    cmd = [str(python), str(PEER_RUNNER), "--model", str(model_dir), "--ids", str(ids_path), "--out", str(out),
           "--result", str(result_path), "--group-size", str(args.group_size), "--batch-size", str(args.batch_size)]
    result = run_measured(cmd, run_dir / f"llmcompressor-{repeat}.log", args.threads, REPO)
    inner = json.loads(result_path.read_text())
    result.update(tool="llm-compressor", repeat=repeat, checkpoint=str(out), timings=inner["timings"],
                  internal_wall_s=inner["wall_s"], applied=inner["applied"], block_size=inner["block_size"],
                  dampening_frac=inner["dampening_frac"])
    return result


# ---------------------------------------------------------------- data and quality


def fabricq_config(args):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose("config", overrides=fabricq_overrides(args))


def fingerprint(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def check_peer_applied(applied: dict, group_size: int) -> list[str]:
    """Problems with what llm-compressor really applied (empty: W4 symmetric, group, static)."""
    problems = []
    for name, a in applied.items():
        if "lm_head" in name:
            problems.append(f"{name} was quantized")
        expected_groups = a["columns"] // group_size
        if (a["num_bits"], a["symmetric"], a["strategy"], a["group_size"], a["actorder"], a["scale_groups"]) != (
            4, True, "group", group_size, "static", expected_groups
        ):
            problems.append(f"{name}: {a}")
    return problems


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    from fabricq.evaluate import evaluate

    return evaluate(model, windows, torch.device("cpu"))["ppl"]


def load_checkpoint_into(model, checkpoint: Path) -> None:
    """Dense dequantized weights of a pack-quantized checkpoint into `model` (same reader for both)."""
    from fabricq.checkpoint.compressed_tensors import load_dequantized_state_dict

    tensors = load_dequantized_state_dict(checkpoint)
    state = model.state_dict()
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    missing = [n for n in linear if f"{n}.weight" not in tensors]
    if missing:
        raise RuntimeError(f"{checkpoint} lacks {len(missing)} Linear weights, e.g. {missing[:3]}")
    with torch.no_grad():
        for name in linear:
            state[f"{name}.weight"].copy_(tensors[f"{name}.weight"].to(state[f"{name}.weight"].dtype))


# ---------------------------------------------------------------- the model both tools quantize


def parse_llama_shape(text: str) -> tuple[int, int]:
    """"8x512" → (layers, hidden)."""
    try:
        layers, hidden = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LAYERSxHIDDEN, e.g. 8x512, got {text!r}") from None
    if layers < 1 or hidden < 64 or hidden % 64:
        raise argparse.ArgumentTypeError(f"need ≥ 1 layer and a hidden size that is a multiple of 64, got {text!r}")
    return layers, hidden


def build_random_llama(folder: Path, tokenizer, layers: int, hidden: int, dtype: torch.dtype, seed: int = 0) -> Path:
    """A random-initialised Llama-architecture model (transformers' own initialisation, `seed`)
    saved with `tokenizer` in `folder`: intermediate 4 × hidden, 64-wide heads (no grouped KV),
    tied embeddings, vocabulary of the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_in_dtype(source_folder: Path, folder: Path, dtype: torch.dtype) -> Path:
    """A copy of the Hugging Face model in `source_folder`, saved in `dtype`, with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source_folder, dtype=dtype)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source_folder).save_pretrained(folder)
    return folder


def host_precision() -> dict:
    """The host's CPU flags and what fabricq.precision makes of them (bf16 native or not)."""
    from fabricq.precision import (
        cpu_flags,
        native_bf16_flags,
        read_cpuinfo,
        torch_bf16_kernels,
    )

    flags = cpu_flags(read_cpuinfo())
    native = native_bf16_flags(flags)
    return {"cpu_flags": sorted(flags), "native_bf16_flags": native, "torch_bf16_kernels": torch_bf16_kernels(),
            "native_bf16": bool(native) and torch_bf16_kernels(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


# ---------------------------------------------------------------- the FLOP floor


def count_flops(model, samples: int, seq_len: int, true_sequential: bool = True) -> dict:
    """Floating-point work of fabricq's GPTQ run on `model` (multiply-add = 2 FLOPs).

    forward: per decoder layer, with `true_sequential` (fabricq's default) one gated forward of
    the whole layer (every Linear, plus attention with its causal half of QKᵀ and AV); else the
    calibration pass (every Linear but the last one, whose input is the last thing observed, plus
    attention) and the error-propagation pass (the whole layer; none after the last layer). hessian: one symmetric
    X·Xᵀ per distinct input of a layer (q/k/v share one, gate/up share one), counted as its
    triangle, the least any method must compute. solve: per module, the GPTQ column updates
    (rows·cols²) and the factorisations of the cols×cols Hessian (~cols³)."""
    from fabricq.models import decoder_layers, linear_modules

    layers = decoder_layers(model)
    config = model.config
    tokens = samples * seq_len
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    attention = 2 * 2 * heads * head_dim * samples * seq_len * seq_len / 2  # QKᵀ and AV, causal half
    forward = hessian = solve = 0.0
    for index, layer in enumerate(layers):
        modules = list(linear_modules(layer, str(index)).items())
        products = [2 * m.in_features * m.out_features * tokens for _, m in modules]
        if true_sequential:
            forward += sum(products) + attention
        else:
            calibration = sum(products[:-1]) + attention
            propagation = 0 if index == len(layers) - 1 else sum(products) + attention
            forward += calibration + propagation
        inputs = {}
        for name, m in modules:
            leaf = name.rsplit(".", 1)[-1]
            key = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gu", "up_proj": "gu"}.get(leaf, leaf)
            inputs[key] = m.in_features
        hessian += sum(tokens * c * (c + 1) for c in inputs.values())
        solve += sum(2 * m.out_features * m.in_features ** 2 + m.in_features ** 3 for _, m in modules)
    return {"forward": forward, "hessian": hessian, "solve": solve, "total": forward + hessian + solve}


def matmul_rate(dtype: torch.dtype, shapes, seconds: float = 1.0) -> float:
    """Measured FLOP/s of (m×k)·(k×n) products in `dtype` on the current thread count."""
    done, elapsed = 0.0, 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        a @ b  # warm-up
        reps, start = 0, time.perf_counter()
        while True:
            a @ b
            reps += 1
            if time.perf_counter() - start > seconds / len(shapes):
                break
        elapsed += time.perf_counter() - start
        done += reps * 2 * m * k * n
    return done / elapsed


def measure_rates(threads: int, hidden: int, intermediate: int) -> dict:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        f32_shapes = [(4096, hidden, hidden), (4096, hidden, intermediate), (hidden, 4096, hidden)]
        bf16_shapes = [(512, hidden, hidden)]  # small: bf16 may be emulated (slow) on CPUs without it
        return {"float32": matmul_rate(torch.float32, f32_shapes), "bfloat16": matmul_rate(torch.bfloat16, bf16_shapes)}
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------- report


def median(values):
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def load_average() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Hugging Face model folder (default: fabricq's default, SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default=None,
                   help="save the model in this dtype for both tools (default: as saved; bfloat16 with --random-llama)")
    p.add_argument("--random-llama", nargs="?", const="8x512", type=parse_llama_shape, metavar="LAYERSxHIDDEN",
                   help="quantize a random-initialised Llama of this shape (default 8x512) instead of --model")
    p.add_argument("--calib", default=str(DEFAULT_CALIB), help="calibration .jsonl (default: %(default)s)")
    p.add_argument("--eval", default=str(DEFAULT_EVAL), help="evaluation text (default: %(default)s)")
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward, both tools")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="runs per tool, interleaved A B A B")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    p.add_argument("--eval-seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=16, help="WikiText-2 windows evaluated (0: all)")
    p.add_argument("--eval-threads", type=int, default=os.cpu_count(), help="threads of the (untimed) evaluation")
    p.add_argument("--fabricq-override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra fabricq override (repeatable), e.g. quant.true_sequential=false")
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    p.add_argument("--out", type=Path, help="results JSON (default: benchmarks/results/compare_llmcompressor-<time>.json)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    for path, what in ((args.calib, "--calib"), (args.eval, "--eval")):
        if not Path(path).is_file():
            print(f"compare_llmcompressor: error: {what} {path} does not exist", file=sys.stderr)
            return 2
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = (args.out or REPO / "benchmarks" / "results" / f"compare_llmcompressor-{stamp}.json").resolve()
    run_dir = out.with_suffix("")
    run_dir.mkdir(parents=True, exist_ok=True)
    peer_python = ensure_peer_venv(args.venv)

    from fabricq.data import evaluation_windows, prepare_text, tokenize_stream
    from fabricq.models import (
        DTYPES,
        _materialise_gguf,
        load_model,
        load_tokenizer,
        resolve_model_source,
    )

    if args.random_llama and args.model:
        print("compare_llmcompressor: error: --random-llama builds its own model: drop --model", file=sys.stderr)
        return 2
    dtype = args.dtype or ("bfloat16" if args.random_llama else "auto")
    source = resolve_model_source(args.model)
    if source.gguf_file:
        source = _materialise_gguf(source)  # the peer needs a plain Hugging Face folder
    # Models built here live in a temporary folder for this invocation (rebuilt identically on resume).
    scratch = tempfile.TemporaryDirectory(prefix="fabricq-compare-model-")
    if args.random_llama:
        layers, hidden = args.random_llama
        label = f"random-llama-{layers}x{hidden}-{dtype}"
        folder = build_random_llama(Path(scratch.name) / label, load_tokenizer(source), layers, hidden, DTYPES[dtype])
        source = resolve_model_source(str(folder))
    elif dtype != "auto":
        label = f"{source.folder.name}-{dtype}"
        source = resolve_model_source(str(save_in_dtype(source.folder, Path(scratch.name) / label, DTYPES[dtype])))
    else:
        label = source.folder.name
    args.model = str(source.folder)  # both tools, and fabricq's overrides, read this folder
    tokenizer = load_tokenizer(source)
    cfg = fabricq_config(args)
    ids = prepare_text(tokenizer, cfg.data, cfg.eval).calibration
    ids_path = run_dir / "calibration_ids.pt"
    torch.save(ids, ids_path)
    digest = fingerprint(ids)

    machine = BENCH.machine_info(args.threads)
    machine.update(host_precision())
    machine["load_before"] = load_average()
    bf16_note = "native bf16" if machine["native_bf16"] else "NO native bf16 (bf16 is emulated here)"
    print(f"# {machine['cpu']} · {machine['logical_cores']} cores · {bf16_note} · {args.threads} thread(s) per run · "
          f"model {label} · calibration {tuple(ids.shape)} sha256 {digest[:12]} · load {machine['load_before']}",
          flush=True)

    # Every finished run is recorded at once in runs.jsonl, so an interrupted comparison resumes
    # (same --out and settings) without repeating the runs it has.
    record = run_dir / "runs.jsonl"
    done = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    if done and done[0].get("calibration_sha256") != digest:
        raise RuntimeError(f"{record} was measured on other calibration windows: use another --out")
    if done and done[0].get("model_label", label) != label:
        raise RuntimeError(f"{record} was measured on {done[0]['model_label']}, not {label}: use another --out")
    runs = []
    for repeat in range(args.repeats):
        for tool, run in (("llm-compressor", lambda repeat=repeat: run_peer(args, peer_python, source.folder, ids_path, run_dir, repeat)),
                          ("fabricq", lambda repeat=repeat: run_fabricq(args, run_dir, repeat))):
            previous = [r for r in done if r["tool"] == tool and r["repeat"] == repeat]
            if previous:
                runs.append(previous[0])
                print(f"  {tool:<14} #{repeat}: {runs[-1]['wall_s']:.1f} s (recorded in {record.name})", flush=True)
                continue
            runs.append(run())
            runs[-1]["calibration_sha256"] = digest
            runs[-1]["model_label"] = label
            runs[-1]["load_average"] = load_average()
            with open(record, "a") as handle:
                handle.write(json.dumps(runs[-1]) + "\n")
            print(f"  {tool:<14} #{repeat}: {runs[-1]['wall_s']:.1f} s, {runs[-1]['peak_rss_mib']:.0f} MiB", flush=True)
    load_after = load_average()

    fab = [r for r in runs if r["tool"] == "fabricq"]
    peer = [r for r in runs if r["tool"] == "llm-compressor"]
    if any(r["calibration"]["sha256"] != digest for r in fab):
        raise RuntimeError("fabricq calibrated on different token windows than llm-compressor")
    problems = check_peer_applied(peer[-1]["applied"], args.group_size)
    if problems:
        raise RuntimeError("llm-compressor did not apply W4 symmetric group static act-order: " + "; ".join(problems[:5]))

    # Quality: the same reader and evaluator for the original model and both checkpoints.
    torch.set_num_threads(args.eval_threads)
    eval_file = Path(args.eval)
    stream = tokenize_stream(tokenizer, [eval_file.read_text(encoding="utf-8")])
    windows = evaluation_windows(stream, args.eval_seq_len, args.max_windows or None)
    model = load_model(source, "float32")  # exact for bf16 weights; no emulated bf16 on CPUs without it
    ppl = {"original": perplexity(model, windows)}
    for tool, tool_runs in (("fabricq", fab), ("llm-compressor", peer)):
        load_checkpoint_into(model, Path(tool_runs[-1]["checkpoint"]))
        ppl[tool] = perplexity(model, windows)
        print(f"  perplexity {tool}: {ppl[tool]:.4f}", flush=True)

    # The floor.
    flops = count_flops(model, *ids.shape, true_sequential=bool(cfg.quant.true_sequential))
    rates = measure_rates(args.threads, model.config.hidden_size, model.config.intermediate_size)
    best_rate = max(rates.values())
    floor_s = flops["total"] / best_rate
    del model

    rows = []
    for tool, tool_runs in (("llm-compressor", peer), ("fabricq", fab)):
        rows.append({
            "tool": tool,
            "wall_s": median([r["wall_s"] for r in tool_runs]),
            "wall_runs": [round(r["wall_s"], 1) for r in tool_runs],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in tool_runs),
            "ppl": ppl[tool],
        })
    peer_row, fab_row = rows
    ratios = {
        "wall": fab_row["wall_s"] / peer_row["wall_s"],
        "wall_per_repeat": [f["wall_s"] / p["wall_s"] for f, p in zip(fab, peer)],
        "peak_rss": fab_row["peak_rss_mib"] / peer_row["peak_rss_mib"],
        "ppl": fab_row["ppl"] / peer_row["ppl"],
        "fabricq_over_floor": fab_row["wall_s"] / floor_s,
    }

    print()
    print(f"{'tool':<15} {'wall s (runs)':>24} {'peak RSS MiB':>13} {'WikiText-2 ppl':>15}")
    for row in rows:
        walls = ", ".join(f"{w:.1f}" for w in row["wall_runs"])
        print(f"{row['tool']:<15} {row['wall_s']:>8.1f} ({walls:>12}) {row['peak_rss_mib']:>13.0f} {row['ppl']:>15.4f}")
    print(f"{'original':<15} {'':>24} {'':>13} {ppl['original']:>15.4f}")
    print(f"\nfabricq / llm-compressor: wall ×{ratios['wall']:.3f} (per repeat "
          f"{', '.join(f'{r:.3f}' for r in ratios['wall_per_repeat'])}), peak RSS ×{ratios['peak_rss']:.3f}, "
          f"perplexity ×{ratios['ppl']:.4f}")
    print(f"work of fabricq's run: {flops['total'] / 1e12:.2f} TFLOP (forward {flops['forward'] / 1e12:.2f}, "
          f"Hessians {flops['hessian'] / 1e12:.2f}, solves {flops['solve'] / 1e12:.3f}); matrix products "
          f"{rates['float32'] / 1e9:.1f} GFLOP/s float32, {rates['bfloat16'] / 1e9:.1f} GFLOP/s bfloat16 "
          f"({args.threads} thread(s)); floor {floor_s:.1f} s; fabricq / floor ×{ratios['fabricq_over_floor']:.2f}")
    print(f"model {label}; this host: {bf16_note} (bf16 flags: {', '.join(machine['native_bf16_flags']) or 'none'}); "
          f"load average before {machine.get('load_before')} after {load_after}")

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {
        "settings": settings, "machine": machine, "model": label, "model_dtype": dtype,
        "calibration": {"shape": list(ids.shape), "sha256": digest},
        "peer_settings": {"block_size": peer[-1]["block_size"], "dampening_frac": peer[-1]["dampening_frac"],
                          "applied_example": next(iter(peer[-1]["applied"].values()))},
        "summary": rows, "perplexity": ppl, "ratios": ratios,
        "flops": flops, "matmul_flops_per_s": rates, "floor_s": floor_s,
        "load_average_after": load_after, "runs": runs,
    }
    out.write_text(json.dumps(result, indent=2))
    scratch.cleanup()
    print(f"Wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
