"""JSON-lines files: the reader and writer of the project's ``.jsonl`` data files.

Prompt files, trace files, the task loaders' local data and the organism's exported data all go
through :func:`read_jsonl` / :func:`write_jsonl`, so a bad line is reported the same way
everywhere (its path and line number, then the fix) and a file is never half written.  One file
is not data of this kind: the judge's verdict cache (``integrations/judge.py``) is an append-only
log, shared by threads and read tolerantly (a torn last line is a verdict asked again).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from resp_plugin.errors import InputDataError

T = TypeVar("T")


def read_jsonl(path: str | Path, make: Callable[[dict[str, Any]], T] | None = None, *,
               what: str = "valid JSON", fix: str = "each line must be one JSON object") -> list[T]:
    """The JSON objects of a JSON-lines file, blank lines skipped, each passed through ``make``.

    A line that is not JSON, not an object, or that ``make`` rejects (TypeError, e.g. a missing
    or unknown field of a dataclass) raises ValueError ``PATH:LINE is not {what} (...); {fix}``.
    """
    rows: list[Any] = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputDataError(f"{path}:{n} is not {what} ({e.msg}); {fix}") from e
            if not isinstance(row, dict):
                raise InputDataError(f"{path}:{n} must be a JSON object, got {type(row).__name__}; {fix}")
            try:
                rows.append(make(row) if make is not None else row)
            except TypeError as e:
                raise InputDataError(f"{path}:{n} is not {what} ({e}); {fix}") from e
    return rows


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write one JSON object a line, atomically: a torn write never leaves a file that reads back."""
    from resp_plugin.io import atomic_write_text  # the one home of atomic writes

    atomic_write_text(Path(path), "".join(json.dumps(row) + "\n" for row in rows))
