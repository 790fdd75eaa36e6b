"""One error path for train.py and chat.py: every failure the user can cause ends with a
message on stderr and exit status 1 or 2 (130 for Ctrl-C); `--debug` or DPO_DEBUG=1 shows
the traceback instead."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable

from dpo_core.errors import RunFailure, TrainingInterrupted, UserError

DEBUG_ENV = "DPO_DEBUG"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


def wants_traceback(argv: list[str] | None) -> bool:
    args = sys.argv[1:] if argv is None else argv
    return "--debug" in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_command(command: Callable[[list[str] | None], int], argv: list[str] | None) -> int:
    """`command(argv)`'s exit status; a failure becomes a one-paragraph message instead."""
    debug = wants_traceback(argv)
    try:
        return command(argv)
    except TrainingInterrupted as stopped:  # Ctrl-C handled at a safe point
        print(stopped, file=sys.stderr)
        return stopped.exit_status
    except KeyboardInterrupt:
        if debug:
            raise
        print("\nInterrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (UserError, RunFailure) as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return error.exit_status
    except OSError as error:
        if debug:
            raise
        print(f"error: {describe_os_error(error)}", file=sys.stderr)
        return 1
    except Exception as error:  # a bug, not a user mistake: say so, keep the way to the details
        if debug:
            raise
        lines = str(error).strip().splitlines()
        print(f"error: unexpected {type(error).__name__}: {lines[0] if lines else ''}\n"
              f"This is likely a bug in dpo. Rerun with --debug (or {DEBUG_ENV}=1) for the "
              "traceback, and please report it.", file=sys.stderr)
        return 1


def describe_os_error(error: OSError) -> str:
    """What the operating system refused, naming the path and what to do about it."""
    where = f" ({error.filename})" if error.filename else ""
    if error.errno == errno.ENOSPC:
        return f"no space left on the device{where}; free some space and run again"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"not allowed to write{where}: {error.strerror}; choose another location"
    return f"{error.strerror or error}{where}"
