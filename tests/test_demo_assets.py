"""The offline demo: its task and rule, the bundled data and model, its evaluation."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from dpo_core.config.chat import ChatConfig
from dpo_core.config.train import TrainConfig
from dpo_core.demo import (
    ASSETS_DIR,
    CHAT_PRESETS,
    DEMO_PRESETS,
    demo_evaluation,
    eval_file,
    follows_rule,
    format_before_after,
    generation_accuracy,
    implicit_reward_accuracy,
    make_pair,
    make_pairs,
    model_dir,
    parse_prompt,
    preference_accuracy,
    split_operands,
    train_file,
)
from dpo_core.modeling.generation import generate_replies

MAX_ASSET_BYTES = 10 * 1000 * 1000


def read_rows(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def unordered(prompt: str) -> tuple[int, int]:
    a, b = parse_prompt(prompt)
    return min(a, b), max(a, b)


@pytest.fixture(scope="module")
def demo_tokenizer():
    return AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)


@pytest.fixture(scope="module")
def demo_model():
    return AutoModelForCausalLM.from_pretrained(model_dir(), local_files_only=True).eval()


@pytest.fixture(scope="module")
def eval_rows():
    return read_rows(eval_file())


# -- the rule ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("37 + 48 = 85", True),
        ("  37 + 48 = 85\n", True),  # surrounding whitespace does not matter
        ("37 + 48 = 8", False),  # cut a digit short: the demo's rejected reply
        ("37 + 48 = 86", False),  # off by one
        ("37 + 48 = 58", False),  # digits backwards
        ("85", False),  # not the fixed form
        ("48 + 37 = 85", False),  # operands must be restated in the prompt's order
        ("37 + 48 = 85 85", False),  # extra text after the answer
        ("37 + 48 = 850", False),
        ("37+48=85", False),
        ("", False),
    ],
)
def test_follows_rule_hand_checked(response, expected):
    assert follows_rule("What is 37 + 48?", response) is expected


def test_follows_rule_with_carry_into_hundreds():
    assert follows_rule("What is 99 + 99?", "99 + 99 = 198")
    assert not follows_rule("What is 99 + 99?", "99 + 99 = 199")


def test_parse_prompt_rejects_other_text():
    assert parse_prompt("What is 10 + 99?") == (10, 99)
    with pytest.raises(ValueError, match="not a demo prompt"):
        parse_prompt("What is 10 - 99?")
    with pytest.raises(ValueError, match="not a demo prompt"):
        follows_rule("Hello", "10 + 99 = 109")


def test_make_pair_is_a_standard_row():
    assert make_pair(37, 48) == {
        "prompt": "What is 37 + 48?",
        "chosen": "37 + 48 = 85",
        "rejected": "37 + 48 = 8",
    }
    assert make_pairs([(10, 10), (99, 99)]) == [
        {"prompt": "What is 10 + 10?", "chosen": "10 + 10 = 20", "rejected": "10 + 10 = 2"},
        {"prompt": "What is 99 + 99?", "chosen": "99 + 99 = 198", "rejected": "99 + 99 = 19"},
    ]


def test_split_operands_holds_out_unordered_pairs():
    train, held_out = split_operands(num_eval=50, seed=3)
    assert len(held_out) == len({unordered(f"What is {a} + {b}?") for a, b in held_out}) == 50
    held_out_keys = {(min(a, b), max(a, b)) for a, b in held_out}
    assert not held_out_keys & {(min(a, b), max(a, b)) for a, b in train}
    # Every ordered pair of two-digit operands is in exactly one side: 90 * 90 in all, each
    # held-out unordered pair removing its two orders from training (one when a == b).
    removed = sum(1 if a == b else 2 for a, b in held_out_keys)
    assert len(train) == len(set(train)) == 90 * 90 - removed
    assert split_operands(num_eval=50, seed=3) == (train, held_out)
    assert split_operands(num_eval=50, seed=4)[1] != held_out


# -- accuracies ----------------------------------------------------------------------------


def test_preference_accuracy_counts_strict_wins():
    chosen = torch.tensor([1.0, 2.0, 3.0, -1.0])
    rejected = torch.tensor([0.0, 2.0, 4.0, -5.0])
    assert preference_accuracy(chosen, rejected) == 0.5  # the tie at 2.0 is a miss
    with pytest.raises(ValueError, match="expected two"):
        preference_accuracy(chosen, rejected[:3])
    with pytest.raises(ValueError, match="at least one"):
        preference_accuracy(torch.empty(0), torch.empty(0))


def test_implicit_reward_accuracy_compares_log_ratios():
    policy_chosen = torch.tensor([-1.0, -2.0, -3.0])
    policy_rejected = torch.tensor([-2.0, -1.0, -3.0])
    reference_chosen = torch.tensor([-1.5, -4.0, -1.0])
    reference_rejected = torch.tensor([-1.0, -1.5, -2.0])
    # Margins (pc - rc) - (pr - rr): 0.5 - (-1.0) > 0; 2.0 - 0.5 > 0; -2.0 - (-1.0) < 0.
    accuracy = implicit_reward_accuracy(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected
    )
    assert accuracy == pytest.approx(2 / 3)
    # Policy equal to reference: every reward ties at 0, a strict count gives 0.
    assert implicit_reward_accuracy(policy_chosen, policy_rejected,
                                    policy_chosen, policy_rejected) == 0.0


# -- the bundled data ------------------------------------------------------------------------


@pytest.mark.parametrize("path", [train_file(), eval_file()], ids=["train", "eval"])
def test_data_file_rows_are_valid_pairs(path):
    rows = read_rows(path)
    assert rows
    for index, row in enumerate(rows):
        assert set(row) == {"prompt", "chosen", "rejected"}, f"{path} row {index}"
        assert all(isinstance(value, str) and value for value in row.values()), f"row {index}"
        assert follows_rule(row["prompt"], row["chosen"]), f"{path} row {index}: chosen"
        assert not follows_rule(row["prompt"], row["rejected"]), f"{path} row {index}: rejected"
    assert len({row["prompt"] for row in rows}) == len(rows)


def test_eval_prompts_are_disjoint_from_train_prompts(eval_rows):
    train_keys = {unordered(row["prompt"]) for row in read_rows(train_file())}
    eval_keys = {unordered(row["prompt"]) for row in eval_rows}
    assert len(eval_keys) == len(eval_rows) == 200
    assert not train_keys & eval_keys  # not even the commuted twin of a held-out prompt


# -- the bundled model -------------------------------------------------------------------------


def test_assets_are_small_and_in_safetensors():
    files = [f for f in ASSETS_DIR.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= MAX_ASSET_BYTES
    assert (model_dir() / "model.safetensors").is_file()
    assert not list(ASSETS_DIR.rglob("*.bin"))


def test_model_and_tokenizer_load_offline(demo_model, demo_tokenizer):
    assert isinstance(demo_model, LlamaForCausalLM)
    assert demo_model.config.vocab_size == len(demo_tokenizer)
    assert demo_tokenizer.chat_template
    assert demo_tokenizer.eos_token == "</s>"
    for digit in "0123456789":  # digits are single tokens: the model adds column by column
        assert len(demo_tokenizer(f"What is 1{digit} + {digit}5?").input_ids) == len(
            demo_tokenizer("What is 10 + 05?").input_ids
        )


def test_model_generates_replies_in_the_task_form(demo_model, demo_tokenizer, eval_rows):
    prompts = [row["prompt"] for row in eval_rows[:8]]
    replies = generate_replies(demo_model, demo_tokenizer, prompts, max_new_tokens=16)
    for prompt, reply in zip(prompts, replies, strict=True):
        a, b = parse_prompt(prompt)
        assert reply.startswith(f"{a} + {b} = "), reply


def test_base_model_follows_the_rule_on_about_half_of_held_out_prompts(
    demo_model, demo_tokenizer, eval_rows
):
    prompts = [row["prompt"] for row in eval_rows]
    replies = generate_replies(demo_model, demo_tokenizer, prompts, max_new_tokens=16,
                               batch_size=100)
    right = sum(map(follows_rule, prompts, replies)) / len(prompts)
    cut_short = sum(reply == row["rejected"] for row, reply in zip(eval_rows, replies,
                                                                    strict=True)) / len(prompts)
    assert 0.3 <= right <= 0.7
    # It has learned to add: almost every reply is one of the two it was shown, so DPO has
    # only to move the choice between them.
    assert right + cut_short >= 0.9
    assert generation_accuracy(demo_model, demo_tokenizer, prompts, batch_size=100) == right


# -- the evaluation hook and the presets -----------------------------------------------------


def test_demo_evaluation_before_training(demo_model, demo_tokenizer):
    plain = demo_evaluation(demo_model, demo_tokenizer)
    assert plain["reward_accuracy"] is None  # no adapter, no reference
    assert plain["num_pairs"] == 200
    assert 0.0 <= plain["preference_accuracy"] <= 1.0

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(demo_model, config)  # LoRA B starts at zero: policy == base
    try:
        fresh = demo_evaluation(peft_model, demo_tokenizer)
        with peft_model.disable_adapter():
            before = demo_evaluation(peft_model, demo_tokenizer)
    finally:
        peft_model.unload()  # give the shared fixture its plain modules back
    for metrics in (fresh, before):
        assert metrics["reward_accuracy"] is None  # policy is the reference: n/a, not 0
        assert metrics["preference_accuracy"] == plain["preference_accuracy"]
        assert metrics["generation_accuracy"] == plain["generation_accuracy"]

    table = format_before_after({"before": before, "after": {**before, "reward_accuracy": 0.97}})
    assert f"{before['generation_accuracy']:.1%}" in table
    assert "97.0%" in table and "before training the policy is the reference" in table
    full = format_before_after({"before": plain, "after": plain})  # full fine-tuning
    assert "full fine-tuning keeps no reference model" in full
    assert "before training the policy is the reference" not in full


def test_presets_name_real_settings_and_files():
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    chat_fields = {f.name for f in dataclasses.fields(ChatConfig)}
    assert set(DEMO_PRESETS) <= train_fields
    assert set(CHAT_PRESETS) <= chat_fields
    TrainConfig(**DEMO_PRESETS).validate()
    assert DEMO_PRESETS["eval_dataset"] == str(eval_file())
    assert CHAT_PRESETS["adapter_path"] == DEMO_PRESETS["output_dir"]
