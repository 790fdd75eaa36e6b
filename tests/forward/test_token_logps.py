"""Per-token log-probs (`TokenLogps`) of every forward path: the same tokens, the same WPO
normaliser (log sum p^2, against a float64 softmax), the same LD-DPO sums and gradients;
--pad_to_multiple_of changes no log-prob; --activation_offloading changes no gradient and
really moves the saved activations to host memory."""

from __future__ import annotations

import pytest
import torch
from test_logps import PAIR_LENGTHS, lora_grads, pair_batch, random_pairs
from test_packing import UNEVEN_LENGTHS, lora_model
from transformers import Gemma2Config, Gemma2ForCausalLM

from dpo_core.data.batches import PreferenceCollator
from dpo_core.data.tokenization import TokenizedPair
from dpo_core.forward import offloading
from dpo_core.forward.attention import PACKED_ATTENTION, use_packed_attention
from dpo_core.forward.logps import TokenLogps, concatenated_token_logps
from dpo_core.forward.offloading import ActivationOffload
from dpo_core.forward.packing import (
    PackedRow,
    PaddingFreeCollator,
    padding_free_prefix_shared_token_logps,
    padding_free_token_logps,
)
from dpo_core.forward.prefix_sharing import prefix_shared_token_logps
from dpo_core.losses.functions import length_desensitized_logps
from dpo_core.testing import tiny_llama


def by_sequence(tokens: TokenLogps, values: torch.Tensor) -> list[torch.Tensor]:
    """`values` [N] (a TokenLogps field) split per sequence, in position order."""
    return [values[tokens.sequence_index == s] for s in range(2 * tokens.num_pairs)]


