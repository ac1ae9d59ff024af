"""Calibration and evaluation text as token windows shaped the way the model was trained.

Every window starts with the tokenizer's BOS when its default encoding adds one (`data.bos`), and
stays `seq_len` tokens long including it. Calibration windows come either from one token stream
of all documents (`data.sampling=stream`) or from the documents themselves (`documents`: a window
starts at a document's beginning; short documents are packed together, separated by the special
tokens the tokenizer puts around a document). With `data.chat_template=true` calibration text is
rendered through the tokenizer's chat template first. Evaluation windows come from documents
calibration never sees, non-overlapping or sliding (`eval.stride`). Reading and checking the
files is `fabricq.textfiles`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from fabricq.errors import FabricqError
from fabricq.sysmem import release_freed_memory
from fabricq.textfiles import (  # noqa: F401  (check_text_path, load_documents: this module's API too)
    TEXT_SUFFIXES,
    Conversation,
    builtin_documents,
    check_text_path,
    existing_text_file,
    load_conversations,
    load_documents,
    read_text,
)

SAMPLINGS = ("stream", "documents")
DEFAULT_SAMPLING = "stream"  # the conf/data default, chosen with benchmarks/calibration_text.py


def check_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise FabricqError("data.chat_template=true, but the model's tokenizer has no chat template "
                           "(a base model?): set data.chat_template=false")


def render_chats(tokenizer, conversations: list[Conversation], source: str, bos_id: int | None) -> list[str]:
    """Each conversation through the tokenizer's chat template, as text. A template that writes
    the BOS itself loses it here when fabricq adds BOS to every window (`bos_id`), so no window
    gets two."""
    check_chat_template(tokenizer)
    bos_text = tokenizer.bos_token if bos_id is not None else None
    texts = []
    for chat in conversations:
        try:
            text = tokenizer.apply_chat_template(chat.messages, tokenize=False)
        except Exception as err:  # noqa: BLE001 - a template raises what its author chose (e.g. roles must alternate)
            raise FabricqError(f"{source}: {chat.where}: the chat template refused these messages: {err}") from None
        if bos_text and text.startswith(bos_text):
            text = text[len(bos_text):]
        texts.append(text)
    return texts


def split_documents(docs: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """Seeded split of whole documents into (calibration, evaluation): no document is in both."""
    if len(docs) < 2:
        raise FabricqError("need at least 2 documents to hold one out for evaluation (or set eval.path)")
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = min(len(docs) - 1, max(1, round(len(docs) * eval_fraction)))
    held = set(order[:n_eval])
    calib = [d for i, d in enumerate(docs) if i not in held]
    evaluation = [d for i, d in enumerate(docs) if i in held]
    return calib, evaluation


def default_special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer's default encoding puts before and after a text (e.g. ([1], []) for
    Llama-2's BOS), found by encoding a probe with and without special tokens."""
    probe = "fabricq probe text"
    plain = tokenizer(probe, add_special_tokens=False).input_ids
    full = tokenizer(probe).input_ids
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return [], []


