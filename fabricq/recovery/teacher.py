"""Distillation targets without a second model in memory: the original model's next-token
distributions on the recovery windows, computed once and kept as each position's top-k
log-probabilities plus the log of the remaining mass, and the losses computed from them.

With S the top-k tokens of the teacher p at a position and q the student, the loss is the KL
between the two distributions coarsened to S ∪ {rest}:
    Σ_{i∈S} p_i·(log p_i − log q_i) + p_rest·(log p_rest − log q_rest).
Merging outcomes never increases a KL divergence, so this is a lower bound of KL(p ‖ q) that
grows with k and equals it when S is the whole vocabulary. Both sides are taken at temperature T
and the loss is scaled by T² (Hinton et al.), so its gradients keep their size across T.

Logits are computed from the decoder's last hidden states a few positions at a time
(`logit_chunks`): a whole window's logits over a 49k-token vocabulary would cost hundreds of MiB
per copy.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from fabricq.checksums import tensors_sha256
from fabricq.errors import FabricqError

FORMAT = 1
log = logging.getLogger("fabricq")


def windows_digest(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def final_hidden(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The decoder's output (after its final norm): what the output embedding turns into logits."""
    return model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    return model.get_output_embeddings()(hidden)


def logit_chunks(model, hidden: torch.Tensor, chunk: int):
    """(start, logits of positions start … start+chunk−1) over a (batch, positions, hidden) tensor."""
    for start in range(0, hidden.shape[1], chunk):
        yield start, head_logits(model, hidden[:, start : start + chunk])


@torch.no_grad()
def head_is_plain(model, input_ids: torch.Tensor) -> bool:
    """Whether the model's logits are exactly `head_logits(final_hidden(…))` on `input_ids`."""
    try:
        direct = model(input_ids=input_ids, use_cache=False).logits
        rebuilt = head_logits(model, final_hidden(model, input_ids))
    except (AttributeError, NotImplementedError, TypeError):  # no get_decoder / output embeddings
        return False
    return direct.shape == rebuilt.shape and torch.allclose(direct.float(), rebuilt.float(), rtol=1e-4, atol=1e-4)


# Positions `check_head` compares: whether the head is plain does not depend on the length, and a
# whole window's logits over the vocabulary, twice and in float32, would be the teacher's largest
# allocation (the evaluation checks a prefix of the same length).
CHECK_POSITIONS = 16


@torch.no_grad()
def check_head(model, window: torch.Tensor, device) -> None:
    """The logits `head_logits` builds must be the model's own (no soft-capping or scaling the
    chunked path would miss): checked once, on the first `CHECK_POSITIONS` tokens of a window."""
    if not head_is_plain(model, window[None, :CHECK_POSITIONS].to(device)):
        raise FabricqError(f"{type(model).__name__} does not compute its logits as output embedding(decoder "
                           "output), which recovery relies on: this architecture is not supported")