def naive_token_stats(model, pairs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per sequence (chosen of every pair, then rejected): each response token's log-prob and
    log sum_v p_v^2 of its distribution, one unpadded sequence at a time, in float64."""
    logps, sum_sq = [], []
    for side in (1, 2):
        for pair in pairs:
            prompt, response = pair[0], pair[side]
            logits = model(input_ids=torch.tensor([prompt + response])).logits[0].double()
            log_probs = torch.log_softmax(logits, dim=-1)[len(prompt) - 1:-1]
            logps.append(log_probs[torch.arange(len(response)), torch.tensor(response)])
            sum_sq.append(torch.logsumexp(2 * log_probs, dim=-1))
    return logps, sum_sq


def gemma_with_softcap():
    """Logits post-processed after the head: the full-logits path."""
    config = Gemma2Config(vocab_size=96, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                          head_dim=16, final_logit_softcapping=2.0, attn_implementation="eager")
    torch.manual_seed(0)
    return Gemma2ForCausalLM(config).eval()


@pytest.mark.parametrize("model_kind", ["frozen head (LoRA)", "trainable head", "full logits"])
def test_token_logps_and_log_sum_sq_equal_float64_softmax(model_kind):
    """Each way the head is applied (a frozen Linear by hand, a trainable head called per
    chunk, the model's own soft-capped logits) against float64 log_softmax per sequence."""
    model = {"frozen head (LoRA)": lambda: lora_model("sdpa"),
             "trainable head": lambda: tiny_llama(vocab_size=96, hidden_size=32, num_layers=1,
                                                  num_heads=2),
             "full logits": gemma_with_softcap}[model_kind]()
    pairs = random_pairs(96, PAIR_LENGTHS)
    tokens = concatenated_token_logps(model, pair_batch(pairs, "left"), log_sum_sq_probs=True)
    assert not tokens.log_sum_sq_probs.requires_grad and tokens.logps.requires_grad
    with torch.no_grad():
        expected_logps, expected_sum_sq = naive_token_stats(model, pairs)
    for got, want in zip(by_sequence(tokens, tokens.logps), expected_logps, strict=True):
        torch.testing.assert_close(got.detach().double(), want, atol=1e-5, rtol=1e-6)
    for got, want in zip(by_sequence(tokens, tokens.log_sum_sq_probs), expected_sum_sq,
                         strict=True):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-6)
    assert concatenated_token_logps(model, pair_batch(pairs, "left")).log_sum_sq_probs is None


PATHS = {
    "prefix-shared": (prefix_shared_token_logps, "sdpa"),
    "padding-free": (padding_free_token_logps, PACKED_ATTENTION),
    "padding-free prefix-shared": (padding_free_prefix_shared_token_logps, PACKED_ATTENTION),
    "padding-free, dense mask": (padding_free_prefix_shared_token_logps, "eager"),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_every_path_gives_the_same_tokens_and_ld_gradients(path):
    """Each path against the standard two-row forward: each sequence's tokens in the same
    order with the same log-prob and log sum p^2, and LD-DPO's sums (alpha 0.5) with the same
    values and LoRA gradients."""
    token_logps, attention = PATHS[path]
    model = lora_model("sdpa" if attention == PACKED_ATTENTION else attention, num_kv_heads=2)
    if attention == PACKED_ATTENTION:
        use_packed_attention(model.get_base_model())
    pairs = random_pairs(96, UNEVEN_LENGTHS)
    batch = pair_batch(pairs, "right", extra_padding=2)
    weights = torch.randn(2, len(pairs), generator=torch.Generator().manual_seed(5))
    results = []
    for fn in (token_logps, concatenated_token_logps):
        model.zero_grad()
        tokens = fn(model, batch, log_sum_sq_probs=True)
        chosen, rejected = length_desensitized_logps(tokens.logps, tokens.sequence_index,
                                                     tokens.num_pairs, 0.5)
        (chosen @ weights[0] + rejected @ weights[1]).backward()
        results.append((tokens, torch.stack([chosen, rejected]).detach(), lora_grads(model)))
    (tokens, sums, grads), (expected, expected_sums, expected_grads) = results
    for field in ("logps", "log_sum_sq_probs"):
        for got, want in zip(by_sequence(tokens, getattr(tokens, field)),
                             by_sequence(expected, getattr(expected, field)), strict=True):
            torch.testing.assert_close(got.detach(), want.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sums, expected_sums, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads, expected_grads, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- --pad_to_multiple_of


@pytest.mark.parametrize("attention", [PACKED_ATTENTION, "sdpa", None],
                         ids=["padding-free", "padding-free dense mask", "padded"])
@pytest.mark.parametrize("prefix_shared", [False, True], ids=["standard", "prefix-shared"])
def test_pad_to_multiple_of_rounds_every_row_and_changes_no_logp(attention, prefix_shared):
    """Padded rows and the packed row come out a multiple of 8 (or 5) wide (the packed row by
    one padding block that predicts nothing and weighs nothing) and every log-prob is as
    without rounding."""
    model = lora_model("eager" if attention is None else "sdpa")
    if attention == PACKED_ATTENTION:
        use_packed_attention(model.get_base_model())
    pairs = [TokenizedPair(*ids) for ids in random_pairs(96, UNEVEN_LENGTHS)]
    fn = (concatenated_token_logps if attention is None else
          padding_free_prefix_shared_token_logps if prefix_shared else padding_free_token_logps)
    tokens = []
    for multiple in (None, 8, 5):  # 5: the standard row (128 tokens) needs padding too
        collator = PreferenceCollator(pad_token_id=0, pad_to_multiple_of=multiple)
        if attention is not None:
            collator = PaddingFreeCollator(collator, prefix_shared)
        batch = collator(pairs)
        if multiple:
            assert batch["chosen_input_ids"].shape[1] % multiple == 0
            if attention is not None:
                width = batch["packed_input_ids"].shape[1]
                start, *sizes = batch["packed_blocks"][-1]
                assert width % multiple == 0 and sizes == [0, width - start, 0]
                # The padding is no sequence: it weighs nothing (e.g. in a router's loss).
                padding = batch["packed_padding"]
                weights = PackedRow.from_batch(batch).layout().token_weights()[0]
                assert weights[width - padding:].eq(0).all()
                assert weights[:width - padding].gt(0).all()
        with torch.no_grad():
            tokens.append(fn(model, batch))
    for rounded in tokens[1:]:
        torch.testing.assert_close(rounded.logps, tokens[0].logps, atol=1e-6, rtol=0)
        assert torch.equal(rounded.sequence_index, tokens[0].sequence_index)


# ---------------------------------------------------------------- --activation_offloading


def saved_activation_bytes(model, run) -> int:
    """Bytes of the distinct tensors a forward saves for backward that are not the model's
    weights and hold at least MIN_OFFLOAD_BYTES: counted by hooks of our own."""
    weights = {t.untyped_storage().data_ptr() for t in model.parameters()}
    seen = {}

    def pack(tensor):
        if (tensor.nbytes >= offloading.MIN_OFFLOAD_BYTES
                and tensor.untyped_storage().data_ptr() not in weights):
            seen[id(tensor)] = (tensor, tensor.nbytes)  # kept alive: ids stay distinct
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(nbytes for _, nbytes in seen.values())


def test_offloaded_activations_live_in_host_memory_and_change_no_gradient(monkeypatch):
    """Every saved activation goes through the hooks into a host copy of its own (CPU tensors
    too, with STAYS emptied: this machine has no accelerator), each once, the weights never;
    the loss and every gradient are bit for bit those without offloading."""
    model = lora_model("sdpa")
    batch = pair_batch(random_pairs(96, UNEVEN_LENGTHS), "right")

    def loss() -> torch.Tensor:
        chosen, rejected = concatenated_token_logps(model, batch).sums()
        return (chosen - 2 * rejected).sum()

    model.zero_grad()
    plain = loss()
    plain.backward()
    expected = lora_grads(model)
    expected_bytes = saved_activation_bytes(model, loss)

    monkeypatch.setattr(offloading, "STAYS", ())
    copies = []
    real_pack = ActivationOffload._pack

    def watched_pack(self, tensor):
        packed = real_pack(self, tensor)
        if isinstance(packed, tuple):
            copies.append((tensor.untyped_storage().data_ptr(), packed[1]))
        return packed

    monkeypatch.setattr(ActivationOffload, "_pack", watched_pack)
    model.zero_grad()
    with ActivationOffload(model) as offload:
        offloaded = loss()
    offloaded.backward()
    assert offload.offloaded_bytes == expected_bytes > 0
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    hosts = {id(host): host for _, host in copies}
    assert sum(h.nbytes for h in hosts.values()) == expected_bytes  # a tensor is copied once
    assert all(h.device.type == "cpu" and h.untyped_storage().data_ptr() != original
               for original, h in copies)
    assert not weights & {original for original, _ in copies}
    assert torch.equal(offloaded, plain)
    for name, grad in lora_grads(model).items():
        assert torch.equal(grad, expected[name]), name


def test_cpu_tensors_stay_where_they_are():
    """On a CPU-only run the hooks move nothing: activations are in host memory already."""
    model = tiny_llama(vocab_size=96, hidden_size=32, num_layers=1, num_heads=2)
    batch = pair_batch(random_pairs(96, PAIR_LENGTHS), "left")
    with ActivationOffload(model) as offload:
        concatenated_token_logps(model, batch).sums()[0].sum().backward()
    assert offload.offloaded_bytes == 0
