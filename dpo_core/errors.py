"""Every failure a command reports as a message and an exit status, without a traceback.

Three kinds, by what the user does next:
- `UserError` (exit 2): something to fix in the command, a file, a model or a directory;
- `RunFailure` (exit 1): a run that started and could not go on; the message says what was
  kept and how to continue;
- `TrainingInterrupted` (exit 130): Ctrl-C, handled at a safe point.
The classes below refine them by what went wrong; `dpo_core.cli.run_command` turns any of them
into one paragraph on stderr. Kept free of heavy imports: `train.py --help` and the error path
load this module only.
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


# -- what the user can fix --------------------------------------------------------------------
class ConfigError(UserError, ValueError):
    """A setting, or a combination of settings, that cannot work; the message says which."""


class DataError(UserError, ValueError):
    """Bad input data; the message names the source (file or dataset), row and field.

    `reason` is the same problem without the row index, for counting dropped rows.
    """

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message

    def __reduce__(self):
        # Raised in a tokenizing worker process and re-raised here: keep the reason.
        return type(self), (str(self), self.reason)


class ModelLoadError(UserError, RuntimeError):
    """The model or tokenizer could not be loaded; the message names it and says what to do."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be resumed from; the message names it and says why."""


class ReportError(UserError, ValueError):
    """A run directory or log that cannot be reported on; the message names the file."""


class EvaluationError(UserError, ValueError):
    """A run directory, prompts file or judge that `dpo-eval` cannot use; the message names it
    and says what to do."""


# -- runs that could not go on ----------------------------------------------------------------
class CheckpointSaveError(RunFailure, OSError):
    """A checkpoint could not be written (e.g. the disk is full); nothing half-written is
    left behind and the earlier checkpoints are intact."""


class NonFiniteError(RunFailure, RuntimeError):
    """The loss or the gradient stopped being finite; the message names the step."""


class DeviceMemoryError(RunFailure, RuntimeError):
    """The accelerator ran out of memory; the message names the step and what to change."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, for a one-line report (its type's name when
    the message is empty)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
