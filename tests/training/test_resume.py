"""Checkpoints and exact resume: a run killed with SIGKILL and resumed ends where an
uninterrupted run ends, and a half-written checkpoint is never picked up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, read_log, train_args, train_records
from safetensors.torch import load_file

import train
from dpo_core.errors import CheckpointError
from dpo_core.run_files import checkpoint_dirs
from dpo_core.training.checkpoint import resolve_checkpoint

# Dropout stays on so that the resumed run matches only if the RNG streams were restored too;
# two micro-batches per step so the data position is not simply the step number.
RUN = ("--max_steps", "10", "--save_steps", "2", "--save_total_limit", "2", "--batch_size", "2",
       "--gradient_accumulation_steps", "2", "--no-disable_dropout", "--lora_dropout", "0.2")

# `python train.py ...` that SIGKILLs itself (no cleanup, no flush) while checkpoint-6 is half
# written: after its adapter and RNG state, before its optimizer state and trainer_state.json.
KILLED_DURING_SAVE = """
import os, runpy, signal, sys
import torch

real_save = torch.save

def save(obj, f, *args, **kwargs):
    if str(f).endswith(os.path.join(".checkpoint-6.tmp", "optimizer.pt")):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)

torch.save = save
sys.path.insert(0, os.getcwd())
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def adapter(path) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, pairs_file, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("uninterrupted")
    assert train.main(train_args(tiny_model_dir, pairs_file, out, *RUN)) == 0
    return str(out)


@pytest.mark.slow
def test_run_killed_mid_save_resumes_exactly(uninterrupted, tiny_model_dir, pairs_file,
                                             tmp_path):
    out = tmp_path / "killed"
    args = train_args(tiny_model_dir, pairs_file, out, *RUN)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", KILLED_DURING_SAVE, *args], cwd=ROOT,
                            env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    # Steps 5 and 6 were logged after the last complete checkpoint; checkpoint-6 is half done.
    assert [r["step"] for r in train_records(out)] == [1, 2, 3, 4, 5, 6]
    assert sorted(os.listdir(out / ".checkpoint-6.tmp")) == ["adapter", "rng_state_0.pt"]
    assert not (out / "metrics.json").exists()
    assert resolve_checkpoint("latest", str(out)) == str(out / "checkpoint-4")

    assert train.main([*args, "--resume_from_checkpoint", "latest"]) == 0

    resumed, reference = train_records(out), train_records(uninterrupted)
    assert [r["step"] for r in resumed] == list(range(1, 11))  # each step exactly once
    for mine, theirs in zip(resumed, reference, strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-6), mine["step"]
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-5), mine["step"]
    evals = [r for r in read_log(out) if r["split"] == "eval"]
    assert len(evals) == 1
    assert evals[0]["loss"] == pytest.approx(read_log(uninterrupted)[-1]["loss"], abs=1e-6)
    final, expected = adapter(out), adapter(uninterrupted)
    assert final.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], rtol=0, atol=1e-6)
    # The half checkpoint was cleared when step 6 was saved again; rotation kept two.
    assert sorted(os.listdir(out)) == sorted(os.listdir(uninterrupted))
    assert checkpoint_dirs(str(out)) == [str(out / "checkpoint-8"), str(out / "checkpoint-10")]
    assert json.loads((out / "metrics.json").read_text())["steps"] == 10


def test_checkpoint_holds_adapter_optimizer_position_and_rng(uninterrupted, tiny_model_dir):
    # save_total_limit 2: of checkpoints 2, 4, ..., 10 the newest two are kept.
    assert checkpoint_dirs(uninterrupted) == [os.path.join(uninterrupted, f"checkpoint-{s}")
                                              for s in (8, 10)]
    last = os.path.join(uninterrupted, "checkpoint-10")
    state = json.loads(open(os.path.join(last, "trainer_state.json")).read())
    assert state == {"step": 10, "micro_batches_seen": 20, "nonfinite_steps_skipped": 0,
                     "data_order": {"--batch_size": 2, "--gradient_accumulation_steps": 2,
                                    "--seed": 42, "--group_by_length": False, "processes": 1,
                                    "training pairs": 36, "--streaming": False},
                     "started_from": {"--model_name": tiny_model_dir, "--adapter_path": None,
                                      "--sync_ref_model": False},
                     "stream_position": None}
    # Step 10 is also the final step: the checkpoint's adapter is the saved final adapter.
    weights = adapter(os.path.join(last, "adapter"))
    final = adapter(uninterrupted)
    assert weights.keys() == final.keys()
    assert all(torch.equal(weights[k], final[k]) for k in final)
    # Plain tensors and containers only: both load with weights_only=True.
    optimizer = torch.load(os.path.join(last, "optimizer.pt"), weights_only=True)
    assert len(optimizer["state"]) == len(weights)  # one AdamW state per adapter tensor
    assert all(s["step"].item() == 10 for s in optimizer["state"].values())
    rng = torch.load(os.path.join(last, "rng_state_0.pt"), weights_only=True)
    assert {"python", "numpy", "torch"} <= rng.keys()
    older = adapter(os.path.join(uninterrupted, "checkpoint-8", "adapter"))
    assert not all(torch.equal(older[k], final[k]) for k in final)


def test_latest_skips_partial_and_foreign_entries(tmp_path):
    for name in ("checkpoint-2", "checkpoint-10", ".checkpoint-12.tmp", ".checkpoint-4.old",
                 "checkpoint-x", "checkpoint-9-old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-11").write_text("a file, not a checkpoint")
    # Numeric order (10 after 2), complete checkpoints only.
    assert checkpoint_dirs(str(tmp_path)) == [str(tmp_path / "checkpoint-2"),
                                              str(tmp_path / "checkpoint-10")]
    assert resolve_checkpoint("latest", str(tmp_path)) == str(tmp_path / "checkpoint-10")
    half = tmp_path / ".checkpoint-14.tmp"
    half.mkdir()  # a save killed before trainer_state.json was written
    with pytest.raises(CheckpointError, match="is not a checkpoint directory"):
        resolve_checkpoint(str(half), str(tmp_path))
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        resolve_checkpoint("latest", str(tmp_path / "empty"))
