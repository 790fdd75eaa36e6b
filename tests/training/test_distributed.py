"""Same global batch, same update: two CPU processes (gloo) against one, and gradient
accumulation against one larger batch."""

from __future__ import annotations

import json
import os
import re
import sys
from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType
from conftest import learnable_pairs, train_args, train_records, write_jsonl
from launching import (
    BIN,
    KILLED_DURING_SAVE,
    SIGNALLED_AT_CALL,
    accelerate_launch,
    assert_same_run,
    free_port,
    launch,
)

import train
from dpo_core.config.train import TrainConfig
from dpo_core.errors import ConfigError
from dpo_core.modeling.backends import _fallback_message, check_backend
from dpo_core.training.checkpoint import resolve_checkpoint

# No clipping, so grad_norm is the norm of the raw summed gradient: a wrongly scaled
# gradient shows there even though AdamW's normalised update would hide it.
STEPS = ("--max_steps", "4", "--save_steps", "2", "--max_grad_norm", "0")


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
    assert (metrics["distributed_type"], metrics["fsdp_version"]) == ("MULTI_CPU", None)
    assert "Backend: MULTI_CPU (MULTI_CPU), 2 process(es) on cpu." in run.stdout
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
def test_ddp_with_4bit_qlora_matches_one_process(tiny_model_dir, pairs_file, tmp_path):
    """QLoRA under the shipped ddp.yaml: bitsandbytes 4-bit weights (it runs them on the
    CPU too) under DDP, 2 processes x 2 pairs against 1 x 4 with the same 4-bit weights."""
    qlora = (*STEPS, "--quantization", "4bit")
    one = tmp_path / "one"
    assert train.main(train_args(tiny_model_dir, pairs_file, one, *qlora)) == 0
    out = tmp_path / "ddp"
    run = launch(accelerate_launch("ddp.yaml"),
                 train_args(tiny_model_dir, pairs_file, out, *qlora, "--batch_size", "2"),
                 tmp_path)
    assert "Backend: MULTI_CPU (MULTI_CPU), 2 process(es) on cpu." in run.stdout
    plan = json.loads((out / "training_config.json").read_text())["run_plan"]
    assert plan["quantization"] == "4bit"
    assert_same_run(out, one)


@pytest.mark.slow
def test_ctrl_c_on_one_process_stops_every_process_after_the_same_step(
        one_process, tiny_model_dir, pairs_file, tmp_path):
    """Only rank 1 gets a Ctrl-C, during step 2. The agreement on it is read one step late
    (so no process waits each step for the device): both processes stop after step 3, save
    checkpoint-3, and the resumed run ends as the uninterrupted one-process run did."""
    out = tmp_path / "ddp"
    args = train_args(tiny_model_dir, pairs_file, out, *STEPS, "--batch_size", "2")
    script = tmp_path / "interrupted.py"
    script.write_text(SIGNALLED_AT_CALL)
    stopped = launch(accelerate_launch("ddp.yaml"), args, tmp_path, script=str(script),
                     check=False,
                     env={"SIGNAL": "SIGINT", "SIGNAL_RANKS": "1", "SIGNAL_AT_CALL": "2"})
    assert stopped.returncode != 0
    assert f"Stopped by Ctrl-C after step 3 of 4; saved {out / 'checkpoint-3'}." in (
        stopped.stdout + stopped.stderr)
    assert [r["step"] for r in train_records(out)] == [1, 2, 3]
    assert sorted(os.listdir(out / "checkpoint-3")) == [
        "adapter", "optimizer.pt", "rng_state_0.pt", "rng_state_1.pt", "trainer_state.json"]
    launch(accelerate_launch("ddp.yaml"), [*args, "--resume_from_checkpoint", "latest"],
           tmp_path)
    assert_same_run(out, one_process)


# 36 training pairs in micro-batches of 4 pairs (one process, or 2 processes x 2): 9 an epoch,
# 2 a step, so epochs end inside a step's accumulation window (step 5 takes the last
# micro-batch of epoch 0 and the first of epoch 1). Reference log-probs precomputed.
RESUMED_RUN = ("--max_steps", "12", "--save_steps", "2", "--max_grad_norm", "0",
               "--gradient_accumulation_steps", "2", "--precompute_ref_log_probs",
               "--eval_steps", "0")
MICRO_BATCHES_PER_EPOCH = 9


