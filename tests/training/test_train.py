"""End to end: train.py on a tiny local model and local data, then chat.py on the result."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, read_log, train_args
from peft import PeftModel
from transformers import AutoModelForCausalLM

import train
from dpo_core.config.train import TrainConfig
from dpo_core.errors import ConfigError
from dpo_core.training.schedule import get_lr


def test_train_end_to_end_learns_and_saves(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "run"
    assert train.main(train_args(tiny_model_dir, pairs_file, out, "--max_steps", "12")) == 0
    log = read_log(out)
    steps = [r for r in log if r["split"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, 13))
    # Step 1 runs with a zero-initialised adapter: policy == reference, loss exactly ln 2.
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.1
    assert steps[-1]["rewards/accuracies"] > 0.75
    evals = [r for r in log if r["split"] == "eval"]
    assert len(evals) == 1 and evals[0]["rewards/accuracies"] > 0.5
    for name in ("adapter_model.safetensors", "adapter_config.json", "training_config.json",
                 "metrics.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 12 and metrics["eval"]["loss"] == evals[0]["loss"]
    config = json.loads((out / "training_config.json").read_text())
    assert config["beta"] == 0.1 and config["max_steps"] == 12
    # The adapter loads with plain PEFT and changes the base model's output.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 5, 9, 12]])
    before = base(ids).logits
    adapted = PeftModel.from_pretrained(base, str(out))
    assert not torch.allclose(adapted(ids).logits, before)


def test_learning_rate_schedule_warms_up_then_decays():
    lrs = [get_lr(s, peak_lr=1.0, warmup_steps=4, total_steps=20, kind="cosine")
           for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    assert lrs[12] == pytest.approx(0.5 * (1 + math.cos(math.pi * 8 / 16)))
    # The original project's bug: 100 warmup steps in a 57-step run. Here warmup is capped.
    assert TrainConfig(warmup_steps=100).warmup_for(57) == 5
    assert TrainConfig(warmup_ratio=0.1).warmup_for(57) == 6


@pytest.mark.parametrize("flags, message", [
    (["--beta", "0"], "--beta must be > 0"),
    (["--max_prompt_length", "64"], "--max_prompt_length"),
    (["--batch_size", "0"], "--batch_size must be >= 1"),
])
def test_bad_settings_are_refused(tiny_model_dir, pairs_file, tmp_path, capsys, flags, message):
    assert train.main(train_args(tiny_model_dir, pairs_file, tmp_path / "x", *flags)) == 2
    assert message in capsys.readouterr().err


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        TrainConfig(model_name="./nowhere", dataset_name=str(tmp_path / "none.jsonl")).validate()


def test_cli_and_chat_subprocess(tiny_model_dir, pairs_file, tmp_path):
    """`python train.py` then `python chat.py --prompt` as a user runs them."""
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "train.py", *train_args(tiny_model_dir, pairs_file, out,
                                                             "--max_steps", "2")],
                   cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    chat = subprocess.run(
        [sys.executable, "chat.py", "--base_model", tiny_model_dir, "--adapter_path", str(out),
         "--prompt", "what is a cat", "--max_new_tokens", "8", "--temperature", "0"],
        cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    assert chat.stdout.strip(), chat.stderr


def test_qlora_4bit_on_cpu_trains(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "qlora"
    args = train_args(tiny_model_dir, pairs_file, out, "--max_steps", "2", "--quantization",
                      "4bit")
    assert train.main(args) == 0
    steps = [r for r in read_log(out) if r["split"] == "train"]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert math.isfinite(steps[1]["loss"]) and steps[1]["grad_norm"] > 0
    assert (out / "adapter_model.safetensors").is_file()


def test_merge_adapter_writes_an_equivalent_full_model(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "merged-run"
    assert train.main(train_args(tiny_model_dir, pairs_file, out, "--max_steps", "2",
                                 "--merge_adapter")) == 0
    ids = torch.tensor([[1, 5, 9, 12, 40]])
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                        str(out))
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-5)
    assert (out / "merged" / "tokenizer_config.json").is_file()