def top_and_rest(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k log-probs (…, k), their token ids, and log(1 − Σ top-k p) computed as a log-sum-exp
    over the other tokens (−inf when k covers the vocabulary): no cancellation near 1."""
    top, idx = logprobs.topk(k, dim=-1)
    rest = logprobs.scatter(-1, idx, float("-inf")).logsumexp(-1)
    return top, idx, rest


@dataclass
class TeacherTargets:
    """Per window and predicted position (windows, seq_len − 1): top-k token ids and log-probs and
    the log of the remaining mass, at `temperature`; `digest` fingerprints the windows."""

    indices: torch.Tensor  # int32 (n, seq_len-1, k)
    logprobs: torch.Tensor  # float32 (n, seq_len-1, k)
    rest: torch.Tensor  # float32 (n, seq_len-1)
    temperature: float
    digest: str

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    def rows(self, which: torch.Tensor | slice):
        return self.indices[which].long(), self.logprobs[which], self.rest[which]


@torch.no_grad()
def compute_teacher(model, windows: torch.Tensor, *, k: int, temperature: float, device, chunk: int = 128,
                    desc: str | None = None) -> TeacherTargets:
    """Run the teacher over every window (one at a time), keeping only the top-k summary; with
    `desc`, a progress bar."""
    n, length = windows.shape
    vocab = model.get_output_embeddings().weight.shape[0]
    if k > vocab:
        raise FabricqError(f"recovery.top_k={k} is larger than the vocabulary ({vocab} tokens)")
    indices = torch.empty(n, length - 1, k, dtype=torch.int32)
    logprobs = torch.empty(n, length - 1, k)
    rest = torch.empty(n, length - 1)
    for i, window in enumerate(tqdm(windows, desc=desc, unit="window", disable=desc is None, mininterval=2)):
        hidden = final_hidden(model, window[None].to(device))[:, :-1]
        for start, logits in logit_chunks(model, hidden, chunk):
            top, idx, r = top_and_rest(F.log_softmax(logits.float() / temperature, dim=-1)[0], k)
            end = start + top.shape[0]
            logprobs[i, start:end], indices[i, start:end], rest[i, start:end] = top.cpu(), idx.cpu(), r.cpu()
    return TeacherTargets(indices, logprobs, rest, float(temperature), windows_digest(windows))


def save_teacher(targets: TeacherTargets, path: Path) -> None:
    path = Path(path)
    tensors = {"indices": targets.indices.contiguous(), "logprobs": targets.logprobs.contiguous(),
               "rest": targets.rest.contiguous()}
    meta = {"format": str(FORMAT), "temperature": repr(targets.temperature), "digest": targets.digest,
            "sha256": tensors_sha256(tensors)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata=meta)
    tmp.replace(path)


def load_teacher(path: Path) -> TeacherTargets | None:
    """The stored targets, or None when the file is missing or unreadable (they are recomputed)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
        tensors = load_file(path)
    except Exception:  # noqa: BLE001 - a torn or foreign file: recompute rather than fail
        return None
    if meta.get("format") != str(FORMAT) or meta.get("sha256") != tensors_sha256(tensors):
        if meta.get("sha256"):
            log.warning("Recomputing the teacher's targets: %s is damaged (its content no longer matches its sha256)",
                        path)
        return None
    return TeacherTargets(tensors["indices"], tensors["logprobs"], tensors["rest"], float(meta["temperature"]),
                          meta["digest"])


def teacher_matches(targets: TeacherTargets | None, windows: torch.Tensor, k: int, temperature: float) -> bool:
    return (targets is not None and targets.k == k and targets.temperature == float(temperature)
            and targets.digest == windows_digest(windows) and tuple(targets.rest.shape) == (len(windows), windows.shape[1] - 1))


def topk_kl(student_logits: torch.Tensor, indices: torch.Tensor, teacher_logprobs: torch.Tensor,
            teacher_rest: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Σ over positions of the coarsened KL(teacher ‖ student) (module docstring), times T².
    student_logits (…, vocab); indices/teacher_logprobs (…, k); teacher_rest (…)."""
    logits = student_logits.float()
    if temperature != 1.0:  # x / 1 is x: no vocabulary-wide copy of the chunk's logits
        logits = logits / temperature
    student = F.log_softmax(logits, dim=-1)
    return topk_kl_from_logprobs(student, indices, teacher_logprobs, teacher_rest) * temperature**2


def student_rest(student: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """log of the student's mass outside the teacher's top-k `indices` (a log-sum-exp: no cancellation)."""
    return student.scatter(-1, indices, float("-inf")).logsumexp(-1)


def topk_kl_from_logprobs(student: torch.Tensor, indices: torch.Tensor, teacher_logprobs: torch.Tensor,
                          teacher_rest: torch.Tensor, s_rest: torch.Tensor | None = None) -> torch.Tensor:
    """`topk_kl` at T = 1 from the student's log-probs (…, vocab) (the evaluation has them already);
    `s_rest`: `student_rest(student, indices)` when the caller needs it too (one full-vocabulary pass)."""
    s_top = student.gather(-1, indices)
    s_rest = student_rest(student, indices) if s_rest is None else s_rest
    p_top = teacher_logprobs.exp()
    top_terms = (p_top * (teacher_logprobs - s_top)).sum(-1)
    has_rest = torch.isfinite(teacher_rest)
    safe_rest = torch.where(has_rest, teacher_rest, torch.zeros_like(teacher_rest))
    rest_terms = torch.where(has_rest, safe_rest.exp() * (safe_rest - s_rest), torch.zeros_like(teacher_rest))
    return (top_terms + rest_terms).sum()


def full_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Σ over positions of KL(teacher ‖ student) over the whole vocabulary, times T² (the
    reference `topk_kl` bounds from below)."""
    p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (p.exp() * (p - q)).sum() * temperature**2


def lm_loss(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ over positions of −log q(next token)."""
    return F.cross_entropy(student_logits.float().reshape(-1, student_logits.shape[-1]), targets.reshape(-1),
                           reduction="sum")
