"""What the command-line tools do with a bad input: one line on stderr naming it, exit code 2, no traceback.

The library reports a bad input (a missing or damaged file, a malformed record, a refused setting) as a
ValueError or OSError whose message names the file and the problem; `run_tool` turns those into that line.
Anything else is a bug, and keeps its traceback.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

BAD_INPUT = (ValueError, OSError)


def error_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error)


def run_tool(main: Callable[[Optional[Sequence[str]]], Optional[int]], argv: Optional[Sequence[str]] = None) -> int:
    """`main(argv)`'s exit code (None: 0); a bad input is reported in one line with code 2."""
    try:
        return main(argv) or 0
    except BAD_INPUT as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 2
