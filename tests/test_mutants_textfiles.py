"""Which text files fabricq.textfiles accepts and what it reads from them, in the corners the
data tests leave open: a .json file holding JSON Lines, the file check without a text field (the
one `eval.path` gets), and what the refusals name. Written against the mutants of
benchmarks/mutation.py that tests/test_data.py let survive (see benchmarks/results/2026-11-28-mutation-testing.md: mutation
testing)."""

from __future__ import annotations

import json

import pytest

from fabricq.errors import FabricqError
from fabricq.textfiles import check_text_path, load_conversations, load_documents

TEXTS = ["first document", "second one", "third"]


def test_a_json_file_holding_json_lines_is_read_row_by_row(tmp_path):
    # `datasets` reads such a .json file as JSON Lines; so does fabricq, instead of refusing it.
    file = tmp_path / "rows.json"
    file.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    assert load_documents(str(file)) == TEXTS
    check_text_path(str(file), "eval.path")
    check_text_path(str(file), "data.path", "text")


def test_the_file_check_without_a_text_field_accepts_plain_text_and_json_lines(tmp_path):
    """`eval.path` is checked without a text field: a .txt file is read as text (never parsed as
    JSON), the other kinds row by row; bad files are still refused."""
    plain = tmp_path / "notes.txt"
    plain.write_text("Not JSON: {\n\nsecond paragraph")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"body": t}) + "\n" for t in TEXTS))  # any field: rows only
    assert check_text_path(str(plain), "eval.path") is None
    assert check_text_path(str(rows), "eval.path") is None
    (tmp_path / "bad.jsonl").write_text('{"body": "a"}\n{"body": \n')
    with pytest.raises(FabricqError, match=r"bad.jsonl: line 2 is not valid JSON"):
        check_text_path(str(tmp_path / "bad.jsonl"), "eval.path")
    (tmp_path / "bad.txt").write_bytes(b"text\x00")
    with pytest.raises(FabricqError, match=r"bad.txt is not a text file: line 1 holds a NUL byte"):
        check_text_path(str(tmp_path / "bad.txt"), "eval.path")


def test_the_first_nul_byte_is_the_one_named(tmp_path):
    file = tmp_path / "binary.txt"
    file.write_bytes(b"fine\n\x00 here\nfine\n\x00 again\n")
    with pytest.raises(FabricqError, match=r"binary.txt is not a text file: line 2 holds a NUL byte"):
        load_documents(str(file))


def test_a_missing_file_is_named_by_its_setting(tmp_path):
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(FabricqError, match=rf"^data.path does not exist or is not a file: {missing}$"):
        load_documents(str(missing))
    with pytest.raises(FabricqError, match=rf"^eval.path does not exist or is not a file: {missing}$"):
        load_documents(str(missing), "text", "eval.path")


def test_a_parquet_file_without_any_asked_column_names_them_all(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = tmp_path / "other.parquet"
    pq.write_table(pa.table({"body": TEXTS}), file)
    with pytest.raises(FabricqError) as err:
        load_conversations(str(file))
    assert str(err.value) == (f"{file} has no column 'messages' or 'text' (columns: ['body']); set data.text_field")
