"""Whole runs on the tokenized cache and on a stream: a second run maps the cache and trains
the same steps, a streamed run resumes exactly, and of two processes only the main one
tokenizes."""

from __future__ import annotations

import json
import os

import pytest
from conftest import learnable_pairs, read_log, train_args, train_records, write_jsonl
from launching import accelerate_launch, launch

import train

# Dropout on: a resumed run matches only if the RNG streams were restored with the position.
RESUMABLE = ("--max_steps", "4", "--save_steps", "2", "--save_total_limit", "0",
             "--batch_size", "2", "--gradient_accumulation_steps", "2",
             "--no-disable_dropout", "--lora_dropout", "0.2")


def plan(out) -> dict:
    with open(os.path.join(out, "training_config.json")) as f:
        return json.load(f)["run_plan"]


def losses(out) -> list[float]:
    """Each step's loss and gradient norm, in order."""
    return [value for r in train_records(out) for value in (r["loss"], r["grad_norm"])]


def test_a_second_run_maps_the_cache_and_trains_the_same(tiny_model_dir, pairs_file, tmp_path):
    cache = ("--tokenized_cache_dir", str(tmp_path / "cache"))
    first, second = tmp_path / "first", tmp_path / "second"
    for out in (first, second):
        assert train.main(train_args(tiny_model_dir, pairs_file, out, *cache,
                                     "--max_steps", "3", "--eval_fraction", "0")) == 0
    assert (plan(first)["tokenized_cache"], plan(second)["tokenized_cache"]) == ("miss", "hit")
    assert losses(second) == pytest.approx(losses(first), abs=1e-6)


def test_a_streamed_run_resumes_exactly(tiny_model_dir, tmp_path):
    stream_file = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(30))
    eval_file = write_jsonl(tmp_path / "eval.jsonl", learnable_pairs(6, seed=1))
    out = tmp_path / "streamed"
    args = train_args(tiny_model_dir, stream_file, out, *RESUMABLE, "--streaming",
                      "--shuffle_buffer_size", "8", "--eval_dataset", eval_file)
    assert train.main(args) == 0
    run = plan(out)
    assert run["streaming"] and run["padding_free"] and run["prefix_sharing"] == "always"
    unbroken = read_log(out)
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    # 2 steps of 2 micro-batches of 2 pairs took the first 8 rows out of the buffer.
    assert state["stream_position"] == [0, 8]
    assert train.main([*args, "--resume_from_checkpoint", str(out / "checkpoint-2")]) == 0
    resumed = read_log(out)
    assert [r["step"] for r in resumed] == [r["step"] for r in unbroken]
    for mine, theirs in zip(resumed, unbroken, strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-6), mine
    assert json.loads((out / "metrics.json").read_text())["train_pairs"] is None


@pytest.mark.slow
def test_of_two_processes_only_the_main_one_tokenizes(tiny_model_dir, pairs_file, tmp_path):
    """Under `accelerate launch` (two CPU processes, gloo) the main process tokenizes and
    writes the cache entry; the other maps it."""
    record = tmp_path / "tokenized_by"
    script = f"""
import os, sys
sys.path.insert(0, os.getcwd())
import dpo_core.data.training_data as training_data
from dpo_core.cli import train_main

real = training_data.tokenize_to_store

def tokenize_to_store(*args, **kwargs):
    with open({str(record)!r}, "a") as f:
        f.write(os.environ["RANK"] + "\\n")
    return real(*args, **kwargs)

training_data.tokenize_to_store = tokenize_to_store
sys.argv = ["train.py", *sys.argv[1:]]
sys.exit(train_main())
"""
    recording = tmp_path / "recording_train.py"
    recording.write_text(script)
    out = tmp_path / "two"
    launch(accelerate_launch("ddp.yaml"),
           train_args(tiny_model_dir, pairs_file, out, "--max_steps", "2",
                      "--tokenized_cache_dir", str(tmp_path / "cache")),
           tmp_path, script=str(recording))
    # Rank 0 tokenized both splits (train, eval); rank 1 never did.
    assert record.read_text().split() == ["0", "0"]
    assert plan(out)["tokenized_cache"] == "miss" and plan(out)["num_processes"] == 2
    assert len(os.listdir(tmp_path / "cache")) == 1
