"""Logging set-up shared by the CLI and the Snakemake scripts, and the one-line error exit."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cmrcnet.errors import CMRCNetError

LOGGER = logging.getLogger("cmrcnet")


def setup_logging(log_file: str | Path | None = None, level: int = logging.INFO) -> None:
    """Log to stderr, or to `log_file` (progress bars included) when one is given."""
    LOGGER.handlers.clear()
    LOGGER.setLevel(level)
    LOGGER.propagate = False
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        stream = open(log_file, "w", buffering=1)
        sys.stderr = stream  # tqdm and warnings from libraries go to the rule's log too
    else:
        stream = sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    LOGGER.addHandler(handler)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").handlers = [handler]


@contextmanager
def exit_on_input_error() -> Iterator[None]:
    """Turn a CMRCNetError into one line on the terminal (and in the log) and exit status 1."""
    terminal = sys.__stderr__
    try:
        yield
    except CMRCNetError as exc:
        LOGGER.error("%s", exc)
        if sys.stderr is not terminal:
            print(f"error: {exc}", file=terminal, flush=True)
        raise SystemExit(1) from None
