"""JSON Lines reading shared by prompt files (``tasks.prompt_sets``) and metrics files
(``commands.plot``): blank lines are skipped and a line that is not JSON is reported with its
number, so each caller can word the error for its own input (:class:`JSONLineError`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator


class JSONLineError(ValueError):
    """Line ``lineno`` of ``path`` is not valid JSON (``msg`` at column ``colno``)."""

    def __init__(self, path: str | Path, lineno: int, err: json.JSONDecodeError, line: str):
        super().__init__(f"{path}: line {lineno} is not valid JSON ({err.msg} at column {err.colno})")
        self.path, self.lineno, self.msg, self.colno, self.line = path, lineno, err.msg, err.colno, line


def json_lines(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(1-based line number, decoded value) for every non-blank line of ``path``."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise JSONLineError(path, lineno, err, line) from None
            yield lineno, value
