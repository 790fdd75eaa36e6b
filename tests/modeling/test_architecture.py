"""What a run takes from each model family: the attention it can run, the LoRA targets it
has, the positions it has room for and its router's loss weight."""

from __future__ import annotations

import pytest
import torch

from dpo_core.config.train import TrainConfig
from dpo_core.errors import ConfigError
from dpo_core.modeling.adapters import (
    ATTENTION_PROJECTIONS,
    adapted_modules,
    add_lora,
    build_policy,
    expert_note,
    resolve_lora_targets,
)
from dpo_core.modeling.architecture import (
    attention_note,
    fit_lengths,
    router_aux_loss_coef,
    router_shape,
)
from dpo_core.modeling.loading import load_base_model
from dpo_core.testing import MODEL_FAMILIES, tiny_family

# What --lora_target_modules auto adapts where a family lacks one of q/k/v/o_proj: peft's
# table for its model type, else every linear layer.
AUTO_TARGETS = {
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "phi3": "all-linear",
}
# What the adapter then adapts, as the run plan records it.
ADAPTED = {"gpt2": "c_attn", "gpt_neox": "query_key_value", "phi": "fc1,fc2,q_proj,v_proj",
           "phi3": "down_proj,gate_up_proj,o_proj,qkv_proj"}


@pytest.mark.parametrize("family", list(MODEL_FAMILIES))
def test_auto_lora_targets_of_every_family(family):
    model = tiny_family(family, vocab_size=96)
    targets = resolve_lora_targets(model, "auto")
    assert targets == AUTO_TARGETS.get(family, ATTENTION_PROJECTIONS)
    policy = add_lora(model, r=2, alpha=4, dropout=0.0, target_modules="auto",
                      gradient_checkpointing=False, quantized=False)
    assert adapted_modules(policy) == ADAPTED.get(family, "k_proj,o_proj,q_proj,v_proj")
    assert any(p.requires_grad for p in policy.parameters())


def test_target_names_the_model_lacks_are_refused_with_its_linear_layers():
    gpt2 = tiny_family("gpt2", vocab_size=96)
    with pytest.raises(ConfigError, match=r"no module named q_proj, v_proj; its linear layers "
                                          r"are c_attn,c_fc,c_proj \(or pass auto"):
        resolve_lora_targets(gpt2, ["q_proj", "v_proj", "c_attn"])
    # peft's rule: a target may name the end of a dotted module name.
    assert resolve_lora_targets(gpt2, ["attn.c_attn"]) == ["attn.c_attn"]


def test_mixtral_experts_adapted_under_all_linear_without_dropout(family_model_dir, tmp_path):
    """peft adapts Mixtral's fused expert weights (lora.ParamWrapper) under all-linear, which
    takes no LoRA dropout: with --disable_dropout (the default) the adapter is made without
    any; with dropout asked for, one error names the flags. 'auto' leaves the experts frozen,
    and the plan's note says so."""
    path = family_model_dir("mixtral")
    config = TrainConfig(model_name=path, lora_target_modules="all-linear")
    policy = build_policy(config, torch.float32, quantize=False, gradient_checkpointing=False)
    experts = router_shape(policy.config)[0]
    assert {"gate_up_proj", "down_proj"} <= set(policy.peft_config["default"].target_parameters)
    assert "fused weights (down_proj, gate.weight, gate_up_proj)" in expert_note(policy, experts)
    with pytest.raises(ConfigError, match="pass --lora_dropout 0, or keep --disable_dropout on"):
        build_policy(TrainConfig(model_name=path, lora_target_modules="all-linear",
                                 disable_dropout=False),
                     torch.float32, quantize=False, gradient_checkpointing=False)
    frozen = build_policy(TrainConfig(model_name=path), torch.float32, quantize=False,
                          gradient_checkpointing=False)
    assert "leaves the 4 experts' weights frozen" in expert_note(frozen, experts)


def test_attention_auto_loads_what_the_model_can_run(family_model_dir):
    """Gemma 2 refuses SDPA (soft-capped attention): 'auto' loads it with eager and says why;
    asking for SDPA stops with the flag named. Gemma 3 runs SDPA."""
    gemma2 = load_base_model(family_model_dir("gemma2"), dtype=torch.float32,
                             quantize_4bit=False)
    assert gemma2.config._attn_implementation == "eager"
    assert "Gemma2ForCausalLM cannot run SDPA" in attention_note(gemma2, "auto")
    assert attention_note(gemma2, "eager") is None
    with pytest.raises(ConfigError, match="--attn_implementation sdpa: .* use "
                                          "--attn_implementation auto"):
        load_base_model(family_model_dir("gemma2"), dtype=torch.float32, quantize_4bit=False,
                        attn_implementation="sdpa")
    gemma3 = load_base_model(family_model_dir("gemma3"), dtype=torch.float32,
                             quantize_4bit=False)
    assert gemma3.config._attn_implementation == "sdpa"
    assert attention_note(gemma3, "auto") is None


def test_lengths_fit_the_models_positions():
    """GPT-2's 64 learned positions: --max_length 128 becomes 64, the prompt keeping its
    share (64 of 128 -> 32 of 64); lengths that fit are kept, with no note."""
    gpt2 = tiny_family("gpt2", vocab_size=96)
    max_length, prompt, note = fit_lengths(gpt2, 128, 64)
    assert (max_length, prompt) == (64, 32)
    assert "--max_length 128 is longer than the 64 positions of this model" in note
    assert fit_lengths(gpt2, 64, 40) == (64, 40, None)


def test_router_weight_from_the_model_config_or_the_flag():
    mixtral = tiny_family("mixtral", vocab_size=96)
    assert router_aux_loss_coef(mixtral, None)[0] == mixtral.config.router_aux_loss_coef > 0
    assert router_aux_loss_coef(mixtral, 0.5) == (
        0.5, "the router's load-balancing loss is added with weight 0.5 (loss/aux)")
    assert router_aux_loss_coef(mixtral, 0.0) == (0.0, "no router load-balancing loss (weight 0)")
    llama = tiny_family("llama", vocab_size=96)
    assert router_aux_loss_coef(llama, None) == (None, None)
    assert router_aux_loss_coef(llama, 0.5) == (
        None, "--router_aux_loss_coef 0.5 ignored: this model has no router")
