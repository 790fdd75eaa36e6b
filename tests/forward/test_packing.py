"""Padding-free rows and the LM head projected by hand: equal to the padded, full-logits
paths to 1e-5, values and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_logps import (
    IGNORE,
    PAIR_LENGTHS,
    backward_and_grads,
    naive_pair_logps,
    pair_batch,
    pair_weights,
    random_pairs,
    with_nonzero_lora,
)
from transformers import Gemma2Config, Gemma2ForCausalLM

from dpo_core.data.batches import PreferenceCollator
from dpo_core.data.tokenization import TokenizedPair
from dpo_core.forward import logps as logps_module
from dpo_core.forward.attention import PACKED_ATTENTION, use_packed_attention
from dpo_core.forward.logps import (
    concatenated_forward,
    concatenated_token_logps,
    head_label_logps,
)
from dpo_core.forward.packing import (
    PaddingFreeCollator,
    pack_sequences,
    padding_free_forward,
    padding_free_prefix_shared_forward,
    padding_free_prefix_shared_token_logps,
    padding_free_token_logps,
)
from dpo_core.forward.prefix_sharing import prefix_shared_forward
from dpo_core.forward.strategy import (
    resolve_padding_free,
    resolve_prefix_sharing,
    token_logps_fn_for,
)
from dpo_core.testing import tiny_llama

# Longer lists than PAIR_LENGTHS' so that packed rows hold sequences of very different lengths.
UNEVEN_LENGTHS = PAIR_LENGTHS + [(14, 1, 11), (2, 12, 3)]


def lora_model(attn_implementation: str, num_kv_heads: int = 4):
    """A tiny Llama with LoRA whose B weights are non-zero (so adapter on and off differ)."""
    base = tiny_llama(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=num_kv_heads, attn_implementation=attn_implementation)
    return with_nonzero_lora(get_peft_model(base, LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj"])))


# ---------------------------------------------------------------- the LM head by hand


@pytest.mark.parametrize("trainable_head", [False, True], ids=["frozen", "trainable"])
def test_head_label_logps_equal_full_log_softmax(monkeypatch, trainable_head):
    """Both head paths (fused frozen Linear; module called per chunk under checkpointing)
    against a float64 log_softmax of the full logits: values, and gradients to the hidden
    states (and to the head's weight when it trains), with repeated rows and small chunks."""
    monkeypatch.setattr(logps_module, "CHUNK_ELEMENTS", 3 * 50)
    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True)
    head.requires_grad_(trainable_head)
    hidden = torch.randn(9, 16, generator=generator, requires_grad=True)
    rows = torch.tensor([0, 1, 1, 2, 4, 4, 5, 7, 8, 8, 3])
    targets = torch.randint(0, 50, (len(rows),), generator=generator)
    weights = torch.randn(len(rows), generator=generator)

    result, _ = head_label_logps(head, hidden, rows, targets)
    (result @ weights).backward()
    grads = [hidden.grad.clone()] + ([head.weight.grad.clone()] if trainable_head else [])
    hidden.grad = None
    head.zero_grad()
    expected = torch.log_softmax(head(hidden).double(), -1)[rows, targets]
    (expected @ weights.double()).backward()
    expected_grads = [hidden.grad] + ([head.weight.grad] if trainable_head else [])

    assert result.dtype == torch.float32
    torch.testing.assert_close(result.double(), expected.detach(), atol=1e-5, rtol=1e-6)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)


