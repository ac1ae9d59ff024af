"""What every fabricq command shares on its command line (`python -m fabricq`, `fabricq.convert`,
`fabricq.inspect`, `fabricq.summary`): an error the user caused is one line `fabricq: error: …` on
stderr and exit code 2; `FABRICQ_DEBUG=1` lets the exception through with its traceback instead.

Imports nothing heavy: every command reports its argument errors before torch or transformers load.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path
from typing import Callable, NoReturn

from fabricq.errors import FabricqError

DEBUG_VARIABLE = "FABRICQ_DEBUG"


def debugging() -> bool:
    """FABRICQ_DEBUG=1: errors keep their traceback."""
    return os.environ.get(DEBUG_VARIABLE) == "1"


def fail(message: str) -> NoReturn:
    print(f"fabricq: error: {message}", file=sys.stderr)
    sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors (a missing or unknown argument, a bad choice or
    number) are one `fabricq: error:` line with exit code 2 instead of the usage text."""

    def error(self, message: str) -> NoReturn:
        if debugging():
            super().error(message)
        fail(f"{message} (see {self.prog} --help)")


def os_error_message(err: OSError) -> str:
    """A file-system error as what happened to which file, and what to do."""
    where = f": {err.filename}" if err.filename else ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(err):
        return f"no space left on device{where}: free space and rerun"
    what = (err.strerror or type(err).__name__).lower()
    if isinstance(err, PermissionError) or err.errno == errno.EROFS:
        return f"{what}{where}: change its permissions or choose another place"
    return f"{what}{where}" if where else f"{what}: {err}"


def run_command(body: Callable[[], int]) -> int:
    """Run a command's body: a FabricqError or a file-system error becomes one `fabricq: error:`
    line and exit code 2 (returned, so a caller in the same process gets the code); with
    FABRICQ_DEBUG=1 it is raised instead."""
    try:
        return body()
    except FabricqError as err:
        if debugging():
            raise
        message = str(err)
    except OSError as err:
        if debugging():
            raise
        message = os_error_message(err)
    print(f"fabricq: error: {message}", file=sys.stderr)
    return 2


def read_json_object(path: Path, what: str | None = None) -> dict:
    """A JSON file that must hold an object (a dict): a missing file, one that is not UTF-8 text,
    not JSON, or JSON of another type is a FabricqError naming it."""
    path = Path(path)
    name = what or str(path)
    if not path.is_file():
        raise FabricqError(f"{name} is missing")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise FabricqError(f"{name} is not a JSON text file (not UTF-8: binary or damaged)") from None
    except json.JSONDecodeError as err:
        raise FabricqError(f"{name} is not valid JSON: {err}") from None
    except RecursionError:
        raise FabricqError(f"{name} nests its JSON too deeply to read (damaged, or not a model config)") from None
    if not isinstance(data, dict):
        raise FabricqError(f"{name} holds a JSON {json_type(data)}, not an object ({{...}})")
    return data


def json_type(value) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)
