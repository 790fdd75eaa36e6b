"""A run claims its output_dir before it writes anything, and its processes agree that they are
one run.

The main process takes the directory's lock (`dpo_core.run_lock`: one run per output_dir).
With several processes, on one machine or several, every process then reports what it was
started with, and the run stops on all of them with one message, before any work, when

- its nodes were launched for different numbers of machines (`torchrun --nnodes`,
  `accelerate launch --num_machines`; torchrun starts them anyway, and the run would end with
  a node waiting for the missing one);
- its processes were started with different settings (another --output_dir, --batch_size...);
- a process does not see the main process's lock: its node does not share the output_dir's
  file system. A checkpoint holds files of every process and resuming reads each process's
  own, so every node must see the same output_dir (a shared file system).
"""

from __future__ import annotations

import dataclasses
import os
import socket

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from dpo_core import run_lock
from dpo_core.config.train import TrainConfig
from dpo_core.errors import ConfigError

# What torchrun tells each process about the number of nodes it was launched for (`--nnodes`;
# `accelerate launch --num_machines` passes it on).
NODES_VARIABLE = "GROUP_WORLD_SIZE"


def claim_output_dir(config: TrainConfig, accelerator: Accelerator) -> run_lock.RunLock | None:
    """Make and lock output_dir from the main process, then check that every process sees
    the lock and runs the same launch and settings; raise ConfigError on every process
    otherwise. Returns the lock on the main process (None on the others)."""
    lock, refusal = None, None
    if accelerator.is_main_process:
        os.makedirs(config.output_dir, exist_ok=True)
        try:
            lock = run_lock.claim(config.output_dir)
        except ConfigError as error:
            refusal = str(error)
    if accelerator.num_processes > 1:
        # Every process learns the outcome, so all stop together instead of waiting.
        token, refusal = broadcast_object_list([lock and lock.holder.token, refusal])
    if refusal:
        raise ConfigError(refusal)
    if accelerator.num_processes > 1:
        seen = run_lock.read_lock(config.output_dir)
        reports = gather_object([{
            "host": socket.gethostname(), "nodes": os.environ.get(NODES_VARIABLE),
            "settings": dataclasses.asdict(config),
            "sees_lock": seen is not None and seen.token == token}])
        if problems := disagreements(reports, config.output_dir):
            if lock is not None:
                lock.release()
            raise ConfigError("the processes of this run disagree: " + "; ".join(problems))
    return lock


def disagreements(reports: list[dict], output_dir: str) -> list[str]:
    """What the processes' start-up `reports` (in process order: host, nodes, settings,
    sees_lock) disagree on, each with what to do; empty when they are one run."""
    main = reports[0]
    problems = []
    if len({report["nodes"] for report in reports}) > 1:
        counts = ", ".join(f"process {i} on {r['host']}: {r['nodes']}"
                           for i, r in enumerate(reports))
        problems.append(f"its nodes were launched for different numbers of machines ({counts}); "
                        "start every node with the same torchrun --nnodes or accelerate launch "
                        "--num_machines")
    for i, report in enumerate(reports[1:], start=1):
        changed = [f"--{name} {value!r} (process 0: {main['settings'][name]!r})"
                   for name, value in report["settings"].items()
                   if main["settings"].get(name) != value]
        if changed:
            problems.append(f"process {i} on {report['host']} was started with "
                            f"{', '.join(changed)}; start every node with the same command")
    blind = [f"process {i} on {r['host']}" for i, r in enumerate(reports) if not r["sees_lock"]]
    if blind:
        problems.append(
            f"{', '.join(blind)} cannot see the lock that process 0 on {main['host']} wrote into "
            f"--output_dir {output_dir!r}: put the output_dir on a file system that every node "
            "shares (a checkpoint holds files of every process, and resuming reads each "
            "process's own)")
    return problems
