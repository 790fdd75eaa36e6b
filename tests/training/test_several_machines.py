"""Several machines, simulated on this one: two nodes of one process each, started side by side
(`torchrun --nnodes 2 --node_rank 0|1`, or `accelerate launch --num_machines 2 --machine_rank
0|1`), meeting at 127.0.0.1 and writing into one output_dir as nodes on a shared file system
do. They train like one process and write each record once; nodes that disagree on the
launch, or do not share the output_dir, stop before any work."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket

import pytest
from conftest import ENGINE_RUN, train_args
from launching import (
    accelerate_launch_node,
    assert_same_run,
    free_port,
    launch_nodes,
    torchrun_node,
)

NO_DEEPSPEED = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                  reason="deepspeed is not installed (pip install -e .[deepspeed])")


def assert_written_once(out, runs) -> None:
    """Each node's output together: the main process (node 0) reports and writes every record
    and file once; every process wrote its own RNG streams into each checkpoint."""
    output = "".join(run.stdout + run.stderr for run in runs)
    assert output.count("Saved the adapter") == 1
    for step in range(1, 9):
        assert len(re.findall(rf"^step {step} \| loss ", output, flags=re.MULTILINE)) == 1
    assert "rng_state_1.pt" in os.listdir(out / "checkpoint-8")


def test_two_nodes_train_like_one_process_and_write_each_record_once(
        engine_reference, tiny_model_dir, pairs_file, tmp_path):
    """DDP (gloo) across two simulated nodes started with torchrun."""
    out = tmp_path / "run"
    port = free_port()
    runs = launch_nodes([torchrun_node(rank, port) for rank in (0, 1)],
                        train_args(tiny_model_dir, pairs_file, out, *ENGINE_RUN,
                                   "--batch_size", "2"), tmp_path)
    assert "Backend: MULTI_CPU (MULTI_CPU), 2 process(es) on cpu." in runs[0].stdout
    assert_same_run(out, engine_reference)
    assert_written_once(out, runs)
    assert (out / "samples.md").read_text() == (
        open(os.path.join(engine_reference, "samples.md")).read())


@pytest.mark.parametrize("config_file, backend", [
    pytest.param("deepspeed_zero3.yaml", "DeepSpeed ZeRO-3 (DEEPSPEED)", marks=NO_DEEPSPEED),
    pytest.param("fsdp.yaml", "FSDP2 (FSDP)", marks=pytest.mark.exhaustive),
])
def test_two_machines_with_accelerate_launch_shard_like_one_process(
        config_file, backend, engine_reference, tiny_model_dir, pairs_file, tmp_path):
    """The shipped sharded configs across two simulated machines: each process holds half of
    every weight, and the run is the one-process run."""
    out = tmp_path / "run"
    port = free_port()
    runs = launch_nodes([accelerate_launch_node(config_file, rank, port) for rank in (0, 1)],
                        train_args(tiny_model_dir, pairs_file, out, *ENGINE_RUN,
                                   "--batch_size", "2"), tmp_path)
    assert f"Backend: {backend}, 2 process(es) on cpu" in runs[0].stdout
    assert "this process holds 50% of the weights." in runs[0].stdout
    assert_same_run(out, engine_reference)
    assert_written_once(out, runs)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_processes"] == 2


def test_nodes_that_disagree_stop_before_any_work(tiny_model_dir, pairs_file, tmp_path):
    """Node 1 launched for 3 nodes instead of 2, and started in another working directory, so
    that the same relative --output_dir is another directory there: as on a node that does not
    share the file system. Both nodes stop at start with one message naming each problem, and
    no output_dir is left behind."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    port = free_port()
    runs = launch_nodes([torchrun_node(0, port, num_nodes=2), torchrun_node(1, port, num_nodes=3)],
                        train_args(tiny_model_dir, pairs_file, "out"), tmp_path,
                        cwds=[str(node) for node in nodes], check=False)
    host = socket.gethostname()
    for run in runs:
        assert run.returncode != 0
        message = re.search(r"^error: (.*)$", run.stderr, flags=re.MULTILINE).group(1)
        assert message == (
            "the processes of this run disagree: its nodes were launched for different numbers "
            f"of machines (process 0 on {host}: 2, process 1 on {host}: 3); start every node "
            "with the same torchrun --nnodes or accelerate launch --num_machines; process 1 on "
            f"{host} cannot see the lock that process 0 on {host} wrote into --output_dir "
            "'out': put the output_dir on a file system that every node shares (a checkpoint "
            "holds files of every process, and resuming reads each process's own)")
    assert not (nodes[0] / "out").exists() and not (nodes[1] / "out").exists()
