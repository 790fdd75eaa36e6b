"""Same global batch, same update: two CPU processes (gloo) against one, and gradient
accumulation against one larger batch."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from conftest import ROOT, learnable_pairs, read_log, train_args, train_records, write_jsonl
from safetensors.torch import load_file

import train
from dpo_core.config import ConfigError, TrainConfig
from dpo_core.distributed import check_backend

# No clipping, so grad_norm is the norm of the raw summed gradient: a wrongly scaled
# gradient shows there even though AdamW's normalised update would hide it.
STEPS = ("--max_steps", "4", "--save_steps", "2", "--max_grad_norm", "0")
BIN = os.path.dirname(sys.executable)


def assert_same_run(out, reference) -> None:
    """Per-step loss and gradient norm, final eval and saved adapter all match."""
    mine, theirs = train_records(out), train_records(reference)
    assert [r["step"] for r in mine] == [r["step"] for r in theirs]  # each step exactly once
    for a, b in zip(mine, theirs, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), a["step"]
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5), a["step"]
    evals = [[r["loss"] for r in read_log(d) if r["split"] == "eval"] for d in (out, reference)]
    assert evals[0] == pytest.approx(evals[1], abs=1e-5)
    weights, expected = (load_file(os.path.join(d, "adapter_model.safetensors"))
                         for d in (out, reference))
    assert weights.keys() == expected.keys()
    for name in expected:
        # Adam turns fp32 round-off in a near-zero gradient into an update of up to ~lr *
        # 1e-3; a wrong update would differ by ~lr (5e-3) itself.
        torch.testing.assert_close(weights[name], expected[name], rtol=1e-4, atol=1e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: list[str], args: list[str], tmp_path) -> subprocess.CompletedProcess:
    # An empty HF_HOME: no accelerate config file, only the flags given here.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_HOME": str(tmp_path / "hf_home")}
    run = subprocess.run([*launcher, "train.py", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    return run


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, pairs_file, tmp_path_factory) -> str:
    """Batch 4 on one process, padded: the run the two-process runs (padding-free by default)
    must reproduce."""
    out = tmp_path_factory.mktemp("one_process")
    assert train.main(train_args(tiny_model_dir, pairs_file, out, *STEPS,
                                 "--no-padding_free")) == 0
    return str(out)


@pytest.mark.slow
def test_accelerate_launch_two_processes_match_one(one_process, tiny_model_dir, pairs_file,
                                                   tmp_path):
    out = tmp_path / "ddp"
    # `--cpu --num_processes 2` would start ONE process (Accelerate wants mpirun for that);
    # `--multi_gpu` starts two through torch's elastic launcher, and train.py asks for a
    # gloo process group because this machine has no GPU.
    run = launch([os.path.join(BIN, "accelerate"), "launch", "--multi_gpu", "--num_processes",
                  "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
                  "no", "--main_process_port", str(free_port())],
                 train_args(tiny_model_dir, pairs_file, out, *STEPS, "--batch_size", "2"),
                 tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["steps"] == 4
    assert_same_run(out, one_process)  # losses gathered from both ranks, not rank 0's half
    # Only the main process prints and logs; the progress bar counts the 4 global steps.
    assert run.stdout.count("Saved the adapter") == 1
    for step in range(1, 5):
        assert len(re.findall(rf"^step {step} \| loss ", run.stdout + run.stderr,
                              flags=re.MULTILINE)) == 1
    assert " 4/4 [" in run.stderr and "/8 [" not in run.stderr
    # Each rank saved its own RNG streams into the one checkpoint the main process wrote.
    assert sorted(os.listdir(out / "checkpoint-4")) == [
        "adapter", "optimizer.pt", "rng_state_0.pt", "rng_state_1.pt", "trainer_state.json"]


@pytest.mark.slow
def test_shipped_ddp_config_accumulates_and_resumes(one_process, tiny_model_dir, pairs_file,
                                                    tmp_path):
    out = tmp_path / "ddp_yaml"
    # 2 processes x 1 pair x 2 micro-batches = the same 4 pairs per step; the first
    # micro-batch of each step runs under no_sync. The file asks for bf16, but the precision
    # comes from train.py's --dtype (float32 on this CPU).
    launcher = [os.path.join(BIN, "accelerate"), "launch", "--config_file",
                os.path.join(ROOT, "examples", "accelerate", "ddp.yaml"), "--num_processes", "2"]
    args = train_args(tiny_model_dir, pairs_file, out, *STEPS, "--batch_size", "1",
                      "--gradient_accumulation_steps", "2")
    launch([*launcher, "--main_process_port", str(free_port())], args, tmp_path)
    assert json.loads((out / "metrics.json").read_text())["num_processes"] == 2
    assert_same_run(out, one_process)
    # Both processes resume from checkpoint-2 (each its own RNG file) and redo steps 3-4.
    resumed = shutil.copytree(out, tmp_path / "resumed")
    launch([*launcher, "--main_process_port", str(free_port())],
           [*args, "--output_dir", str(resumed), "--resume_from_checkpoint",
            str(resumed / "checkpoint-2")], tmp_path)
    assert_same_run(resumed, out)


@pytest.mark.parametrize("batch_size, accumulation", [(2, 2), (1, 4)])
def test_gradient_accumulation_matches_one_larger_batch(one_process, tiny_model_dir,
                                                        pairs_file, tmp_path, batch_size,
                                                        accumulation):
    out = tmp_path / "accumulated"
    args = train_args(tiny_model_dir, pairs_file, out, *STEPS, "--batch_size", str(batch_size),
                      "--gradient_accumulation_steps", str(accumulation))
    assert train.main(args) == 0
    assert_same_run(out, one_process)


def test_accumulation_over_uneven_micro_batches(tiny_model_dir, tmp_path):
    """5 pairs a step as one batch, as 2 + 2 + 1 and as 3 + 2: every pair weighs the same."""
    data = write_jsonl(tmp_path / "five.jsonl", learnable_pairs(5, seed=3))
    runs = []
    for batch_size, accumulation in ((5, 1), (2, 3), (3, 2)):
        out = tmp_path / f"b{batch_size}x{accumulation}"
        assert train.main(train_args(tiny_model_dir, data, out, "--eval_fraction", "0",
                                     "--max_steps", "2", "--max_grad_norm", "0",
                                     "--batch_size", str(batch_size),
                                     "--gradient_accumulation_steps", str(accumulation))) == 0
        runs.append(out)
    for out in runs[1:]:
        assert_same_run(out, runs[0])


def backend_state(kind: str, *, zero_stage: int = 0, fsdp_version: int = 2,
                  use_orig_params: bool = True) -> SimpleNamespace:
    """The parts of an AcceleratorState that check_backend reads."""
    return SimpleNamespace(
        distributed_type=DistributedType[kind],
        fsdp_plugin=SimpleNamespace(fsdp_version=fsdp_version, use_orig_params=use_orig_params),
        deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage))


SHARDED_READY = {"save_steps": 0, "num_sample_prompts": 0, "gradient_accumulation_steps": 1}


@pytest.mark.parametrize("state, settings, quantize, needs", [
    # DDP runs everything, QLoRA and checkpoints included.
    (backend_state("MULTI_GPU"), {}, True, []),
    # The defaults (4-bit on CUDA, checkpoints every 100 steps, samples) under FSDP.
    (backend_state("FSDP"), {}, True, ["--quantization none", "--save_steps 0",
                                        "--num_sample_prompts 0"]),
    (backend_state("FSDP"), SHARDED_READY, False, []),
    (backend_state("FSDP", fsdp_version=1, use_orig_params=False), SHARDED_READY, False,
     ["fsdp_use_orig_params: true"]),
    (backend_state("FSDP", fsdp_version=1), SHARDED_READY, False, []),
    (backend_state("FSDP"), {**SHARDED_READY, "resume_from_checkpoint": "latest"}, False,
     ["no --resume_from_checkpoint"]),
    # ZeRO-2 keeps whole weights on every process: samples are fine, accumulation is not.
    (backend_state("DEEPSPEED", zero_stage=2),
     {"save_steps": 0, "skip_nonfinite_steps": 2}, False,
     ["--gradient_accumulation_steps 1", "--skip_nonfinite_steps 0"]),
    (backend_state("DEEPSPEED", zero_stage=3), SHARDED_READY, False, []),
    (backend_state("DEEPSPEED", zero_stage=3), {**SHARDED_READY, "demo": True}, False,
     ["no --demo"]),
])
def test_backend_guard_names_what_fsdp_and_deepspeed_need(state, settings, quantize, needs):
    config = TrainConfig(**settings)
    if not needs:
        check_backend(config, state, quantize)
        return
    with pytest.raises(ConfigError) as error:
        check_backend(config, state, quantize)
    message = str(error.value)
    assert all(need in message for need in needs), message
    assert message.count(";") == len(needs) - 1  # nothing else is asked for