def test_trained_head_under_peft_modules_to_save():
    """An lm_head in `modules_to_save` is the PEFT wrapper module, called as it is: log-probs
    and gradients equal the model's own full logits, and the trained copy gets gradients."""
    base = tiny_llama(vocab_size=96, hidden_size=32, num_layers=1, num_heads=2)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                            modules_to_save=["lm_head"]))
    with torch.no_grad():  # a trained head copy that differs from the original
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    pairs = random_pairs(96, PAIR_LENGTHS)
    weights = pair_weights(len(pairs))
    chosen, rejected, grads = backward_and_grads(model, concatenated_forward,
                                                 pair_batch(pairs, "right"), weights)
    model.zero_grad()
    ref_chosen, ref_rejected = naive_pair_logps(model, pairs)
    (ref_chosen.float() @ weights[0] + ref_rejected.float() @ weights[1]).backward()
    torch.testing.assert_close(chosen.double(), ref_chosen.detach(), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(rejected.double(), ref_rejected.detach(), atol=1e-5, rtol=1e-6)
    expected = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any("modules_to_save" in name for name in expected)
    torch.testing.assert_close(grads, expected, atol=1e-5, rtol=1e-4)


def test_models_that_postprocess_logits_use_their_full_logits():
    """Gemma 2 soft-caps its logits after the head: the head-by-hand path would miss that, so
    its log-probs come from the model's own logits and equal the naive loop."""
    config = Gemma2Config(vocab_size=96, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                          head_dim=16, final_logit_softcapping=2.0, attn_implementation="eager")
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config).eval()
    assert logps_module._decoder_and_head(model) is None
    pairs = random_pairs(96, PAIR_LENGTHS)
    with torch.no_grad():
        chosen, rejected = concatenated_forward(model, pair_batch(pairs, "left"))
        ref_chosen, ref_rejected = naive_pair_logps(model, pairs)
    torch.testing.assert_close(chosen.double(), ref_chosen, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(rejected.double(), ref_rejected, atol=1e-5, rtol=1e-6)


# ---------------------------------------------------------------- padding-free rows


def test_pack_sequences_layout():
    """Real tokens only, positions restarting per sequence, each label predicted from the
    position before it within its own sequence."""
    batch = pair_batch([([5, 6], [7], [8, 9]), ([10], [11, 12], [13])], "left")
    row = pack_sequences(
        torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]),
        torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]]),
        torch.cat([batch["chosen_labels"], batch["rejected_labels"]]),
    )
    assert row.input_ids.tolist() == [[5, 6, 7, 10, 11, 12, 5, 6, 8, 9, 10, 13]]
    assert row.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 0, 1]]
    assert row.blocks == [(0, 0, 3, 0), (3, 0, 3, 0), (6, 0, 4, 0), (10, 0, 2, 0)]
    assert row.source_positions.tolist() == [1, 3, 4, 7, 8, 10]
    assert row.targets.tolist() == [7, 11, 12, 8, 9, 13]
    assert row.sequence_index.tolist() == [0, 1, 1, 2, 2, 3]


def _use(model, attn_implementation: str):
    if attn_implementation == PACKED_ATTENTION:
        assert use_packed_attention(model.get_base_model())
    return model


