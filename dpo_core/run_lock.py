"""One run per output directory: a lock file naming the run that holds it.

A job submitted twice (common on clusters) must not have two runs writing into one
--output_dir. A run's main process creates `run.lock` there before it writes anything, holding
its host, pid and start time, and refreshes the file's modification time every
`HEARTBEAT_S` seconds while it runs; a second run stops with a message naming the first. The
lock is removed when the run ends, whether it finished, failed or was interrupted.

A lock left by a run that was killed (SIGKILL, a node lost) is stale and taken over with a
notice:

- written on this host: its process is gone, or its pid now belongs to a process started at
  another time;
- written on another host (whose processes cannot be seen from here): its heartbeat is older
  than `STALE_AFTER_S` seconds.

The file appears whole or not at all (written under a private name, then hard-linked into
place, which fails if a lock exists), so a reader never sees half a lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from dpo_core.console import logger
from dpo_core.errors import ConfigError
from dpo_core.run_files import LOCK_FILE

HEARTBEAT_S = 60
# A lock from another host is stale after 10 missed heartbeats: a run whose node died, not one
# that is slow (its heartbeat thread keeps running through any long step).
STALE_AFTER_S = 600


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: enough to tell whether it still runs, and to name it."""

    host: str
    pid: int
    started: str  # when the run took the lock, UTC, for people
    process_started: int | None  # the process's start (Linux clock ticks since boot)
    token: str  # unique per run: processes on other nodes compare it (a shared file system)

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started}"


def _process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, Linux), to tell a reused pid from
    the original; None where /proc cannot say."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name (field 2) may hold spaces: count fields after its ')'.
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _running(pid: int, process_started: int | None) -> bool:
    """Whether the process that wrote a lock on this host is still running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    now = _process_start(pid)
    return process_started is None or now is None or now == process_started


class RunLock:
    """The lock this run holds on an output_dir (see the module docstring)."""

    def __init__(self, path: str, holder: Holder):
        self.path, self.holder = path, holder
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="dpo-run-lock", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):  # removed by hand: nothing to refresh
                os.utime(self.path)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still this run's; idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        if (read_lock(os.path.dirname(self.path)) or self.holder).token == self.holder.token:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)


def read_lock(output_dir: str) -> Holder | None:
    """The holder named in output_dir's lock; None without a readable one."""
    try:
        with open(os.path.join(output_dir, LOCK_FILE)) as f:
            return Holder(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None


def claim(output_dir: str) -> RunLock:
    """Lock `output_dir` (which must exist) for this process, taking over a stale lock with a
    notice; raise ConfigError naming the run that holds a live one."""
    path = os.path.join(output_dir, LOCK_FILE)
    me = Holder(host=socket.gethostname(), pid=os.getpid(),
                started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                process_started=_process_start(os.getpid()), token=uuid.uuid4().hex)
    private = os.path.join(output_dir, f".{LOCK_FILE}.{me.token}")
    with open(private, "w") as f:
        json.dump(asdict(me), f)
    try:
        while True:
            try:
                os.link(private, path)  # fails if a lock exists: never two holders
                return RunLock(path, me)
            except FileExistsError:
                _take_over_if_stale(path, output_dir)
    finally:
        os.remove(private)


def _take_over_if_stale(path: str, output_dir: str) -> None:
    """Remove the lock at `path` if its run is gone (with a notice); raise ConfigError if it
    runs."""
    try:
        age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:  # released meanwhile
        return
    holder = read_lock(output_dir)
    if holder is None:
        reason = "it cannot be read"
    elif holder.host == socket.gethostname():
        if _running(holder.pid, holder.process_started):
            raise _in_use(output_dir, holder)
        reason = f"its process ({holder.describe()}) is gone"
    elif age <= STALE_AFTER_S:
        raise _in_use(output_dir, holder)
    else:
        reason = (f"it was written on another host ({holder.describe()}) and not refreshed "
                  f"for {age / 60:.0f} minutes")
    # Another run may have judged it stale too and locked since: remove only what was judged.
    if (read_lock(output_dir) or holder) == holder:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        logger.warning(f"Taking over the lock of {output_dir!r} left by a run that stopped "
                       f"without removing it ({reason}).")


def _in_use(output_dir: str, holder: Holder) -> ConfigError:
    return ConfigError(
        f"--output_dir {output_dir!r} is in use by another run ({holder.describe()}); two "
        "runs writing into one directory would mix their files. Wait for it to end, stop it, "
        f"or choose another --output_dir. If that run is gone, delete "
        f"{os.path.join(output_dir, LOCK_FILE)!r} (a lock from another host is taken over by "
        f"itself {STALE_AFTER_S // 60} minutes after its last heartbeat).")
