"""One exception type for bad user input, so entry points can print it as a single line."""

from __future__ import annotations

from pathlib import Path


class CMRCNetError(Exception):
    """Bad input: the message names the file or config key and the problem, on one line."""


def input_error(where: str | Path, problem: str) -> CMRCNetError:
    """Build the error with the house format `where: problem`."""
    return CMRCNetError(f"{where}: {problem}")