@pytest.fixture(scope="module")
def one_process_12_steps(tiny_model_dir, pairs_file, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("one_process_12_steps")
    assert train.main(train_args(tiny_model_dir, pairs_file, out, *RESUMED_RUN,
                                 "--batch_size", "4")) == 0
    return str(out)


@pytest.mark.slow
@pytest.mark.parametrize("config_file", ["ddp.yaml", "fsdp.yaml"])
def test_killed_twice_in_one_epoch_resumes_exactly(config_file, one_process_12_steps,
                                                   tiny_model_dir, pairs_file, tmp_path):
    """2 processes, killed (SIGKILL) while saving checkpoint-8 and, after resuming, while
    saving checkpoint-10: both resumes start in epoch 1 (from checkpoint-6, then -8), neither
    at an accumulation window's edge within the epoch. The three launches together give the
    unbroken one-process run: each step once, same losses, gradient norms and adapter."""
    out = tmp_path / "run"
    args = train_args(tiny_model_dir, pairs_file, out, *RESUMED_RUN, "--batch_size", "2")
    killed_script = tmp_path / "killed_during_save.py"
    killed_script.write_text(KILLED_DURING_SAVE)
    resume = ["--resume_from_checkpoint", "latest"]
    for kill_at, extra, position in ((8, [], (1, 3)), (10, resume, (1, 7))):
        killed = launch(accelerate_launch(config_file), [*args, *extra], tmp_path,
                        script=str(killed_script), check=False,
                        env={"KILL_AT_CHECKPOINT": str(kill_at)})
        assert killed.returncode != 0
        assert (out / f".checkpoint-{kill_at}.tmp").is_dir()  # half written, never picked
        latest = resolve_checkpoint("latest", str(out))
        assert latest == str(out / f"checkpoint-{kill_at - 2}")
        state = json.loads((out / f"checkpoint-{kill_at - 2}" / "trainer_state.json").read_text())
        # (epoch, micro-batches into it): an odd count, so mid-window within the epoch.
        assert divmod(state["micro_batches_seen"], MICRO_BATCHES_PER_EPOCH) == position
    finished = launch(accelerate_launch(config_file), [*args, *resume], tmp_path)
    assert f"Resumed from {out / 'checkpoint-8'} at step 8." in finished.stdout
    assert_same_run(out, one_process_12_steps)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["distributed_type"] == {"ddp.yaml": "MULTI_CPU", "fsdp.yaml": "FSDP"}[
        config_file]
    assert metrics["steps"] == 12


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
                  use_orig_params: bool = True, ds_config: dict | None = None) -> SimpleNamespace:
    """The parts of an AcceleratorState that check_backend reads."""
    return SimpleNamespace(
        distributed_type=DistributedType[kind],
        fsdp_plugin=SimpleNamespace(fsdp_version=fsdp_version, use_orig_params=use_orig_params),
        deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage, deepspeed_config={
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            **(ds_config or {})}))


SHARDED_READY = {"save_steps": 0, "num_sample_prompts": 0, "gradient_accumulation_steps": 1}
# What runs on one process and DDP: checkpoints, resume, samples, demo, accumulation, skipping.
EVERYTHING = {"save_steps": 2, "resume_from_checkpoint": "latest", "num_sample_prompts": 2,
              "demo": True, "gradient_accumulation_steps": 2, "skip_nonfinite_steps": 1}
NO_SKIPPING = {**EVERYTHING, "skip_nonfinite_steps": 0}