def resolve_bos(tokenizer, mode) -> int | None:
    """The BOS id every window starts with, or None: `auto` follows the tokenizer's default
    encoding, `true` requires the tokenizer to have a BOS token, `false` never adds one."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if mode is True:
        if bos_id is None:
            raise FabricqError("data.bos=true, but the model's tokenizer has no BOS token: use data.bos=auto or false")
        return bos_id
    if mode is False:
        return None
    prefix, _ = default_special_tokens(tokenizer)
    return bos_id if bos_id is not None and bos_id in prefix else None


def document_separator(tokenizer, bos_id: int | None) -> list[int]:
    """Tokens after each packed document: what the default encoding appends (EOS for some
    tokenizers); when it adds nothing around a document and no BOS starts the next, the EOS
    token, so that packed documents never run into each other."""
    _, suffix = default_special_tokens(tokenizer)
    if suffix or bos_id is not None:
        return suffix
    eos_id = getattr(tokenizer, "eos_token_id", None)
    return [] if eos_id is None else [eos_id]


# Text is encoded a piece at a time: a fast tokenizer's working memory grows with the text it is
# given (~570 bytes per token, +270 MiB for the 2 MB C4 sample at once), a piece's stays small.
PIECE_CHARS = 1 << 16
# Neighbouring pieces share this much text; where both encode its middle alike, the stream
# switches from one to the other (context on either side of the switch: OVERLAP_MARGIN).
OVERLAP_CHARS = 1024
OVERLAP_MARGIN = 256


def tokenize_stream(tokenizer, docs: list[str]) -> torch.Tensor:
    """The documents joined by blank lines as one token stream: the tokens of encoding the whole
    text at once, computed a piece at a time where the tokenizer reports offsets."""
    text = "\n\n".join(docs)
    ids = _encode_in_pieces(tokenizer, text)
    if ids is None:  # short text, a tokenizer without offsets, or pieces that disagree
        ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
    return ids


DOCUMENTS_AT_ONCE = 64  # documents per tokenizer call in data.sampling=documents


def encode_documents(tokenizer, docs: list[str]) -> list[list[int]]:
    """Each document's tokens (no special tokens), a bounded number of documents per call."""
    ids: list[list[int]] = []
    for start in range(0, len(docs), DOCUMENTS_AT_ONCE):
        ids += tokenizer(docs[start : start + DOCUMENTS_AT_ONCE], add_special_tokens=False).input_ids
    return ids


def _encode_piece(tokenizer, text: str, start: int, end: int) -> list[tuple[int, int, int]]:
    """(start, end, id) of each token of text[start:end], positions in `text`."""
    enc = tokenizer(text[start:end], add_special_tokens=False, return_offsets_mapping=True)
    return [(s + start, e + start, i) for i, (s, e) in zip(enc.input_ids, enc.offset_mapping)]


def _encode_in_pieces(tokenizer, text: str) -> torch.Tensor | None:
    """`text`'s tokens from overlapping pieces, or None where that cannot be shown to match the
    whole-text encoding. Tokenizers are local (a token depends on a few characters around it), so
    two encodings that differ only far away agree in between: a piece's tokens are kept up to a
    token both it and the next piece start at, with identical tokens over the whole middle of
    their overlap; if they differ there, the text is encoded whole instead."""
    if len(text) <= PIECE_CHARS or not getattr(tokenizer, "is_fast", False):
        return None
    kept: list[torch.Tensor] = []
    pending = _encode_piece(tokenizer, text, 0, PIECE_CHARS)
    piece_end = PIECE_CHARS
    while piece_end < len(text):
        start = piece_end - OVERLAP_CHARS
        following = _encode_piece(tokenizer, text, start, min(len(text), start + PIECE_CHARS))
        low, high = start + OVERLAP_MARGIN, piece_end - OVERLAP_MARGIN
        mine = [t for t in pending if low <= t[0] < high]
        theirs = [t for t in following if low <= t[0] < high]
        if not mine or mine != theirs:
            return None
        switch = mine[0][0]
        kept.append(torch.tensor([t[2] for t in pending if t[0] < switch], dtype=torch.int32))
        pending = [t for t in following if t[0] >= switch]
        piece_end = min(len(text), start + PIECE_CHARS)
    kept.append(torch.tensor([t[2] for t in pending], dtype=torch.int32))
    return torch.cat(kept).long()


def _with_bos(chunks: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    if bos_id is None:
        return chunks
    return torch.cat([torch.full((len(chunks), 1), bos_id, dtype=chunks.dtype), chunks], dim=1)


def calibration_samples(stream: torch.Tensor, num_samples: int, seq_len: int, seed: int,
                        bos_id: int | None = None) -> torch.Tensor:
    """`num_samples` non-overlapping windows of `seq_len` tokens (BOS included when `bos_id`),
    chosen at random (seeded) from the stream."""
    body = seq_len - (bos_id is not None)
    available = stream.numel() // body if body else 0
    if available < num_samples:
        raise FabricqError(
            f"calibration text is too short: {stream.numel()} tokens give {available} windows of "
            f"data.seq_len={seq_len}, but data.num_samples={num_samples} were requested"
        )
    chosen = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:num_samples]
    windows = stream[: available * body].view(available, body)
    return _with_bos(windows[chosen.sort().values], bos_id).clone()


