"""Recovery fine-tuning on the default model: how much of the W3 / W4 gap it closes, how long it
takes against the GPTQ phase, and its peak RSS against the quantization's.

For each recipe: one `python -m fabricq` run (C4 calibration, WikiText-2 test evaluation), then
each recovery on a copy of its output with `python -m fabricq.recover COPY +recovery=NAME`
(one process each, so peak RSS and timings are per recovery), optionally also on 2 ranks.

    python benchmarks/recovery.py                                  # W3 and W4, eora + lora, 1 rank
    python benchmarks/recovery.py --recipes gptq_w4 --recoveries eora lora qlora --ranks 1 2
    python benchmarks/recovery.py --reuse DIR                      # recover existing outputs DIR/<recipe>
    python benchmarks/recovery.py --max-windows 2 --num-samples 16 --extra recovery.steps=8   # quick
    python benchmarks/recovery.py --model ../shared/models/stories260k --recipes gptq_w4 --recoveries lora \
        --ranks 1 2 --num-samples 16 --seq-len 128 --eval-seq-len 256 --max-windows 2   # tiny, end to end

Each quantization runs twice when --rss is given: once with evaluation (perplexity before/after)
and once without, whose lifetime peak RSS is the quantization phase's alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from quantize import (
    DEFAULT_CALIB,
    DEFAULT_EVAL,
    child_env,
    hydra_value,
    machine_info,
    print_aligned,
)


def stream(cmd: list[str], log_path: Path, label: str, env: dict) -> tuple[int, float]:
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log, subprocess.Popen(cmd, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                                                      stderr=subprocess.STDOUT) as proc:
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if "it/s]" not in line and "step/s" not in line:
                print(f"  [{label}] {line}", end="", flush=True)
    return proc.returncode, time.perf_counter() - start


def quantize(args, recipe: str, out: Path, evaluate: bool = True) -> dict:
    cmd = [sys.executable, "-m", "fabricq", f"recipe={recipe}", f"output_dir={hydra_value(out)}", "overwrite=true",
           f"data.num_samples={args.num_samples}", f"data.seq_len={args.seq_len}",
           f"eval.seq_len={args.eval_seq_len}", f"eval.max_windows={args.max_windows}", f"eval.enabled={str(evaluate).lower()}"]
    if args.model:
        cmd.append(f"model.path={hydra_value(Path(args.model).resolve())}")
    if args.calib:
        cmd.append(f"data.path={hydra_value(Path(args.calib).resolve())}")
    if args.eval:
        cmd.append(f"eval.path={hydra_value(Path(args.eval).resolve())}")
    code, elapsed = stream(cmd + list(args.quant_extra), out.with_suffix(".log"), recipe, child_env(args.threads))
    if code != 0:
        raise SystemExit(f"{recipe}: exit code {code}, see {out.with_suffix('.log')}")
    report = json.loads((out / "report.json").read_text())
    return {"process_s": elapsed, "report": report}


def recover(args, source: Path, name: str, ranks: int) -> dict:
    label = f"{source.name}-{name}-{ranks}r"
    target = source.parent / label
    shutil.rmtree(target, ignore_errors=True)
    # A killed earlier recovery of this copy leaves its work folder (teacher targets, checkpoints)
    # behind, and a new one would reuse it: its teacher and training would not be timed.
    shutil.rmtree(source.parent / f".{label}.recovery", ignore_errors=True)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("adapter"))
    cmd = [sys.executable, "-m", "fabricq.recover", str(target), f"+recovery={name}", *args.extra]
    if ranks > 1:
        cmd += [f"trainer.devices={ranks}", "trainer.accelerator=cpu", "trainer.strategy=ddp"]
        if name != "eora":  # equal global batch: the one-rank runs accumulate over as many micro-batches
            cmd.append("recovery.grad_accum=1")
    elif name != "eora" and 2 in args.ranks:
        cmd.append("recovery.grad_accum=2")
    code, elapsed = stream(cmd, target.with_suffix(".log"), label, child_env(args.threads))
    if code != 0:
        return {"label": label, "error": f"exit code {code}, see {target.with_suffix('.log')}"}
    section = json.loads((target / "report.json").read_text())["recovery"]
    return {"label": label, "recipe": source.name, "recovery": name, "ranks": ranks, "process_s": elapsed,
            "section": section}


COLUMNS = [("label", "{}"), ("ppl_before", "{:.3f}"), ("ppl_after", "{:.3f}"), ("ppl_after_recovery", "{:.3f}"),
           ("ppl_gap_closed", "{:.1%}"), ("kl_after", "{:.4f}"), ("kl_after_recovery", "{:.4f}"),
           ("kl_gap_closed", "{:.1%}"), ("wall_s", "{:.0f}"), ("eora_s", "{:.0f}"), ("train_s", "{:.0f}"),
           ("gptq_s", "{:.0f}"), ("wall_vs_gptq", "{:.2f}"), ("peak_rss_mib", "{:.0f}"),
           ("peak_rss_eval_mib", "{:.0f}"), ("quant_rss_mib", "{:.0f}")]


def row(result: dict, runs: dict) -> dict:
    s = result.get("section", {})
    run = runs.get(result.get("recipe"), {})
    timings, gptq = s.get("timings", {}), run.get("quantize_s")
    return {**s, "label": result["label"], "train_s": timings.get("train_s"), "eora_s": timings.get("eora_s"),
            "gptq_s": gptq, "wall_vs_gptq": s["wall_s"] / gptq if gptq and s.get("wall_s") else None,
            "quant_rss_mib": run.get("quant_rss_mib") or run.get("peak_rss_mib")}


def profile_steps(args) -> dict:
    """Where one training step's time goes on the default model, per variant of the settings that
    decide it: the adapters over a round-to-nearest W4 base (the step's cost does not depend on
    the codes), random teacher targets of the stored shape, `--profile-steps` timed steps after one
    warm-up. Sections: decoder forward, output embedding + loss over the logit chunks (forward),
    backward (the chunks' and, with activation checkpointing, the layers' recomputation), optimizer."""
    import torch

    from fabricq.models import load_model, resolve_model_source
    from fabricq.quant.gptq import rtn_quantize
    from fabricq.quant.grid import QuantScheme, effective_group_size
    from fabricq.recovery.lora import attach_lora
    from fabricq.recovery.settings import TrainSettings
    from fabricq.recovery.train import RecoveryObjective, _recompute_layers

    torch.set_num_threads(args.threads)
    model = load_model(resolve_model_source(None))
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    quantized = {}
    for n in names:
        w = model.get_submodule(n).weight.detach()
        quantized[n] = rtn_quantize(w, QuantScheme(4, effective_group_size(128, w.shape[1]), True, "none"))
    lora = attach_lora(model, quantized, names, rank=32, alpha=32)
    vocab = model.get_output_embeddings().weight.shape[0]
    results = {}
    for variant in args.profile_variants:
        opts = dict(kv.split("=") for kv in variant.split(",")) if variant else {}
        seq, batch = int(opts.get("seq_len", 512)), int(opts.get("batch_size", 1))
        mode = opts.get("mode", "lora")
        for name, module in lora.items():  # the base as qlora holds it (packed codes) or as lora does
            if module.mode != mode:
                module._buffers.pop("weight" if mode == "qlora" else "packed_codes", None)
                module.mode = mode
                module.set_base(quantized[name])
        settings = TrainSettings(steps=1, logit_chunk=int(opts.get("logit_chunk", 128)),
                                 activation_checkpointing=opts.get("ac", "1") == "1")
        _recompute_layers(model, settings.activation_checkpointing)
        model.train()
        objective = RecoveryObjective(model, settings)
        params = [q for m in lora.values() for q in (m.lora_A, m.lora_B)]
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        idx = torch.randint(0, vocab, (batch, seq - 1, 32), generator=g)
        logprobs = torch.log_softmax(torch.randn(batch, seq - 1, 32, generator=g), -1) - 0.1
        rest = torch.full((batch, seq - 1), -2.3)
        times = {"forward_decoder": 0.0, "forward_logits_loss": 0.0, "backward": 0.0, "optimizer": 0.0}
        decoder, clock = model.get_decoder(), {"start": 0.0, "decoder": 0.0}

        def before(*_, clock=clock):
            clock["start"] = time.perf_counter()

        def after(*_, clock=clock):
            clock["decoder"] = time.perf_counter() - clock["start"]

        hooks = [decoder.register_forward_pre_hook(before), decoder.register_forward_hook(after)]
        for step in range(args.profile_steps + 1):
            t0 = time.perf_counter()
            loss = objective(ids, idx, logprobs, rest)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            if step:  # the first step warms up allocators and kernels
                times["forward_decoder"] += clock["decoder"]
                times["forward_logits_loss"] += (t1 - t0) - clock["decoder"]
                times["backward"] += t2 - t1
                times["optimizer"] += t3 - t2
        for hook in hooks:
            hook.remove()
        per_step = {k: v / args.profile_steps for k, v in times.items()}
        per_step["step"] = sum(per_step.values())
        per_step["tokens_per_s"] = batch * (seq - 1) / per_step["step"]
        results[variant or "defaults"] = per_step
        print(variant or "defaults", json.dumps({k: round(v, 3) for k, v in per_step.items()}), flush=True)
    _recompute_layers(model, False)
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=["gptq_w3", "gptq_w4"])
    p.add_argument("--recoveries", nargs="+", default=["eora", "lora"])
    p.add_argument("--ranks", nargs="+", type=int, default=[1])
    p.add_argument("--model", help="a model folder (model.path) instead of the default model")
    p.add_argument("--calib", default=str(DEFAULT_CALIB) if DEFAULT_CALIB.is_file() else None)
    p.add_argument("--eval", default=str(DEFAULT_EVAL) if DEFAULT_EVAL.is_file() else None)
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="OMP threads of each process (rank)")
    p.add_argument("--reuse", type=Path, help="a folder with finished outputs <recipe>/ to recover instead of quantizing")
    p.add_argument("--rss", action="store_true", help="also quantize without evaluation for the phase's peak RSS")
    p.add_argument("--out", type=Path, help="results JSON (default: benchmarks/results/recovery-<timestamp>.json)")
    p.add_argument("--extra", nargs="*", default=[], help="overrides for every recovery, e.g. recovery.steps=32")
    p.add_argument("--quant-extra", nargs="*", default=[], help="overrides for every quantization")
    p.add_argument("--profile", action="store_true", help="only time training steps on the default model, per variant")
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--profile-variants", nargs="*", default=["", "ac=0", "seq_len=256", "logit_chunk=512", "mode=qlora"],
                   help="comma-separated key=value (ac, seq_len, batch_size, logit_chunk, mode); '' = the defaults")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.profile:
        machine = machine_info(args.threads)
        results = profile_steps(args)
        out = (args.out or REPO / "benchmarks" / "results" / f"recovery-profile-{time.strftime('%Y%m%d-%H%M%S')}.json")
        out.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                                   "profile": results}, indent=2))
        print(f"wrote {out}")
        return 0
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = (args.out or REPO / "benchmarks" / "results" / f"recovery-{stamp}.json").resolve()
    work = args.reuse.resolve() if args.reuse else out.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    machine = machine_info(args.threads)
    print(f"# {machine['cpu']} · {machine['logical_cores']} cores · {args.threads} thread(s) per process · {work}")
    runs, results = {}, []
    for recipe in args.recipes:
        source = work / recipe
        if not args.reuse:
            quantize(args, recipe, source)
        report = json.loads((source / "report.json").read_text())
        runs[recipe] = {"quantize_s": report.get("timings", {}).get("quantize_s"), "wall_s": report.get("wall_s"),
                        "peak_rss_mib": report.get("peak_rss_mib"), "ppl_before": report.get("ppl_before"),
                        "ppl_after": report.get("ppl_after"), "kl_after": report.get("kl_after")}
        if args.rss:
            quiet = quantize(args, recipe, work / f"{recipe}-noeval", evaluate=False)["report"]
            runs[recipe]["quant_rss_mib"] = quiet.get("peak_rss_mib")
        for name in args.recoveries:
            for ranks in args.ranks if name != "eora" else [1]:
                results.append(recover(args, source, name, ranks))
    rows = [row(r, runs) for r in results if "section" in r]
    cells = [[k for k, _ in COLUMNS]] + [[fmt.format(r[k]) if r.get(k) is not None else "-" for k, fmt in COLUMNS]
                                         for r in rows]
    print_aligned(cells, rule=True)
    for r in rows:  # where each recovery's memory peaks (MiB), against the quantization run's
        print(f"peak RSS by phase, {r['label']}:", json.dumps({k: round(v) for k, v in
                                                               (r.get("peak_rss_by_phase_mib") or {}).items()}))
    speedups = {}
    for r in rows:
        print(f"phases (s), {r['label']}:", json.dumps({k: round(v, 1) for k, v in (r.get("timings") or {}).items()}))
        if r.get("world_size") == 2:
            one = next((o for o in rows if o.get("world_size") == 1 and o["label"].replace("-1r", "") ==
                        r["label"].replace("-2r", "")), None)
            if one and one.get("train_s") and r.get("train_s"):
                speedups[r["label"]] = {"train": one["train_s"] / r["train_s"], "wall": one["wall_s"] / r["wall_s"]}
                both = set(one.get("timings") or {}) & set(r.get("timings") or {})
                speedups[r["label"]].update({k.removesuffix("_s"): one["timings"][k] / r["timings"][k] for k in sorted(both)
                                             if k != "train_s" and r["timings"][k] > 0})
    if speedups:
        print("2 ranks vs 1:", json.dumps({k: {p: round(x, 2) for p, x in v.items()} for k, v in speedups.items()}))
    out.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
                               "results": results, "speedups": speedups}, indent=2))
    print(f"wrote {out}")
    return 0 if all("section" in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
