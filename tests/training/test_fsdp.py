"""FSDP2 on this CPU machine: the shipped examples/accelerate/fsdp.yaml really shards the model
over 2 processes (gloo), and the run equals one process with the same global batch, down to
its samples, the demo's before/after evaluation and its sharded checkpoints."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
from launching import accelerate_launch, assert_same_run, launch
from safetensors.torch import load_file

import train

# The bundled demo model (2 decoder layers) for 4 steps of 4 pairs, no clipping (grad_norm is
# the raw gradient's), a checkpoint every 2 steps, 2 samples, and the reference pass under
# `disable_adapter` (not precomputed) so the adapter-off forward runs through FSDP each step.
DEMO_RUN = ("--demo", "--max_steps", "4", "--num_samples", "64", "--warmup_steps", "0",
            "--learning_rate", "1e-3", "--logging_steps", "1", "--save_steps", "2",
            "--max_grad_norm", "0", "--num_sample_prompts", "2", "--no-precompute_ref_log_probs")


def adapter(directory) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(directory, "adapter_model.safetensors"))


@pytest.mark.slow
def test_shipped_fsdp_config_shards_and_matches_one_process(tmp_path):
    one = tmp_path / "one"
    assert train.main([*DEMO_RUN, "--batch_size", "4", "--output_dir", str(one)]) == 0
    out = tmp_path / "fsdp"
    run = launch(accelerate_launch("fsdp.yaml"),
                 [*DEMO_RUN, "--batch_size", "2", "--output_dir", str(out)], tmp_path)

    # Sharded, not silently data parallel: each decoder layer is its own fully_shard unit and
    # each process holds half of every weight.
    assert ("Backend: FSDP2 (FSDP), 2 process(es) on cpu, 2 of 2 decoder layers sharded as "
            "their own units, this process holds 50% of the weights.") in run.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["distributed_type"], metrics["fsdp_version"]) == ("FSDP", 2)
    assert metrics["num_processes"] == 2
    reference = json.loads((one / "metrics.json").read_text())
    assert (reference["distributed_type"], reference["fsdp_version"]) == ("NO", None)

    # Same per-step loss and grad norm (1e-5), same eval, same gathered adapter.
    assert_same_run(out, one)
    # Evaluation and generation with sharded weights: every process takes part, the main
    # process writes, and the text and numbers are those of the one-process run.
    assert metrics["before"] == reference["before"]  # the same base weights
    # The adapters agree to fp32 round-off (above); a held-out pair whose two log-probs tie
    # that closely may rank either way, so "after" may differ by one pair in 200.
    one_pair = 1 / metrics["after"]["num_pairs"]
    for name, value in reference["after"].items():
        assert metrics["after"][name] == pytest.approx(value, abs=one_pair + 1e-9), name
    assert metrics["after"]["preference_accuracy"] != metrics["before"]["preference_accuracy"]
    assert (out / "samples.md").read_text() == (one / "samples.md").read_text()
    assert run.stdout.count("Saved the adapter") == 1

    # The checkpoint holds each process's shards (torch.distributed.checkpoint), no
    # replicated optimizer.pt, and the gathered adapter for chat.py.
    checkpoint = out / "checkpoint-4"
    assert sorted(os.listdir(checkpoint)) == ["adapter", "rng_state_0.pt", "rng_state_1.pt",
                                              "sharded", "trainer_state.json"]
    assert sorted(os.listdir(checkpoint / "sharded")) == [".metadata", "__0_0.distcp",
                                                          "__1_0.distcp"]
    saved = dcp.FileSystemReader(str(checkpoint / "sharded")).read_metadata().state_dict_metadata
    lora = [key for key in saved if key.startswith("model.") and "lora_" in key]
    assert len(lora) == len(adapter(out)) == 16  # 2 layers x q, k, v, o x A, B; nothing frozen
    assert all(len(saved[key].chunks) == 2 for key in lora)  # one shard per process
    moments = [key for key in saved if key.startswith("optimizer.state.") and
               key.endswith(".exp_avg")]
    assert len(moments) == 16 and all(len(saved[key].chunks) == 2 for key in moments)
    final, in_checkpoint = adapter(out), adapter(checkpoint / "adapter")
    assert all(torch.equal(final[name], in_checkpoint[name]) for name in final)



# Full fine-tuning of the demo model: every weight trains, so the embeddings, the final norm
# and the LM head (FSDP2's root unit) have gradients to reduce-scatter too.
FULL_RUN = ("--demo", "--finetuning_type", "full", "--max_steps", "4", "--num_samples", "48",
            "--warmup_steps", "0", "--learning_rate", "1e-4", "--logging_steps", "1",
            "--save_steps", "2", "--max_grad_norm", "0", "--num_sample_prompts", "2")


@pytest.mark.slow
@pytest.mark.parametrize("reference, accumulation", [("precomputed", 2), ("frozen copy", 1)])
def test_full_fine_tuning_under_fsdp2_matches_one_process_and_resumes(reference, accumulation,
                                                                      tmp_path):
    """2 processes x 2 pairs (as 2 micro-batches of 1, or one of 2) against 1 x 4: the same
    losses, gradient norms, evaluation, samples and whole saved model, with the reference
    precomputed (then reloaded from disk for the demo's evaluation) or held as a second,
    frozen model; and a resume from the sharded checkpoint-2 gives steps 3-4 again."""
    args = [*FULL_RUN, *(["--no-precompute_ref_log_probs"] if reference == "frozen copy" else [])]
    one = tmp_path / "one"
    assert train.main([*args, "--batch_size", "4", "--output_dir", str(one)]) == 0
    sharded = [*args, "--batch_size", str(2 // accumulation),
               "--gradient_accumulation_steps", str(accumulation)]
    out = tmp_path / "fsdp"
    run = launch(accelerate_launch("fsdp.yaml"), [*sharded, "--output_dir", str(out)], tmp_path)
    assert "this process holds 50% of the weights" in run.stdout
    assert_same_run(out, one)
    metrics, expected = (json.loads((d / "metrics.json").read_text()) for d in (out, one))
    assert metrics["before"] == expected["before"]
    # Samples from the sharded policy (and, precomputed, the reloaded starting model).
    assert (out / "samples.md").read_text() == (one / "samples.md").read_text()

    saved = dcp.FileSystemReader(str(out / "checkpoint-2" / "sharded")).read_metadata()
    trained = [key for key in saved.state_dict_metadata if key.startswith("model.")]
    assert len(trained) == len(load_file(one / "model.safetensors"))  # every weight, sharded
    resumed = shutil.copytree(out, tmp_path / "resumed")
    launch(accelerate_launch("fsdp.yaml"),
           [*sharded, "--output_dir", str(resumed), "--resume_from_checkpoint",
            str(resumed / "checkpoint-2")], tmp_path)
    assert_same_run(resumed, one)
