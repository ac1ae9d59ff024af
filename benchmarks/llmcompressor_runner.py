"""Run llm-compressor's GPTQ once, for `compare_llmcompressor.py` (executed with the python of
llm-compressor's own virtual environment, never imported by fabricq).

    DIR/bin/python benchmarks/llmcompressor_runner.py --model M --ids calib.pt --out OUT \
        --group-size 64 --batch-size 8 --result result.json

Calibration is exactly the token windows in `--ids` (a torch-saved (samples, seq_len) int64
tensor written by the comparison script), so both tools see the same tokens. The recipe is
`GPTQModifier(targets="Linear", scheme=W4A16, ignore=["lm_head"])` with the preset's group size
replaced by `--group-size` (the peer's other defaults: static act-order, damp 0.01, block 128).
The compressed checkpoint goes to `--out`; `--result` receives timings, peak RSS and what the
peer actually applied (group size, act-order, damping, block size), read back from the model.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import time

START = time.perf_counter()

import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--ids", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    imported = time.perf_counter()
    ids = torch.load(args.ids)
    samples, seq_len = ids.shape
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    loaded = time.perf_counter()

    # The W4A16 preset with only its group size changed (576 and 1536 are not multiples of 128).
    preset = copy.deepcopy(PRESET_SCHEMES["W4A16"])
    preset["weights"].group_size = args.group_size
    modifier = GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], **preset)},
        ignore=["lm_head"],
    )
    oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=dataset,
        recipe=modifier,
        num_calibration_samples=samples,
        max_seq_length=seq_len,
        batch_size=args.batch_size,
        shuffle_calibration_samples=False,
    )
    quantized = time.perf_counter()

    # What the peer really applied, read from the quantized modules.
    applied = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None:
            continue
        weights = scheme.weights
        scale = module.weight_scale
        applied[name] = {
            "num_bits": weights.num_bits,
            "symmetric": weights.symmetric,
            "strategy": str(weights.strategy.value if hasattr(weights.strategy, "value") else weights.strategy),
            "group_size": weights.group_size,
            "scale_groups": int(scale.shape[-1]),
            "columns": int(module.weight.shape[1]),
            "actorder": None if weights.actorder is None else str(getattr(weights.actorder, "value", weights.actorder)),
        }
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    saved = time.perf_counter()

    result = {
        "tool": "llm-compressor",
        "samples": samples,
        "seq_len": seq_len,
        "batch_size": args.batch_size,
        "block_size": modifier.block_size,
        "dampening_frac": modifier.dampening_frac,
        "timings": {
            "import_s": imported - START,
            "load_s": loaded - imported,
            "oneshot_s": quantized - loaded,
            "save_s": saved - quantized,
        },
        "wall_s": saved - START,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(),
        "applied": applied,
    }
    with open(args.result, "w") as handle:
        json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
