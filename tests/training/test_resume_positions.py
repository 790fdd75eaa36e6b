"""Resume positions where trainers commonly break (trl, transformers and Accelerate issues):
in epoch >= 1 when epochs do not end on an accumulation window's edge, and a second resume in
the same epoch from a checkpoint a resumed run wrote. One process here; the two-process
(DDP, FSDP2) versions are in test_distributed.py."""

from __future__ import annotations

import json
import os
import shutil

import torch
from conftest import read_log, train_args
from launching import assert_same_run
from safetensors.torch import load_file

import train

# 36 training pairs, micro-batches of 4: 9 an epoch, 2 a step, so epoch 0 ends inside step 5
# (its micro-batches 8 and 9). Dropout on: the resumed run matches only if the RNG streams were
# restored as well as the data position.
RUN = ("--max_steps", "10", "--save_steps", "2", "--save_total_limit", "0", "--batch_size", "4",
       "--gradient_accumulation_steps", "2", "--max_grad_norm", "0", "--eval_steps", "0",
       "--no-disable_dropout", "--lora_dropout", "0.2")
MICRO_BATCHES_PER_EPOCH = 9


def micro_batches_seen(checkpoint) -> int:
    return json.loads((checkpoint / "trainer_state.json").read_text())["micro_batches_seen"]


def test_resume_in_epoch_one_mid_window_then_again_in_the_same_epoch(tiny_model_dir, pairs_file,
                                                                     tmp_path):
    unbroken = tmp_path / "unbroken"
    assert train.main(train_args(tiny_model_dir, pairs_file, unbroken, *RUN)) == 0
    # checkpoint-6: 12 micro-batches, 3 into epoch 1; checkpoint-8: 16, 7 into epoch 1. Odd
    # counts: a resume there starts half-way through a window as the epoch counts them.
    for step, position in ((6, (1, 3)), (8, (1, 7))):
        assert divmod(micro_batches_seen(unbroken / f"checkpoint-{step}"),
                      MICRO_BATCHES_PER_EPOCH) == position

    # A run stopped after step 7 whose newest checkpoint is step 6 (its log runs ahead).
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(unbroken / "checkpoint-6", resumed / "checkpoint-6")
    with open(resumed / "train_log.jsonl", "w") as log:
        log.writelines(json.dumps(r) + "\n" for r in read_log(unbroken) if r["step"] <= 7)
    args = train_args(tiny_model_dir, pairs_file, resumed, *RUN)
    assert train.main([*args, "--resume_from_checkpoint", "latest"]) == 0
    assert_same_run(resumed, unbroken)

    # Again, from the checkpoint-8 the resumed run wrote, still in epoch 1 (steps 9 and 10
    # are redone, their log records replaced).
    assert train.main([*args, "--resume_from_checkpoint", str(resumed / "checkpoint-8")]) == 0
    assert_same_run(resumed, unbroken)
    # One process, same arithmetic: equal to the last bit, not merely within tolerance.
    mine, theirs = (load_file(os.path.join(d, "adapter_model.safetensors"))
                    for d in (resumed, unbroken))
    assert all(torch.equal(mine[name], theirs[name]) for name in theirs)
    assert [r["loss"] for r in read_log(resumed)] == [r["loss"] for r in read_log(unbroken)]

