"""sha256 checksums of the files fabricq writes and later reads back (the evaluation cache, the
resume state): a file that does not match what was written is never trusted."""

from __future__ import annotations

import hashlib
import json

import torch


def tensors_sha256(tensors: dict[str, torch.Tensor], text: str = "") -> str:
    """sha256 over each tensor's name, dtype, shape and bytes (in name order), then `text`
    (metadata stored beside the tensors). Hashes the tensors' memory in place: no copy."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
    if text:
        digest.update(text.encode())
    return digest.hexdigest()


def json_sha256(data: dict) -> str:
    """sha256 of a JSON object's content (keys sorted), without its own "sha256" field."""
    body = {key: value for key, value in data.items() if key != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def with_json_sha256(data: dict) -> dict:
    """`data` with a "sha256" field over the rest (see `json_sha256`)."""
    return {**data, "sha256": json_sha256(data)}