def document_samples(token_docs: list[list[int]], num_samples: int, seq_len: int, seed: int,
                     bos_id: int | None, separator: list[int]) -> torch.Tensor:
    """`num_samples` windows that start at a document's beginning (seeded document order): a
    document longer than a window gives its first window; shorter ones are packed together, each
    as [BOS] + text + separator, the last one cut at the window's end. Only when those windows are
    too few do long documents give their following windows, in order (each starting with BOS)."""
    head = [bos_id] if bos_id is not None else []
    body = seq_len - len(head)
    order = torch.randperm(len(token_docs), generator=torch.Generator().manual_seed(seed)).tolist()
    samples, packed = [], []
    for i in order:
        unit = head + token_docs[i] + separator
        if len(unit) >= seq_len:
            samples.append(unit[:seq_len])
            continue
        packed += unit
        if len(packed) >= seq_len:
            samples.append(packed[:seq_len])
            packed = []
    further = (head + token_docs[i][k : k + body] for k in range(body, max(map(len, token_docs)), body)
               for i in order if len(token_docs[i]) >= k + body)
    for window in further:
        if len(samples) >= num_samples:
            break
        samples.append(window)
    if len(samples) < num_samples:
        raise FabricqError(
            f"calibration text is too short: its {len(token_docs)} documents give {len(samples)} windows of "
            f"data.seq_len={seq_len}, but data.num_samples={num_samples} were requested "
            f"(data.sampling=stream also uses the text between windows)"
        )
    return torch.tensor(samples[:num_samples], dtype=torch.long)


def evaluation_windows(stream: torch.Tensor, seq_len: int, max_windows: int | None,
                       bos_id: int | None = None, stride: int | None = None) -> torch.Tensor:
    """Windows from the start of the evaluation text, each BOS + text when `bos_id`: consecutive
    (`stride` None) or sliding by `stride` tokens, of which only the last `stride` positions are
    scored after the first window (`fabricq.evaluate.evaluate`), so every token is scored once.
    Text after the last whole window is left out."""
    body = seq_len - (bos_id is not None)
    step = body if stride is None else stride
    available = 0 if stream.numel() < body else (stream.numel() - body) // step + 1
    if available == 0:
        raise FabricqError(
            f"evaluation text is too short: {stream.numel()} tokens, fewer than eval.seq_len={seq_len}"
        )
    count = available if max_windows is None else min(available, max_windows)
    chunks = stream.unfold(0, body, step)[:count]
    return _with_bos(chunks, bos_id).clone()


def check_text_settings(data_cfg, eval_cfg) -> None:
    """The fields this module reads that config validation may not know yet."""
    bos = getattr(data_cfg, "bos", "auto")
    if not (bos == "auto" or isinstance(bos, bool)):
        raise FabricqError(f"data.bos must be auto, true or false, got {bos!r}")
    sampling = getattr(data_cfg, "sampling", DEFAULT_SAMPLING)
    if sampling not in SAMPLINGS:
        raise FabricqError(f"data.sampling must be one of {SAMPLINGS}, got {sampling!r}")
    chat = getattr(data_cfg, "chat_template", False)
    if not isinstance(chat, bool):
        raise FabricqError(f"data.chat_template must be true or false, got {chat!r}")
    if eval_cfg.enabled:
        stride = getattr(eval_cfg, "stride", None)
        if stride is not None and (isinstance(stride, bool) or not isinstance(stride, int)
                                   or not 0 < stride < eval_cfg.seq_len):
            raise FabricqError(f"eval.stride must be null or an integer from 1 to eval.seq_len - 1 "
                               f"({eval_cfg.seq_len - 1}), got {stride!r}")


