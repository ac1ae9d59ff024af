"""`python -m fabricq.inspect CKPT [--engine vllm|tgi|transformers] [--tp N] [--json]`

Reads a quantized checkpoint (compressed-tensors pack-quantized, or the GPTQ format), checks
every tensor's name, shape and dtype against its config.json (the model is built on the meta
device from it: no weights are materialised), and prints the scheme per module group, act-order,
size on disk against the same model unquantized in the checkpoint's dtype, and each engine's
verdict with its reasons (`fabricq.checkpoint.engines`). Exit status: 0; 1 when `--engine` was given and
that engine fails on the checkpoint; 2 with one `fabricq: error: ...` line for a checkpoint
that cannot be read (missing/extra tensors, wrong shapes or dtypes, a truncated file, an unknown
format, a config that does not match the tensors).
"""

from __future__ import annotations

import json
import sys

from fabricq.checkpoint.engines import ENGINES
from fabricq.checkpoint.report import inspect_checkpoint
from fabricq.cli import ArgumentParser, run_command
from fabricq.errors import FabricqError


def format_report(report: dict) -> str:
    mib = 1 << 20
    lines = [
        f"checkpoint: {report['path']}",
        f"format: {report['format']}    dtype: {report['dtype']}",
        f"quantized: {report['quantized_modules']} Linear modules; unquantized: "
        f"{', '.join(report['unquantized_linear']) or 'none'}",
        "schemes:",
    ]
    for s in report["schemes"]:
        group = "per-channel" if s["group_size"] == -1 else f"group {s['group_size']}"
        lines.append(f"  {s['modules']} ({s['count']}): {s['bits']}-bit {'sym' if s['symmetric'] else 'asym'}, "
                     f"{group}, act-order {s['actorder']}")
    lines += [
        f"size on disk: {report['size_bytes'] / mib:.2f} MiB; unquantized in {report['dtype']}: "
        f"{report['unquantized_bytes'] / mib:.2f} MiB; ratio {report['ratio']:.3f}",
        f"tensors: every one present with the shape and dtype the config implies ({report['tensors_checked']} checked)",
        f"verdicts (tp={report['tp']}):",
    ]
    lines += ["  " + v.line().replace("\n", "\n  ") for v in report["verdicts"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m fabricq.inspect", description=__doc__.split("\n\n")[1])
    parser.add_argument("checkpoint")
    parser.add_argument("--engine", choices=ENGINES[1:], help="only this engine's verdict (exit 1 if it fails)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to check shards for")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)

    def body() -> int:
        if args.tp < 1:
            raise FabricqError(f"--tp must be a positive integer, got {args.tp}")
        report = inspect_checkpoint(args.checkpoint, [args.engine] if args.engine else None, args.tp)
        if args.json:
            print(json.dumps({**report, "verdicts": [v.__dict__ for v in report["verdicts"]]}, indent=2))
        else:
            print(format_report(report))
        return 1 if args.engine and report["verdicts"][0].level == "fails" else 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
