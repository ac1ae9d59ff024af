"""What the resume files' checksums cost on the default run's path (issue #28).

Every layer of a run with resume (the default, resume=auto) commits to `.NAME.work/`:
- the hidden states entering the next layer. On the default run (SmolLM2-135M, 128 windows of
  512 tokens in batches of 8, float32 forward) that is 16 batches of 8 × 512 × 576, 151 MB;
- the layer's quantized results (about 2 MB).

This script times one such commit (`save_hidden` + `commit_layer`) with the sha256 checksums
and with the checksum replaced by a constant, alternating the order across repeats. It also
times a resume's verification of one layer's hidden states.

    OMP_NUM_THREADS=1 python benchmarks/resume_checksums.py --repeats 12
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import fabricq.calibration.cache as cache_module
import fabricq.resume as resume
from fabricq.calibration.cache import ActivationCache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--batch-shape", default="8,512,576")
    parser.add_argument("--dir", default=None, help="where the work folders go (default: a temporary folder)")
    args = parser.parse_args()
    shape = tuple(int(x) for x in args.batch_shape.split(","))
    root = Path(args.dir or tempfile.mkdtemp(prefix="fabricq-checksums-"))
    cache = ActivationCache("cpu")
    stage = cache.new_stage()
    generator = torch.Generator().manual_seed(0)
    for _ in range(args.batches):
        stage.append(torch.randn(*shape, generator=generator))
    megabytes = stage.nbytes / 1e6
    real = cache_module.tensors_sha256
    times: dict[str, list[float]] = {"with checksums": [], "without": []}
    for repeat in range(args.repeats):
        order = list(times) if repeat % 2 == 0 else list(reversed(times))
        for mode in order:
            cache_module.tensors_sha256 = real if mode == "with checksums" else (lambda tensors, text="": "0" * 64)
            work = resume.WorkDirectory(root / f".{mode.replace(' ', '-')}.work")
            shutil.rmtree(work.path, ignore_errors=True)
            work.prepare("auto", {"benchmark": 1})
            tick = time.perf_counter()
            work.save_hidden(0, stage)
            work.commit_layer(0, {}, args.batches)
            times[mode].append(time.perf_counter() - tick)
            work.remove()
    cache_module.tensors_sha256 = real
    work = resume.WorkDirectory(root / ".verify.work")
    work.prepare("auto", {"benchmark": 1})
    work.save_hidden(0, stage)
    work.commit_layer(0, {}, args.batches)
    files = sorted((work.path / "hidden" / "L00000.rank0").glob("b*.safetensors"))
    verify = []
    for _ in range(5):
        tick = time.perf_counter()
        for file in files:
            resume.check_hidden_file(file)
        verify.append(time.perf_counter() - tick)
    work.remove()
    print(f"one layer's commit: {args.batches} batches of {shape}, {megabytes:.0f} MB (first repeat: cold page cache)")
    for mode, values in times.items():
        print(f"  {mode:15s} median {statistics.median(values[1:]):.3f} s   ({' '.join(f'{v:.3f}' for v in values)})")
    added = statistics.median(times["with checksums"][1:]) - statistics.median(times["without"][1:])
    print(f"  added per layer: {added:.3f} s")
    print(f"a resume's verification of those files: median {statistics.median(verify):.3f} s")
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
