"""Helpers for tests that run train.py in several processes (gloo on this CPU machine), and
the check that two runs made the same updates."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, read_log, train_records
from safetensors.torch import load_file

BIN = os.path.dirname(sys.executable)
CONFIGS = os.path.join(ROOT, "examples", "accelerate")

# train.py, except that every process SIGKILLs itself (no cleanup, no flush) as it starts
# writing checkpoint-N, N from $KILL_AT_CHECKPOINT: a crash in the middle of a save, after
# step N's record was logged. Under FSDP2 saving the adapter is collective, so every process
# reaches that point.
KILLED_DURING_SAVE = """
import os, runpy, signal, sys
sys.path.insert(0, os.getcwd())
import dpo_core.training.checkpoint as checkpoint

real_save_trained_weights = checkpoint.save_trained_weights
target = f".checkpoint-{os.environ['KILL_AT_CHECKPOINT']}.tmp"

def save_trained_weights(accelerator, model, directory):
    if target in directory:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save_trained_weights(accelerator, model, directory)

checkpoint.save_trained_weights = save_trained_weights
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


# train.py where the processes of SIGNAL_RANKS (e.g. "1" or "0,1") send themselves SIGNAL
# (SIGINT: a real Ctrl-C; SIGKILL: a crash, no cleanup) during their SIGNAL_AT_CALL-th training
# micro-batch (the reference and evaluation passes, without gradients, are not counted).
SIGNALLED_AT_CALL = """
import os, signal, sys
sys.path.insert(0, os.getcwd())
import torch
from dpo_core.cli import train_main
from dpo_core.training.objective import PreferenceObjective

calls = []

class SignalledAtCall(PreferenceObjective):
    def __call__(self, model, batch, reference=None):
        if torch.is_grad_enabled() and os.environ["RANK"] in os.environ["SIGNAL_RANKS"].split(","):
            calls.append(1)
            if len(calls) == int(os.environ["SIGNAL_AT_CALL"]):
                os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL"]))
        return super().__call__(model, batch, reference)

sys.argv = ["train.py", *sys.argv[1:]]
sys.exit(train_main(make_objective=SignalledAtCall.from_config))
"""


def assert_same_run(out, reference, *, evals: bool = True) -> None:
    """Per-step loss and gradient norm, final eval and saved weights all match."""
    mine, theirs = train_records(out), train_records(reference)
    assert [r["step"] for r in mine] == [r["step"] for r in theirs]  # each step exactly once
    for a, b in zip(mine, theirs, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=1e-5), a["step"]
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5), a["step"]
    if evals:
        losses = [[r["loss"] for r in read_log(d) if r["split"] == "eval"]
                  for d in (out, reference)]
        assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    # The LoRA adapter, or the whole model of --finetuning_type full.
    name = ("adapter_model.safetensors"
            if os.path.exists(os.path.join(reference, "adapter_model.safetensors"))
            else "model.safetensors")
    weights, expected = (load_file(os.path.join(d, name)) for d in (out, reference))
    assert weights.keys() == expected.keys()
    for name in expected:
        # Adam turns fp32 round-off in a near-zero gradient into an update of up to ~lr *
        # 1e-3; a wrong update would differ by ~lr (5e-3) itself.
        torch.testing.assert_close(weights[name], expected[name], rtol=1e-4, atol=1e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_environment(tmp_path, env: dict | None = None) -> dict:
    """The environment of a launched run: offline, one thread per process, an empty HF_HOME
    (no accelerate config file, only the flags and files given)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "HF_HOME": str(tmp_path / "hf_home"), **(env or {})}


def launch(launcher: list[str], args: list[str], tmp_path, script: str = "train.py",
           check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `launcher script args` from the repository root."""
    run = subprocess.run([*launcher, script, *args], cwd=ROOT,
                         env=launch_environment(tmp_path, env), capture_output=True, text=True)
    if check:
        assert run.returncode == 0, run.stderr[-4000:]
    return run


def launch_nodes(launchers: list[list[str]], args: list[str], tmp_path, *,
                 cwds: list[str] | None = None, check: bool = True,
                 script: str = os.path.join(ROOT, "train.py")) -> list[subprocess.CompletedProcess]:
    """Several machines simulated on this one: `launcher script args` per node, all started
    side by side (each from its own working directory in `cwds`, default the repository
    root), waited for together."""
    env = launch_environment(tmp_path)
    nodes = [subprocess.Popen([*launcher, script, *args], cwd=cwd, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for launcher, cwd in zip(launchers, cwds or [ROOT] * len(launchers), strict=True)]
    runs = [subprocess.CompletedProcess(node.args, 0, *node.communicate()) for node in nodes]
    for run, node in zip(runs, nodes, strict=True):
        run.returncode = node.returncode
        if check:
            assert run.returncode == 0, run.stderr[-4000:]
    return runs


def torchrun_node(node_rank: int, port: int, num_nodes: int = 2) -> list[str]:
    """`torchrun` for one process on simulated node `node_rank` of `num_nodes`, all meeting
    at 127.0.0.1:`port` (loopback only)."""
    return [os.path.join(BIN, "torchrun"), "--nnodes", str(num_nodes), "--node_rank",
            str(node_rank), "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
            "--master_port", str(port)]


def accelerate_launch_node(config_file: str, machine_rank: int, port: int) -> list[str]:
    """`accelerate launch` with a shipped config for one of two simulated machines, one
    process each."""
    return [os.path.join(BIN, "accelerate"), "launch", "--config_file",
            os.path.join(CONFIGS, config_file), "--num_machines", "2", "--machine_rank",
            str(machine_rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port)]


def accelerate_launch(config_file: str, num_processes: int = 2) -> list[str]:
    """`accelerate launch` with one of the shipped configs, on a free port."""
    return [os.path.join(BIN, "accelerate"), "launch", "--config_file",
            os.path.join(CONFIGS, config_file), "--num_processes", str(num_processes),
            "--main_process_port", str(free_port())]