@pytest.mark.parametrize("state, settings, quantize, needs", [
    # DDP runs everything, QLoRA and checkpoints included.
    (backend_state("MULTI_GPU"), EVERYTHING, True, []),
    # FSDP2 too, except 4-bit weights.
    (backend_state("FSDP"), EVERYTHING, False, []),
    (backend_state("FSDP"), {**EVERYTHING, "finetuning_type": "full"}, False, []),
    (backend_state("FSDP", fsdp_version=1), {**SHARDED_READY, "finetuning_type": "full"},
     False, ["--finetuning_type lora"]),
    (backend_state("FSDP"), {}, True, ["--quantization none"]),
    # FSDP1 (GPU only, untested): the defaults (4-bit on CUDA, checkpoints, samples).
    (backend_state("FSDP", fsdp_version=1), {}, True, ["--quantization none", "--save_steps 0",
                                                        "--num_sample_prompts 0"]),
    (backend_state("FSDP", fsdp_version=1, use_orig_params=False), SHARDED_READY, False,
     ["fsdp_use_orig_params: true"]),
    (backend_state("FSDP", fsdp_version=1), SHARDED_READY, False, []),
    (backend_state("FSDP", fsdp_version=1), {**SHARDED_READY, "resume_from_checkpoint": "latest"},
     False, ["no --resume_from_checkpoint"]),
    # ZeRO-2 and ZeRO-3: checkpoints, resume, samples, demo, accumulation, full fine-tuning;
    # QLoRA under ZeRO-2. Not: skipping a non-finite update the engine has applied already.
    (backend_state("DEEPSPEED", zero_stage=2), NO_SKIPPING, True, []),
    (backend_state("DEEPSPEED", zero_stage=3), {**NO_SKIPPING, "finetuning_type": "full"},
     False, []),
    (backend_state("DEEPSPEED", zero_stage=2), EVERYTHING, False, ["--skip_nonfinite_steps 0"]),
    (backend_state("DEEPSPEED", zero_stage=3), NO_SKIPPING, True, ["--quantization none"]),
    (backend_state("DEEPSPEED", zero_stage=1), NO_SKIPPING, False, ["zero_stage: 2 or 3"]),
    # A DeepSpeed config that decides what the flags decide.
    (backend_state("DEEPSPEED", zero_stage=3, ds_config={"optimizer": {"type": "AdamW"},
                                                         "scheduler": {"type": "WarmupLR"}}),
     NO_SKIPPING, False, ['no "optimizer" section', 'no "scheduler" section']),
    (backend_state("DEEPSPEED", zero_stage=2, ds_config={"gradient_accumulation_steps": 4,
                                                         "gradient_clipping": 1.0}),
     NO_SKIPPING, False, ["the config says 4, --gradient_accumulation_steps is 2"]),
    (backend_state("DEEPSPEED", zero_stage=2, ds_config={"gradient_accumulation_steps": 2,
                                                         "gradient_clipping": 0.5}),
     NO_SKIPPING, False, ["the config says 0.5, --max_grad_norm is 1"]),
    # TR-DPO's moving reference is mixed and checkpointed whole: DDP runs it, sharding does not.
    (backend_state("MULTI_GPU"), {"sync_ref_model": True}, False, []),
    (backend_state("FSDP"), {"sync_ref_model": True}, False, ["no --sync_ref_model"]),
    (backend_state("DEEPSPEED", zero_stage=2), {**NO_SKIPPING, "sync_ref_model": True}, False,
     ["no --sync_ref_model"]),
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


@pytest.mark.parametrize("variables, deepspeed_installed, message", [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, True,
     "asks for FSDP, but this run would use NO instead (it runs 1 process: launch with "
     "--num_processes 2 or more"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, False,
     "the Accelerate config asks for DeepSpeed, which is not installed: install it with "
     '`pip install -e ".[deepspeed]"`'),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, True,
     "asks for DeepSpeed (ACCELERATE_USE_DEEPSPEED) but no launcher started this process: run "
     "`accelerate launch --config_file examples/accelerate/deepspeed_zero3.yaml train.py"),
])
def test_config_asking_for_a_sharded_backend_stops_instead_of_falling_back(
        variables, deepspeed_installed, message, tiny_model_dir, pairs_file, tmp_path,
        monkeypatch, capsys):
    """What `accelerate launch --config_file fsdp.yaml --num_processes 1` exports, a DeepSpeed
    config on a machine without deepspeed, or its variable without a launcher: train.py stops
    with the reason before any work."""
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    if not deepspeed_installed:
        monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` fails
    elif "ACCELERATE_USE_DEEPSPEED" in variables:
        pytest.importorskip("deepspeed")
    out = tmp_path / "out"
    assert train.main(train_args(tiny_model_dir, pairs_file, out)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_fallback_message_names_the_fix_for_fsdp1_without_gpus(monkeypatch):
    monkeypatch.setenv("FSDP_VERSION", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")  # one of two processes, on this GPU-less machine
    running = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=2)
    message = _fallback_message(DistributedType.FSDP, running)
    assert message == ("the Accelerate config asks for FSDP, but this run would use MULTI_CPU "
                       "instead (without GPUs only FSDP2 can run: set fsdp_version: 2 in the "
                       "config). Stopping rather than running unsharded.")
