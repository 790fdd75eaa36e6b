"""Messages to the person running the trainer: one stdlib logger, written by the main process
only (rank 0 of a launch), through tqdm so progress bars are not torn.

Accelerate's `get_logger` would do the main-process filtering too, but prefixes every line
with "[RANK 0]"; the environment's RANK (set by torchrun and `accelerate launch`) is enough.
"""

from __future__ import annotations

import logging
import os
import sys

from tqdm.auto import tqdm

logger = logging.getLogger("dpo")


class _MainProcessTqdmHandler(logging.Handler):
    """Writes each record of rank 0 with `tqdm.write` to the current sys.stdout (looked up per
    record, so redirected or captured output sees it)."""

    def emit(self, record: logging.LogRecord) -> None:
        if int(os.environ.get("RANK", "0")) == 0:
            tqdm.write(self.format(record), file=sys.stdout)


def configure_console(level: int = logging.INFO) -> None:
    """Plain messages at `level` and above; safe to call more than once."""
    if not any(isinstance(h, _MainProcessTqdmHandler) for h in logger.handlers):
        handler = _MainProcessTqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
