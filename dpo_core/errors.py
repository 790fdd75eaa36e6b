"""The failures a command reports as a message and an exit status, without a traceback.

Kept free of heavy imports: `train.py --help` and the error path load this module only.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix (a flag, a data file, a model, a checkpoint, an output
    directory); the message names it and says what to do. Exit status 2."""

    exit_status = 2


class RunFailure(Exception):
    """A run that started and could not go on (non-finite loss, out of memory, disk full);
    the message says what was kept and how to continue. Exit status 1."""

    exit_status = 1


class TrainingInterrupted(Exception):
    """Training stopped by Ctrl-C at a safe point; the message says what was saved and how
    to continue. Exit status 130, as a shell reports Ctrl-C."""

    exit_status = 130


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, for a one-line report (its type's name when
    the message is empty)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
