"""Reading calibration and evaluation text files, checked row by row.

A .txt file holds one document per blank-line-separated paragraph; .jsonl/.json/.parquet files one
per row (the `data.text_field` column), or one chat conversation per row (a `messages` column of
{role, content} lists). A bad file fails with one message naming the file and the line (text,
JSON Lines) or the 0-based row (a JSON array, parquet), before any model is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fabricq.errors import FabricqError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
MESSAGES_FIELD = "messages"


def builtin_documents() -> list[str]:
    """English text present on every machine with CPython: its bundled documentation topics."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def read_text(file: Path) -> str:
    """The file as text; empty, binary or non-UTF-8 files are refused with the offending line."""
    data = file.read_bytes()
    if not data.strip():
        raise FabricqError(f"{file} is empty")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise FabricqError(f"{file} is not a text file: line {_line_of(data, nul)} holds a NUL byte (binary data?)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise FabricqError(
            f"{file} is not UTF-8 text: byte 0x{data[err.start]:02x} on line {_line_of(data, err.start)} "
            f"cannot be decoded (re-save the file as UTF-8)"
        ) from None


def _json_lines(file: Path, text: str) -> list[tuple[str, object]]:
    rows = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may sit in a string
        if not line.strip():
            continue
        try:
            rows.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise FabricqError(f"{file}: line {number} is not valid JSON: {err.msg} (column {err.colno})") from None
    return rows


def _json_rows(file: Path, text: str) -> list[tuple[str, object]]:
    """A JSON array of objects, one object, or JSON Lines (which `datasets` also reads as .json)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # more than one top-level value: JSON Lines
            return _json_lines(file, text)
        raise FabricqError(f"{file}: line {err.lineno} is not valid JSON: {err.msg} (column {err.colno})") from None
    if isinstance(value, list):
        return [(f"row {i}", row) for i, row in enumerate(value)]
    return [("row 0", value)]


def _parquet_rows(file: Path, columns: list[str]) -> list[tuple[str, object]]:
    """Rows of the first of `columns` the file has (every row as an empty record when none is
    asked: a check of the file's footer only)."""
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(file)
        if not columns:
            return [(f"row {i}", {}) for i in range(handle.metadata.num_rows)]
        present = [c for c in columns if c in handle.schema_arrow.names]
        if not present:
            raise FabricqError(f"{file} has no column {' or '.join(map(repr, columns))} "
                               f"(columns: {handle.schema_arrow.names}); set data.text_field")
        rows = handle.read(columns=present[:1]).to_pylist()
    except FabricqError:
        raise
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a file that is not parquet
        raise FabricqError(f"{file} is not a readable parquet file: {err}") from None
    return [(f"row {i}", row) for i, row in enumerate(rows)]


def _rows(file: Path, columns: list[str]) -> list[tuple[str, dict]]:
    """(where, record) for every record of a .jsonl/.json/.parquet file."""
    if file.suffix == ".parquet":
        rows = _parquet_rows(file, columns)
    else:
        text = read_text(file)
        rows = _json_lines(file, text) if file.suffix == ".jsonl" else _json_rows(file, text)
    if not rows:
        raise FabricqError(f"{file} is empty")
    for where, row in rows:
        if not isinstance(row, dict):
            raise FabricqError(f"{file}: {where} is a JSON {type(row).__name__}, not an object with a text field")
    return rows


def _text_of(file: Path, where: str, row: dict, text_field: str) -> str:
    if text_field not in row:
        raise FabricqError(f"{file}: {where} has no field {text_field!r} (it has {sorted(row)}); set data.text_field")
    text = row[text_field]
    if not isinstance(text, str):
        kind = "null" if text is None else type(text).__name__
        raise FabricqError(f"{file}: {where}: field {text_field!r} is {kind}, not a string")
    return text


def existing_text_file(path: str, what: str) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        raise FabricqError(f"{what} does not exist or is not a file: {file}")
    if file.suffix not in TEXT_SUFFIXES:
        raise FabricqError(f"{what} must be one of {sorted(TEXT_SUFFIXES)}, got {file.name}")
    return file


def check_text_path(path: str | None, what: str, text_field: str | None = None) -> None:
    """Refuse a missing file, an unknown suffix, and (reading it) a file that is empty, binary,
    not UTF-8, malformed JSON/JSONL or not parquet; with `text_field`, also rows without text."""
    if path is None:
        return
    file = existing_text_file(path, what)
    if text_field is not None:
        load_documents(path, text_field, what)
    elif file.suffix == ".txt":
        read_text(file)
    else:
        _rows(file, [])


def load_documents(path: str | None, text_field: str = "text", what: str = "data.path") -> list[str]:
    """Documents from a .txt (one per blank-line-separated paragraph), .jsonl/.json or .parquet
    file (one per row, column `text_field`; empty texts skipped), or the built-in text when `path`
    is None."""
    if path is None:
        return builtin_documents()
    file = existing_text_file(path, what)
    if file.suffix == ".txt":
        docs = [p for p in read_text(file).split("\n\n") if p.strip()]
    else:
        texts = [_text_of(file, where, row, text_field) for where, row in _rows(file, [text_field])]
        docs = [t for t in texts if t.strip()]
    if not docs:
        raise FabricqError(f"{file} contains no text")
    return docs


@dataclass(frozen=True)
class Conversation:
    where: str  # "line 3", "row 0", "document 5": named in errors
    messages: list  # [{"role": str, "content": str}, ...]
    text: str  # the plain text, for evaluation on held-out conversations


def _as_exchange(where: str, text: str) -> Conversation:
    """Plain text as one exchange: split at the whitespace nearest its middle, the first half is
    the user's turn and the rest the assistant's reply, so both roles hold real text of the source."""
    body = text.strip()
    middle = len(body) // 2
    cuts = [i for i in (body.rfind(" ", 0, middle), body.find(" ", middle)) if i > 0]
    cut = min(cuts, key=lambda i: abs(i - middle)) if cuts else middle
    turns = [{"role": "user", "content": body[:cut].strip()}, {"role": "assistant", "content": body[cut:].strip()}]
    return Conversation(where, turns, text)


def _conversation(file: Path, where: str, messages) -> Conversation:
    valid = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    )
    if not valid:
        raise FabricqError(
            f"{file}: {where}: {MESSAGES_FIELD!r} must be a non-empty list of "
            f"{{\"role\": string, \"content\": string}} objects, got {json.dumps(messages, default=str)[:80]}"
        )
    return Conversation(where, messages, "\n".join(m["content"] for m in messages))


def load_conversations(path: str | None, text_field: str = "text") -> list[Conversation]:
    """Chats for a chat template: rows of a .jsonl/.json/.parquet file with a `messages` column
    (then every row must hold a valid one); any other text, one exchange per document."""
    if path is not None:
        file = existing_text_file(path, "data.path")
        if file.suffix != ".txt":
            rows = _rows(file, [MESSAGES_FIELD, text_field])
            if MESSAGES_FIELD in rows[0][1]:
                return [_conversation(file, where, row.get(MESSAGES_FIELD)) for where, row in rows]
    return [_as_exchange(f"document {i}", doc) for i, doc in enumerate(load_documents(path, text_field))]