@dataclass
class TextData:
    calibration: torch.Tensor  # (num_samples, seq_len) token ids
    evaluation: torch.Tensor | None  # (windows, eval_seq_len) token ids; None with eval disabled
    # How the evaluation windows were made (bos, seq_len, stride, windows), for the report.
    eval_convention: dict = field(default_factory=dict)
    calibration_convention: dict = field(default_factory=dict)  # bos, sampling, chat_template


def _evaluation_stream(tokenizer, data_cfg, eval_cfg, held_out: list[str]) -> torch.Tensor:
    if eval_cfg.path is None:
        return tokenize_stream(tokenizer, held_out)
    eval_file = existing_text_file(eval_cfg.path, "eval.path")
    # A raw text file is evaluated as one stream, exactly as written (WikiText-2 convention).
    if eval_file.suffix == ".txt":
        return tokenize_stream(tokenizer, [read_text(eval_file)])
    return tokenize_stream(tokenizer, load_documents(eval_cfg.path, data_cfg.text_field, "eval.path"))


def prepare_text(tokenizer, data_cfg, eval_cfg) -> TextData:
    """Calibration windows and (with `eval.enabled`) evaluation windows. The held-out documents
    (when `eval.path` is null) are left out of calibration whether or not evaluation runs, so the
    same recipe quantizes the same model either way; with evaluation off no evaluation setting is read."""
    check_text_settings(data_cfg, eval_cfg)
    sampling = getattr(data_cfg, "sampling", DEFAULT_SAMPLING)
    chat = getattr(data_cfg, "chat_template", False)
    bos_id = resolve_bos(tokenizer, getattr(data_cfg, "bos", "auto"))
    if bos_id is not None and data_cfg.seq_len == 1:  # not the text's fault: a window would be BOS alone
        raise FabricqError("data.seq_len=1 leaves no room for text after the BOS token: use 2 or more")
    if chat:
        check_chat_template(tokenizer)
        docs = load_conversations(data_cfg.path, data_cfg.text_field)
    else:
        docs = load_documents(data_cfg.path, data_cfg.text_field)
    held_out = eval_cfg.path is None
    calib_docs, eval_docs = split_documents(docs, data_cfg.eval_fraction, data_cfg.seed) if held_out else (docs, [])
    if chat:  # held-out chats are evaluated on their plain text, like any held-out document
        source = str(Path(data_cfg.path).expanduser()) if data_cfg.path is not None else "the built-in text"
        calib_docs = render_chats(tokenizer, calib_docs, source, bos_id)
        eval_docs = [c.text for c in eval_docs]
    if sampling == "stream":
        calibration = calibration_samples(tokenize_stream(tokenizer, calib_docs), data_cfg.num_samples,
                                          data_cfg.seq_len, data_cfg.seed, bos_id)
    else:
        calibration = document_samples(encode_documents(tokenizer, calib_docs),
                                       data_cfg.num_samples, data_cfg.seq_len, data_cfg.seed,
                                       bos_id, document_separator(tokenizer, bos_id))
    evaluation, convention = None, {}
    if eval_cfg.enabled:
        stride = getattr(eval_cfg, "stride", None)
        eval_stream = _evaluation_stream(tokenizer, data_cfg, eval_cfg, eval_docs)
        evaluation = evaluation_windows(eval_stream, eval_cfg.seq_len, eval_cfg.max_windows, bos_id, stride)
        convention = {"bos": bos_id is not None, "seq_len": int(evaluation.shape[1]), "stride": stride,
                      "windows": int(evaluation.shape[0])}
        del eval_stream
    text = TextData(calibration=calibration, evaluation=evaluation, eval_convention=convention,
                    calibration_convention={"bos": bos_id is not None, "sampling": sampling, "chat_template": chat})
    del docs, calib_docs, eval_docs
    release_freed_memory(collect_cycles=True)  # once: the tokenizer's transient buffers
    return text
