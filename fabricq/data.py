"""Calibration and evaluation text: loading documents, a held-out split, and token windows.

Calibration samples are disjoint windows of `seq_len` tokens drawn (seeded) from the calibration
documents; evaluation windows come from documents that calibration never sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fabricq.errors import FabricqError
from fabricq.sysmem import release_freed_memory

TEXT_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def builtin_documents() -> list[str]:
    """English text present on every machine with CPython: its bundled documentation topics."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def check_text_path(path: str | None, what: str) -> None:
    if path is None:
        return
    file = Path(path).expanduser()
    if not file.is_file():
        raise FabricqError(f"{what} does not exist or is not a file: {file}")
    if file.suffix not in TEXT_SUFFIXES:
        raise FabricqError(f"{what} must be one of {sorted(TEXT_SUFFIXES)}, got {file.name}")


def load_documents(path: str | None, text_field: str = "text") -> list[str]:
    """Documents from a .txt (one per blank-line-separated paragraph), .jsonl/.json or .parquet
    file (one per row, column `text_field`), or the built-in text when `path` is None."""
    if path is None:
        return builtin_documents()
    import datasets

    file = Path(path).expanduser()
    builder = TEXT_SUFFIXES[file.suffix]
    kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
    datasets.disable_progress_bars()
    table = datasets.load_dataset(builder, data_files=str(file), split="train", **kwargs)
    if text_field not in table.column_names:
        raise FabricqError(f"{file} has no column {text_field!r} (columns: {table.column_names})")
    docs = [t for t in table[text_field] if t and t.strip()]
    if not docs:
        raise FabricqError(f"{file} contains no text")
    return docs


def split_documents(docs: list[str], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split of whole documents into (calibration, evaluation): no document is in both."""
    if len(docs) < 2:
        raise FabricqError("need at least 2 documents to hold one out for evaluation (or set eval.path)")
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = min(len(docs) - 1, max(1, round(len(docs) * eval_fraction)))
    held = set(order[:n_eval])
    calib = [d for i, d in enumerate(docs) if i not in held]
    evaluation = [d for i, d in enumerate(docs) if i in held]
    return calib, evaluation


def tokenize_stream(tokenizer, docs: list[str]) -> torch.Tensor:
    ids = tokenizer("\n\n".join(docs), add_special_tokens=False, return_tensors="pt").input_ids
    return ids[0]


def calibration_samples(stream: torch.Tensor, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`num_samples` non-overlapping windows of `seq_len` tokens, chosen at random (seeded)."""
    available = stream.numel() // seq_len
    if available < num_samples:
        raise FabricqError(
            f"calibration text is too short: {stream.numel()} tokens give {available} windows of "
            f"data.seq_len={seq_len}, but data.num_samples={num_samples} were requested"
        )
    chosen = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:num_samples]
    windows = stream[: available * seq_len].view(available, seq_len)
    return windows[chosen.sort().values].clone()


def evaluation_windows(stream: torch.Tensor, seq_len: int, max_windows: int | None) -> torch.Tensor:
    """Consecutive non-overlapping windows from the start of the evaluation text."""
    available = stream.numel() // seq_len
    if available == 0:
        raise FabricqError(
            f"evaluation text is too short: {stream.numel()} tokens, fewer than eval.seq_len={seq_len}"
        )
    count = available if max_windows is None else min(available, max_windows)
    return stream[: count * seq_len].view(count, seq_len).clone()


@dataclass
class TextData:
    calibration: torch.Tensor  # (num_samples, seq_len) token ids
    evaluation: torch.Tensor  # (windows, eval_seq_len) token ids


def prepare_text(tokenizer, data_cfg, eval_cfg) -> TextData:
    docs = load_documents(data_cfg.path, data_cfg.text_field)
    if eval_cfg.path is None:
        calib_docs, eval_docs = split_documents(docs, data_cfg.eval_fraction, data_cfg.seed)
        eval_stream = tokenize_stream(tokenizer, eval_docs)
    else:
        calib_docs = docs
        eval_file = Path(eval_cfg.path).expanduser()
        # A raw text file is evaluated as one stream, exactly as written (WikiText-2 convention).
        if eval_file.suffix == ".txt":
            eval_stream = tokenize_stream(tokenizer, [eval_file.read_text(encoding="utf-8")])
        else:
            eval_stream = tokenize_stream(tokenizer, load_documents(eval_cfg.path, data_cfg.text_field))
    calib_stream = tokenize_stream(tokenizer, calib_docs)
    text = TextData(
        calibration=calibration_samples(calib_stream, data_cfg.num_samples, data_cfg.seq_len, data_cfg.seed),
        evaluation=evaluation_windows(eval_stream, eval_cfg.seq_len, eval_cfg.max_windows),
    )
    del docs, calib_docs, calib_stream, eval_stream
    release_freed_memory(collect_cycles=True)  # once: the tokenizer's transient buffers
    return text
