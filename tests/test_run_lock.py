"""One run per output directory: a second run stops naming the running one; a lock left by a run
that was killed is taken over with a notice; a run holds the lock while it trains and removes
it when it ends."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT, train_args

import train
from dpo_core import run_lock
from dpo_core.errors import ConfigError
from dpo_core.run_files import LOCK_FILE
from dpo_core.training.objective import PreferenceObjective

# A process that takes the lock of the directory in argv[1], says so, and holds it.
HOLDER = """
import sys, time
from dpo_core import run_lock
lock = run_lock.claim(sys.argv[1])
print(lock.holder.started, flush=True)
time.sleep(float(sys.argv[2]))
"""


def hold_lock(directory, seconds: float) -> tuple[subprocess.Popen, str]:
    """Another process holding `directory`'s lock for `seconds` (then exiting without
    releasing it, as a killed run does): (the process, its start time as the lock says)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), str(seconds)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    return holder, holder.stdout.readline().strip()


def test_a_second_run_stops_naming_the_running_one(tiny_model_dir, pairs_file, tmp_path,
                                                   capsys):
    """The same job submitted twice: the first holds output_dir; the second, even with
    --overwrite_output_dir, stops before touching anything and names the first."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("{}")  # what the first run wrote
    holder, started = hold_lock(out, 60)
    try:
        code = train.main(train_args(tiny_model_dir, pairs_file, out, "--overwrite_output_dir"))
    finally:
        holder.kill()
        holder.wait()
    assert code == 2
    error = capsys.readouterr().err
    assert (f"--output_dir {str(out)!r} is in use by another run (host "
            f"{socket.gethostname()}, pid {holder.pid}, started {started}); two runs writing "
            "into one directory would mix their files.") in error
    assert sorted(os.listdir(out)) == ["metrics.json", LOCK_FILE]  # nothing cleared


class LockWatch(PreferenceObjective):
    """Records who holds output_dir's lock while the run trains."""

    holders: list = []

    def __call__(self, model, batch, reference=None):
        LockWatch.holders.append(run_lock.read_lock(self.output_dir))
        return super().__call__(model, batch, reference)

    @classmethod
    def from_config(cls, config, logps_fn):
        objective = super().from_config(config, logps_fn)
        objective.output_dir = config.output_dir
        return objective


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_notice(tiny_model_dir, pairs_file,
                                                                 tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    holder, started = hold_lock(out, 0)
    holder.wait()  # gone, its lock left behind
    LockWatch.holders.clear()
    assert train.main(train_args(tiny_model_dir, pairs_file, out, "--max_steps", "1"),
                      make_objective=LockWatch.from_config) == 0
    printed = capsys.readouterr().out
    assert (f"Taking over the lock of {str(out)!r} left by a run that stopped without removing "
            f"it (its process (host {socket.gethostname()}, pid {holder.pid}, started "
            f"{started}) is gone).") in printed
    assert LockWatch.holders and {h.pid for h in LockWatch.holders} == {os.getpid()}
    assert not (out / LOCK_FILE).exists()  # removed when the run ended


def write_lock(directory, *, host: str, pid: int, process_started: int | None,
               age_s: float = 0.0) -> None:
    (directory / LOCK_FILE).write_text(json.dumps({
        "host": host, "pid": pid, "started": "2026-01-01 00:00:00 UTC",
        "process_started": process_started, "token": "other"}))
    then = time.time() - age_s
    os.utime(directory / LOCK_FILE, (then, then))


@pytest.mark.parametrize("lock, live", [
    # Another host: its processes cannot be seen, its heartbeat can.
    ({"host": "node-7", "pid": 1, "process_started": 5}, True),
    ({"host": "node-7", "pid": 1, "process_started": 5, "age_s": run_lock.STALE_AFTER_S + 60},
     False),
    # This host: this very process is alive; the same pid started at another time is not
    # the process that wrote the lock (the pid was reused).
    ({"host": socket.gethostname(), "pid": os.getpid(), "process_started": None}, True),
    ({"host": socket.gethostname(), "pid": os.getpid(), "process_started": -1}, False),
])
def test_which_locks_are_live(lock, live, tmp_path):
    write_lock(tmp_path, **lock)
    if live:
        with pytest.raises(ConfigError, match=f"in use by another run \\(host {lock['host']}, "
                                              f"pid {lock['pid']}, started 2026-01-01"):
            run_lock.claim(str(tmp_path))
        return
    taken = run_lock.claim(str(tmp_path))
    assert run_lock.read_lock(str(tmp_path)) == taken.holder
    taken.release()
    assert os.listdir(tmp_path) == []


def test_an_unreadable_lock_is_taken_over(tmp_path):
    (tmp_path / LOCK_FILE).write_text("{not json")
    run_lock.claim(str(tmp_path)).release()
    assert os.listdir(tmp_path) == []


def test_release_leaves_another_runs_lock_and_the_heartbeat_refreshes_its_own(
        tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    lock = run_lock.claim(str(tmp_path))
    path = tmp_path / LOCK_FILE
    os.utime(path, (0, 0))
    deadline = time.time() + 10
    while os.stat(path).st_mtime == 0 and time.time() < deadline:
        time.sleep(0.05)
    assert os.stat(path).st_mtime > 0  # refreshed by the heartbeat
    write_lock(tmp_path, host="node-7", pid=1, process_started=None)  # taken over meanwhile
    lock.release()
    assert run_lock.read_lock(str(tmp_path)).host == "node-7"
