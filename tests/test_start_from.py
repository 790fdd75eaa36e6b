"""Starting DPO from what users have: a trained (SFT) LoRA adapter, or every weight of a small
model (full fine-tuning).

From an adapter, the policy trains that adapter and the reference is the adapter as loaded,
frozen, on the same base: at step 1 the policy is the SFT model (not the base), the loss is
exactly ln 2, and the reference does not move while the policy does.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import learnable_pairs
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from dpo_core.config import ConfigError, TrainConfig
from dpo_core.data import PreferencePair
from dpo_core.logps import concatenated_forward
from dpo_core.model import (
    POLICY_ADAPTER,
    REFERENCE_ADAPTER,
    ModelLoadError,
    load_trainable_adapter,
    resolve_quantization,
)
from dpo_core.objective import PreferenceObjective
from dpo_core.reference import AdapterSwitched
from dpo_core.reference_cache import reference_cache_key, weights_fingerprint
from dpo_core.tiny import tiny_llama
from dpo_core.tokenization import PreferenceCollator, tokenize_pairs

SWITCHED = AdapterSwitched(reference=REFERENCE_ADAPTER, policy=POLICY_ADAPTER)


def save_sft_adapter(model_dir: str, path, seed: int) -> str:
    """A LoRA adapter with random, non-zero A and B (as after SFT): base + adapter != base."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(base, config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def sft_adapter(tiny_model_dir, tmp_path_factory) -> str:
    return save_sft_adapter(tiny_model_dir, tmp_path_factory.mktemp("sft") / "adapter", seed=1)


def policy_from(model_dir: str, adapter: str) -> PeftModel:
    return load_trainable_adapter(AutoModelForCausalLM.from_pretrained(model_dir), adapter,
                                  gradient_checkpointing=False, quantized=False)


def preference_batch(tokenizer, num: int = 6) -> dict[str, torch.Tensor]:
    rows = learnable_pairs(num, seed=5)
    pairs = [PreferencePair(r["prompt"], " " + r["chosen"], " " + r["rejected"]) for r in rows]
    tokenized, _ = tokenize_pairs(tokenizer, pairs, max_length=64, max_prompt_length=32,
                                  use_chat_template=True, disable=True)
    return PreferenceCollator(tokenizer.eos_token_id)(tokenized)


def test_step_one_policy_is_the_sft_model_and_the_reference_stays_fixed(
        tiny_model_dir, tiny_tokenizer, sft_adapter):
    batch = preference_batch(tiny_tokenizer)
    model = policy_from(tiny_model_dir, sft_adapter)
    objective = PreferenceObjective(reference=SWITCHED)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(f".{POLICY_ADAPTER}." in n for n in trainable)

    # Independent: plain PEFT loading of the SFT adapter, and the bare base.
    with torch.no_grad():
        sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                        sft_adapter).eval()
        sft_logps = concatenated_forward(sft, batch)
        base_logps = concatenated_forward(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                          batch)
    stats = objective(model, batch)
    for mine, sfts, bases in zip((stats["policy_chosen_logps"], stats["policy_rejected_logps"]),
                                 sft_logps, base_logps, strict=True):
        torch.testing.assert_close(mine, sfts, rtol=0, atol=1e-5)
        assert (mine - bases).abs().min() > 1e-2  # the base model is another network
    # Policy == reference, computed the same way: h = 0 exactly, loss ln 2 rounded once.
    assert torch.equal(stats["losses"], torch.full_like(stats["losses"], math.log(2)))
    assert torch.equal(stats["chosen_rewards"], torch.zeros_like(stats["chosen_rewards"]))
    assert torch.equal(stats["rejected_rewards"], torch.zeros_like(stats["rejected_rewards"]))

    reference_before = objective.reference_logps(model, batch)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()
                     if f".{REFERENCE_ADAPTER}." in n}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        objective(model, batch)["losses"].mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    # The reference pass switched adapters six times; the trainable set is unchanged.
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable
    assert model.active_adapter == POLICY_ADAPTER
    after = objective(model, batch)
    reference_after = objective.reference_logps(model, batch)
    for before, now in zip(reference_before, reference_after, strict=True):
        assert torch.equal(before, now)
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters()
               if f".{REFERENCE_ADAPTER}." in n)
    assert (after["policy_chosen_logps"] - sft_logps[0]).abs().max() > 1e-2
    assert after["losses"].mean() < math.log(2)


@pytest.mark.parametrize("hidden_size, num_layers, problem", [
    (48, 2, "size mismatch"),  # another width
    (64, 3, "adapter weights the base expects are not in it"),  # another depth
])
def test_adapter_of_another_base_is_refused(tiny_tokenizer, sft_adapter, hidden_size,
                                            num_layers, problem):
    other = tiny_llama(vocab_size=len(tiny_tokenizer), hidden_size=hidden_size,
                       num_layers=num_layers, num_heads=4)
    with pytest.raises(ModelLoadError, match=problem) as error:
        load_trainable_adapter(other, sft_adapter, gradient_checkpointing=False,
                               quantized=False)
    assert sft_adapter in str(error.value) and "does not fit" in str(error.value)


def test_adapter_for_modules_the_base_lacks_is_refused(tiny_tokenizer, tmp_path):
    # A GPT-2 shaped adapter (c_attn) on a Llama: another architecture.
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=64, n_layer=2,
                                      n_head=4))
    get_peft_model(gpt2, LoraConfig(r=2, target_modules=["c_attn"],
                                    task_type="CAUSAL_LM")).save_pretrained(tmp_path / "gpt2")
    llama = tiny_llama(vocab_size=len(tiny_tokenizer), hidden_size=64, num_layers=2,
                       num_heads=4)
    with pytest.raises(ModelLoadError, match="does not fit.*c_attn"):
        load_trainable_adapter(llama, str(tmp_path / "gpt2"), gradient_checkpointing=False,
                               quantized=False)


def test_cache_key_covers_the_starting_adapter_not_the_trained_one(
        tiny_model_dir, tiny_tokenizer, sft_adapter, tmp_path):
    batch_pairs = tokenize_pairs(tiny_tokenizer, [PreferencePair("a b", " yes", " no")],
                                 max_length=16, max_prompt_length=8, use_chat_template=False,
                                 disable=True)[0]
    model = policy_from(tiny_model_dir, sft_adapter)
    key = reference_cache_key(model, batch_pairs, {})
    # Training moves the policy adapter only: same reference, same key.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f"lora_B.{POLICY_ADAPTER}." in name:
                param.add_(1.0)
    assert reference_cache_key(model, batch_pairs, {}) == key
    # Another starting adapter on the same base: another reference, another key...
    other = save_sft_adapter(tiny_model_dir, tmp_path / "other", seed=2)
    assert reference_cache_key(policy_from(tiny_model_dir, other), batch_pairs, {}) != key
    # ...and the same one loaded again: the same key.
    assert weights_fingerprint(policy_from(tiny_model_dir, sft_adapter)) == \
        weights_fingerprint(model)


@pytest.mark.parametrize("settings, message", [
    ({"quantization": "4bit"}, "no gradient"),
    ({"adapter_path": "org/sft-adapter"}, "merge the adapter into its base first"),
    ({"merge_adapter": True}, "already saves the whole model"),
])
def test_full_finetuning_refuses_what_it_cannot_do(settings, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(finetuning_type="full", **settings).validate()


def test_full_finetuning_never_resolves_auto_to_4bit(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_quantization("auto") is True
    assert resolve_quantization("auto", full_finetuning=True) is False
