"""DeepSpeed ZeRO-2 and ZeRO-3 on this CPU machine (2 processes over gloo, through the shipped
examples/accelerate configs): the run equals one process with the same global batch, with
DeepSpeed's own gradient accumulation and clipping, samples generated with sharded weights, and
an exact resume after both processes were killed in the middle of an accumulation window."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import ENGINE_RUN, train_args, train_records
from launching import SIGNALLED_AT_CALL, accelerate_launch, assert_same_run, launch

import train
from dpo_core.testing import random_lora_adapter

pytest.importorskip("deepspeed")

MICRO_BATCHES_PER_EPOCH = 9  # 36 training pairs, 2 processes x 2 pairs


@pytest.mark.parametrize("config_file, stage, split", [
    ("deepspeed_zero2.yaml", 2, "optimizer state and gradients sharded, this process holds 100% "
                                "of the weights"),
    ("deepspeed_zero3.yaml", 3, "this process holds 50% of the weights"),
])
def test_killed_mid_accumulation_window_resumes_as_one_process(
        config_file, stage, split, engine_reference, tiny_model_dir, pairs_file, tmp_path):
    """2 processes x 2 pairs x 2 micro-batches (DeepSpeed accumulating them), both SIGKILLed in
    the second micro-batch of step 7, then resumed from checkpoint-6 (epoch 1, 3 micro-batches
    in: the window of step 5 spanned the epoch's end). Together the two launches are the
    one-process run: each step once, the same loss, clipped gradient norm, margins, evaluation,
    adapter and samples."""
    out = tmp_path / "run"
    args = train_args(tiny_model_dir, pairs_file, out, *ENGINE_RUN, "--batch_size", "2")
    script = tmp_path / "signalled.py"
    script.write_text(SIGNALLED_AT_CALL)
    killed = launch(accelerate_launch(config_file), args, tmp_path, script=str(script),
                    check=False, env={"SIGNAL": "SIGKILL", "SIGNAL_RANKS": "0,1",
                                      "SIGNAL_AT_CALL": "14"})
    assert killed.returncode != 0
    assert f"Backend: DeepSpeed ZeRO-{stage} (DEEPSPEED), 2 process(es) on cpu, {split}." in (
        killed.stdout)
    assert [r["step"] for r in train_records(out)] == [1, 2, 3, 4, 5, 6]
    checkpoint = out / "checkpoint-6"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert divmod(state["micro_batches_seen"], MICRO_BATCHES_PER_EPOCH) == (1, 3)
    # The engine's own state, each process its partition of the optimizer; no optimizer.pt.
    assert sorted(os.listdir(checkpoint)) == ["adapter", "deepspeed", "rng_state_0.pt",
                                              "rng_state_1.pt", "trainer_state.json"]
    partitions = [name for name in os.listdir(checkpoint / "deepspeed" / "state")
                  if name.endswith("optim_states.pt")]
    assert sorted(partitions) == [f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
                                  for rank in (0, 1)]
    assert (out / "run.lock").is_file()  # the killed run could not remove it

    resumed = launch(accelerate_launch(config_file),
                     [*args, "--resume_from_checkpoint", "latest"], tmp_path)
    assert f"Taking over the lock of {str(out)!r} left by a run that stopped" in resumed.stdout
    assert f"Resumed from {checkpoint} at step 6." in resumed.stdout
    assert_same_run(out, engine_reference)
    # DeepSpeed clipped by --max_grad_norm as the one process did (same updates above), and it
    # mattered: the first steps' norms were above it.
    assert train_records(out)[0]["grad_norm"] > 0.3
    assert (out / "samples.md").read_text() == (
        open(os.path.join(engine_reference, "samples.md")).read())
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["distributed_type"], metrics["zero_stage"], metrics["fsdp_version"],
            metrics["num_processes"], metrics["steps"]) == ("DEEPSPEED", stage, None, 2, 8)
    plan = json.loads((out / "training_config.json").read_text())["run_plan"]
    assert (plan["distributed_type"], plan["zero_stage"]) == ("DEEPSPEED", stage)
    assert resumed.stdout.count("Saved the adapter") == 1
    assert not (out / "run.lock").exists()


# The bundled demo model, every weight trained (the embeddings and the head too), a checkpoint
# every 2 steps, 2 samples and the demo's before/after evaluation; the reference precomputed,
# so no second model is held during training.
FULL_RUN = ("--demo", "--finetuning_type", "full", "--precompute_ref_log_probs", "--max_steps",
            "4", "--num_samples", "48", "--warmup_steps", "0", "--learning_rate", "1e-4",
            "--logging_steps", "1", "--save_steps", "2", "--max_grad_norm", "0",
            "--num_sample_prompts", "2")


@pytest.mark.exhaustive
@pytest.mark.parametrize("config_file, weights_held", [("deepspeed_zero2.yaml", "100%"),
                                                       ("deepspeed_zero3.yaml", "50%")])
def test_full_fine_tuning_matches_one_process_and_resumes(config_file, weights_held, tmp_path):
    """2 processes x 1 pair x 2 micro-batches against 1 x 4: the same losses, gradient norms,
    whole saved model, samples and before/after evaluation (under ZeRO-3 the starting model
    reloaded partitioned, in an engine of its own); a resume from checkpoint-2 gives steps 3-4
    again."""
    one = tmp_path / "one"
    assert train.main([*FULL_RUN, "--batch_size", "4", "--output_dir", str(one)]) == 0
    sharded = [*FULL_RUN, "--batch_size", "1", "--gradient_accumulation_steps", "2"]
    out = tmp_path / "sharded"
    run = launch(accelerate_launch(config_file), [*sharded, "--output_dir", str(out)], tmp_path)
    assert f"this process holds {weights_held} of the weights" in run.stdout
    assert_same_run(out, one)
    metrics, expected = (json.loads((d / "metrics.json").read_text()) for d in (out, one))
    assert (metrics["before"], metrics["after"]) == (expected["before"], expected["after"])
    assert (out / "samples.md").read_text() == (one / "samples.md").read_text()
    resumed = shutil.copytree(out, tmp_path / "resumed")
    launch(accelerate_launch(config_file),
           [*sharded, "--output_dir", str(resumed), "--resume_from_checkpoint",
            str(resumed / "checkpoint-2")], tmp_path)
    assert_same_run(resumed, one)


@pytest.mark.exhaustive
@pytest.mark.parametrize("config_file, start", [
    ("deepspeed_zero3.yaml", "starting adapter"),
    ("deepspeed_zero2.yaml", "4-bit weights"),
])
def test_starting_adapter_and_qlora_match_one_process(config_file, start, tiny_model_dir,
                                                      pairs_file, tmp_path):
    """DPO from an SFT adapter (its frozen copy the reference, switched in per pass) under
    ZeRO-3, and QLoRA under ZeRO-2 (ZeRO-2 keeps the 4-bit weights whole): 2 processes x 2
    pairs against 1 x 4."""
    extra = (["--adapter_path", random_lora_adapter(tiny_model_dir, tmp_path / "sft", seed=1)]
             if start == "starting adapter" else ["--quantization", "4bit"])
    steps = ["--max_steps", "4", "--max_grad_norm", "0", "--num_sample_prompts", "2", *extra]
    one = tmp_path / "one"
    assert train.main(train_args(tiny_model_dir, pairs_file, one, *steps,
                                 "--no-padding_free")) == 0
    out = tmp_path / "sharded"
    launch(accelerate_launch(config_file),
           train_args(tiny_model_dir, pairs_file, out, *steps, "--batch_size", "2"), tmp_path)
    assert_same_run(out, one)
    assert (out / "samples.md").read_text() == (one / "samples.md").read_text()
    plan = json.loads((out / "training_config.json").read_text())["run_plan"]
    assert plan["quantization"] == ("4bit" if start == "4-bit weights" else "none")
