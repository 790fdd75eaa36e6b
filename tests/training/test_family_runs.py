"""train.py at its defaults on the quirkiest families' tiny models (Gemma 2, Gemma 3, Mixtral,
GPT-2): each loads, gets its LoRA targets, trains two steps and says in the run plan what it
chose and why."""

from __future__ import annotations

import json
import math
import random

import pytest
from conftest import random_text, train_args, train_records, write_jsonl

import train


def run_plan(out) -> dict:
    with open(out / "training_config.json") as f:
        return json.load(f)["run_plan"]


def test_gemma2_runs_eager_with_its_windows_and_soft_capping(family_model_dir, pairs_file,
                                                            tmp_path):
    out = tmp_path / "gemma2"
    assert train.main(train_args(family_model_dir("gemma2"), pairs_file, out,
                                 "--max_steps", "2")) == 0
    plan = run_plan(out)
    assert plan["attn_implementation"] == "eager"
    assert (plan["padding_free"], plan["prefix_sharing"]) == (False, "per batch")
    assert plan["lora_target_modules"] == "k_proj,o_proj,q_proj,v_proj"
    assert any("Gemma2ForCausalLM cannot run SDPA" in note for note in plan["notes"])
    assert any(note.startswith("padding-free rows off: with eager attention")
               for note in plan["notes"])
    # Step 1: a zero adapter, policy == reference.
    assert train_records(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_gemma3_runs_packed_rows_across_its_window(family_model_dir, pairs_file, tmp_path):
    out = tmp_path / "gemma3"
    assert train.main(train_args(family_model_dir("gemma3"), pairs_file, out,
                                 "--max_steps", "2")) == 0
    plan = run_plan(out)
    assert (plan["attn_implementation"], plan["padding_free"], plan["prefix_sharing"]) == (
        "dpo_packed_sdpa", True, "always")
    assert plan["notes"] == []
    assert [r["step"] for r in train_records(out)] == [1, 2]


def test_mixtral_adds_its_router_loss(family_model_dir, pairs_file, tmp_path):
    """The router's load-balancing loss, weighted by the model config's coefficient, is part
    of the logged loss: at step 1 (zero adapter) loss = ln 2 + coef * loss/aux."""
    out = tmp_path / "mixtral"
    assert train.main(train_args(family_model_dir("mixtral"), pairs_file, out,
                                 "--max_steps", "2")) == 0
    plan = run_plan(out)
    coef = plan["router_aux_loss_coef"]
    assert coef == 0.001  # MixtralConfig's default
    assert any("leaves the 4 experts' weights frozen" in note for note in plan["notes"])
    first = train_records(out)[0]
    assert first["loss/aux"] > 1.0  # about top_k = 2 when routing is balanced
    assert first["loss"] == pytest.approx(math.log(2) + coef * first["loss/aux"], abs=1e-6)


def test_gpt2_longer_than_its_positions_is_cut_to_them(family_model_dir, tmp_path):
    """GPT-2's 64 learned positions and pairs of ~90 tokens at --max_length 128: the run cuts
    them to 64 (said in the plan) instead of indexing past the position table; its LoRA
    targets come from peft's table (c_attn)."""
    rng = random.Random(0)
    rows = [{"prompt": random_text(rng, 70), "chosen": "yes " + random_text(rng, 20),
             "rejected": "no " + random_text(rng, 20)} for _ in range(16)]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    out = tmp_path / "gpt2"
    assert train.main(train_args(family_model_dir("gpt2"), data, out, "--max_steps", "2",
                                 "--max_length", "128", "--max_prompt_length", "64")) == 0
    plan = run_plan(out)
    assert (plan["max_length"], plan["max_prompt_length"]) == (64, 32)
    assert plan["lora_target_modules"] == "c_attn"
    assert any("--max_length 128 is longer than the 64 positions" in n for n in plan["notes"])
    assert [r["step"] for r in train_records(out)] == [1, 2]