@pytest.mark.parametrize("attn_implementation", [PACKED_ATTENTION, "sdpa", "eager"])
@pytest.mark.parametrize("forward", [padding_free_forward, padding_free_prefix_shared_forward],
                         ids=["standard", "prefix-shared"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padding_free_equals_padded_forward(attn_implementation, forward, padding_side):
    """Values and LoRA gradients of the packed row (per-block SDPA, or one dense mask) equal
    the padded two-row forward, adapter on (policy) and off (reference)."""
    base_implementation = "sdpa" if attn_implementation == PACKED_ATTENTION else (
        attn_implementation)
    model = _use(lora_model(base_implementation, num_kv_heads=2), attn_implementation)
    pairs = random_pairs(96, UNEVEN_LENGTHS)
    batch = pair_batch(pairs, padding_side, extra_padding=3)
    weights = pair_weights(len(pairs))

    packed = backward_and_grads(model, forward, batch, weights)
    padded = backward_and_grads(model, concatenated_forward, batch, weights)
    for got, want in zip(packed, padded, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), model.disable_adapter():
        reference = forward(model, batch)
        expected = concatenated_forward(model, batch)
    torch.testing.assert_close(reference, expected, atol=1e-5, rtol=1e-5)


def test_packed_attention_is_plain_sdpa_without_a_packed_row():
    """A model switched to the packed attention computes padded batches (the 2D-mask and the
    4D prefix-sharing paths) and generation exactly as with SDPA."""
    sdpa = lora_model("sdpa")
    packed = _use(copy.deepcopy(sdpa), PACKED_ATTENTION)
    batch = pair_batch(random_pairs(96, UNEVEN_LENGTHS), "left")
    with torch.no_grad():
        for forward in (concatenated_forward, prefix_shared_forward):
            torch.testing.assert_close(forward(packed, batch), forward(sdpa, batch),
                                       atol=0, rtol=0)
        prompt = torch.tensor([[5, 6, 7]])
        assert torch.equal(packed.generate(input_ids=prompt, max_new_tokens=4, do_sample=False),
                           sdpa.generate(input_ids=prompt, max_new_tokens=4, do_sample=False))


def test_flex_attention_is_refused_on_cpu():
    model = lora_model("sdpa")
    model.get_base_model().config._attn_implementation = "flex_attention"
    batch = pair_batch(random_pairs(96, PAIR_LENGTHS), "right")
    with pytest.raises(ValueError, match="flex_attention"):
        padding_free_forward(model, batch)


def test_padding_free_resolution():
    """Unset: on where the attention is fast (SDPA; FlexAttention on CUDA only); asked for:
    also with eager (dense mask); never with flash attention. Packed rows share the prompt
    unless prefix sharing is off."""
    assert resolve_padding_free(None, "sdpa", on_cuda=False)
    assert not resolve_padding_free(None, "eager", on_cuda=False)
    assert resolve_padding_free(True, "eager", on_cuda=False)
    assert not resolve_padding_free(None, "flex_attention", on_cuda=False)
    assert resolve_padding_free(None, "flex_attention", on_cuda=True)
    assert not resolve_padding_free(True, "flash_attention_2", on_cuda=True)
    assert not resolve_padding_free(False, "sdpa", on_cuda=False)
    assert resolve_prefix_sharing(None, "sdpa", padding_free=True) == "always"
    assert resolve_prefix_sharing(False, "sdpa", padding_free=True) == "off"
    assert resolve_prefix_sharing(None, "sdpa") == "per batch"
    assert token_logps_fn_for("always", True) is padding_free_prefix_shared_token_logps
    assert token_logps_fn_for("off", True) is padding_free_token_logps
    assert token_logps_fn_for("off", False) is concatenated_token_logps


def test_padded_rows_cost_more_positions_than_packed():
    """What padding-free saves, counted: the padded forward processes every [2B, T] position,
    the packed row only the real tokens."""
    batch = pair_batch(random_pairs(96, UNEVEN_LENGTHS), "right")
    real = int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
    row = pack_sequences(
        torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]),
        torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]]),
        torch.cat([batch["chosen_labels"], batch["rejected_labels"]]),
    )
    assert row.input_ids.numel() == real < 2 * batch["chosen_input_ids"].numel()
    assert int((row.targets != IGNORE).sum()) == len(row.targets)


@pytest.mark.parametrize("prefix_shared", [False, True], ids=["standard", "prefix-shared"])
def test_layout_from_the_collator_equals_layout_built_in_the_forward(prefix_shared):
    """PaddingFreeCollator builds the packed row on the CPU, into the batch; the forward then
    uses it as is, with the same log-probs and gradients as the padded forward. A batch laid
    out for the other forward is rebuilt, not misread."""
    model = _use(lora_model("sdpa"), PACKED_ATTENTION)
    pairs = [TokenizedPair(*ids) for ids in random_pairs(96, UNEVEN_LENGTHS)]
    batch = PaddingFreeCollator(PreferenceCollator(pad_token_id=0), prefix_shared)(pairs)
    assert batch["packed_layout"] == ("prefix_shared" if prefix_shared else "sequences")
    forward, other = ((padding_free_prefix_shared_forward, padding_free_forward) if prefix_shared
                      else (padding_free_forward, padding_free_prefix_shared_forward))
    weights = pair_weights(len(pairs))
    expected = backward_and_grads(model, concatenated_forward, batch, weights)
    for fn in (forward, other):
        for got, want in zip(backward_and_grads(model, fn, batch, weights), expected,
                             strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
