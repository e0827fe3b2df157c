"""JSON Lines reading and writing with line numbers in every error."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from mosear_fast.atomic import atomic_write_text


class JsonlError(ValueError):
    """A JSONL file that cannot be read: missing, not UTF-8, a line that is not valid JSON, or one that Python
    cannot hold (an integer of more than ``sys.get_int_max_str_digits()`` digits, nesting deeper than the
    recursion limit)."""


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, object]]:
    """Return ``(line_number, value)`` for every non-blank line of ``path`` (numbers start at 1).

    Values are whatever JSON the line holds; callers check that rows are objects, so one bad row
    can be reported rather than abort the whole file. Raises :class:`JsonlError` with a one-line
    message naming the file (and the line) when the file cannot be read at all.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JsonlError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise JsonlError(f"{p}: is a directory, expected a .jsonl file") from None
    except UnicodeDecodeError as e:
        raise JsonlError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise JsonlError(f"{p}: cannot read ({e.strerror or e})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise JsonlError(f"{p}: line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise JsonlError(f"{p}: line {number}: JSON nested too deeply to read") from None
        except ValueError as e:  # valid JSON Python refuses, e.g. an integer past sys.get_int_max_str_digits()
            reason = str(e).split(";")[0]  # drop the advice to call sys.set_int_max_str_digits
            raise JsonlError(f"{p}: line {number}: unreadable JSON value ({reason})") from None
    return rows


def write_jsonl(path: str | os.PathLike, rows: Iterable[object]) -> None:
    """Write one JSON value per line to ``path`` atomically (UTF-8, non-ASCII kept as is)."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    atomic_write_text(path, text)
