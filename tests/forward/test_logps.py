"""Sequence log-probs: chunked gather-minus-logsumexp, the concatenated and prefix-shared forwards.

References are independent: a float64 log_softmax per sequence, and a loop that runs the model
on one unpadded sequence at a time.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.masking_utils import sliding_window_causal_mask_function

from benchmarks.memory import peak_bytes_of
from dpo_core.data.batches import PreferenceCollator
from dpo_core.data.pairs import PreferencePair
from dpo_core.data.tokenization import tokenize_pair
from dpo_core.forward import logps as logps_module
from dpo_core.forward.logps import concatenated_forward, sequence_logps
from dpo_core.forward.prefix_sharing import prefix_shared_batch, prefix_shared_forward

IGNORE = -100

# (prompt, chosen response, rejected response) lengths: mixed, including a one-token prompt,
# a one-token response and responses longer than their prompt.
PAIR_LENGTHS = [(5, 3, 6), (1, 7, 1), (9, 2, 2), (3, 4, 8)]


# ---------------------------------------------------------------- helpers


def random_pairs(vocab_size: int, lengths, seed: int = 0) -> list[tuple[list[int], ...]]:
    generator = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab_size, (n,), generator=generator).tolist()

    return [(ids(p), ids(c), ids(r)) for p, c, r in lengths]


def pair_batch(pairs, padding_side: str, pad_id: int = 0, extra_padding: int = 0) -> dict:
    """What the collator produces: chosen/rejected ids, masks and labels at one common T."""
    seq_len = max(len(p) + max(len(c), len(r)) for p, c, r in pairs) + extra_padding
    batch = {
        f"{side}_{field}": []
        for side in ("chosen", "rejected")
        for field in ("input_ids", "attention_mask", "labels")
    }
    for prompt, chosen, rejected in pairs:
        for side, response in (("chosen", chosen), ("rejected", rejected)):
            ids = prompt + response
            labels = [IGNORE] * len(prompt) + response
            pad = seq_len - len(ids)
            rows = {
                "input_ids": (ids, [pad_id] * pad),
                "attention_mask": ([1] * len(ids), [0] * pad),
                "labels": (labels, [IGNORE] * pad),
            }
            for field, (values, padding) in rows.items():
                row = padding + values if padding_side == "left" else values + padding
                batch[f"{side}_{field}"].append(row)
    tensors = {key: torch.tensor(value) for key, value in batch.items()}
    tensors["prompt_lengths"] = torch.tensor([len(p) for p, _, _ in pairs])
    return tensors


def naive_pair_logps(model, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """One unpadded sequence at a time, full float64 log_softmax."""
    chosen, rejected = [], []
    for prompt, *responses in pairs:
        for response, out in zip(responses, (chosen, rejected), strict=True):
            ids = torch.tensor([prompt + response])
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            predicted_at = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
            out.append(log_probs[predicted_at, torch.tensor(response)].sum())
    return torch.stack(chosen), torch.stack(rejected)


def naive_sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float64 reference for sequence_logps, one position at a time."""
    sums = []
    for row_logits, row_labels in zip(logits, labels, strict=True):
        log_probs = torch.log_softmax(row_logits.double(), dim=-1)
        total = torch.zeros((), dtype=torch.float64)
        for t in range(1, len(row_labels)):
            if row_labels[t] != IGNORE:
                total = total + log_probs[t - 1, row_labels[t]]
        sums.append(total)
    return torch.stack(sums)


def random_labels(batch: int, seq_len: int, vocab: int, seed: int) -> torch.Tensor:
    """Labels with ignored prompt/padding stretches at both ends and in the middle of rows."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    ignored = torch.rand(batch, seq_len, generator=generator) < 0.4
    ignored[0, :3] = True
    ignored[-1, -2:] = True
    return labels.masked_fill(ignored, IGNORE)


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def backward_and_grads(model, forward, batch, weights) -> tuple[torch.Tensor, ...]:
    model.zero_grad()
    chosen, rejected = forward(model, batch)
    (chosen @ weights[0] + rejected @ weights[1]).backward()
    return chosen.detach(), rejected.detach(), lora_grads(model)


def with_nonzero_lora(model):
    """`model` (PEFT LoRA) with random LoRA B weights, so that adapter on and off differ, in
    eval mode."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model.eval()


@pytest.fixture()
def lora_and_base(tiny_model):
    """(PEFT LoRA model with non-zero LoRA weights, an untouched copy of its base model)."""
    base = copy.deepcopy(tiny_model).eval()
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    return with_nonzero_lora(get_peft_model(tiny_model, config)), base


def pair_weights(num_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return torch.randn(num_pairs, generator=generator), torch.randn(num_pairs, generator=generator)


# ---------------------------------------------------------------- sequence_logps


@pytest.mark.parametrize("rows_per_chunk", [3, None], ids=["small-chunks", "one-chunk"])
def test_sequence_logps_matches_float64_log_softmax(monkeypatch, rows_per_chunk):
    batch, seq_len, vocab = 3, 11, 37
    if rows_per_chunk is not None:
        monkeypatch.setattr(logps_module, "CHUNK_ELEMENTS", rows_per_chunk * vocab)
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(batch, seq_len, vocab, generator=generator) * 3).requires_grad_()
    labels = random_labels(batch, seq_len, vocab, seed=1)
    weights = torch.randn(batch, generator=generator, dtype=torch.float64)

    result = sequence_logps(logits, labels)
    reference = naive_sequence_logps(logits, labels)
    assert result.dtype == torch.float32 and result.shape == (batch,)
    torch.testing.assert_close(result.double(), reference.detach(), atol=1e-5, rtol=1e-6)

    (result.double() @ weights).backward()
    grad = logits.grad.clone()
    logits.grad = None
    (reference @ weights).backward()
    torch.testing.assert_close(grad, logits.grad, atol=1e-6, rtol=1e-5)
    # Positions that predict no label get exactly zero gradient.
    no_label = torch.ones(batch, seq_len, dtype=torch.bool)
    no_label[:, :-1] = labels[:, 1:] == IGNORE
    assert torch.all(grad[no_label] == 0)


def test_sequence_logps_all_ignored_row_is_zero():
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[IGNORE] * 4, [IGNORE, 1, 2, IGNORE]])
    result = sequence_logps(logits, labels)
    assert result[0] == 0
    expected = torch.log_softmax(logits[1], -1)
    torch.testing.assert_close(result[1], expected[0, 1] + expected[1, 2])


def test_sequence_logps_bf16_logits_give_fp32_of_upcast(monkeypatch):
    batch, seq_len, vocab = 2, 9, 53
    monkeypatch.setattr(logps_module, "CHUNK_ELEMENTS", 4 * vocab)
    logits = (torch.randn(batch, seq_len, vocab) * 4).to(torch.bfloat16).requires_grad_()
    labels = random_labels(batch, seq_len, vocab, seed=3)
    upcast = logits.detach().float().requires_grad_()

    result = sequence_logps(logits, labels)
    expected = sequence_logps(upcast, labels)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, expected, atol=0, rtol=0)
    torch.testing.assert_close(
        result.double(), naive_sequence_logps(upcast.detach(), labels), atol=1e-5, rtol=1e-6
    )

    result.sum().backward()
    expected.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logits.grad, upcast.grad.to(torch.bfloat16), atol=0, rtol=0)


def test_sequence_logps_rejects_misaligned_labels():
    with pytest.raises(ValueError, match=r"logits must be \[B, T, V\]"):
        sequence_logps(torch.randn(2, 5, 7), torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logps_never_hold_a_full_fp32_vocab_tensor(monkeypatch, dtype):
    """Peak memory of forward + backward: the [N, V] gradient autograd needs, plus one chunk."""
    batch, seq_len, vocab = 4, 64, 1024
    rows_per_chunk = 16
    monkeypatch.setattr(logps_module, "CHUNK_ELEMENTS", rows_per_chunk * vocab)
    labels = random_labels(batch, seq_len, vocab, seed=5)
    logits = torch.randn(batch, seq_len, vocab).to(dtype).requires_grad_()
    fn = sequence_logps

    gradient_bytes = logits.numel() * logits.element_size()
    full_fp32_bytes = logits.numel() * 4
    chunk_fp32_bytes = rows_per_chunk * vocab * 4
    budget = gradient_bytes + 4 * chunk_fp32_bytes + 64 * 1024
    assert budget < gradient_bytes + full_fp32_bytes / 2  # the budget leaves no room for a copy

    def step(fn):
        logits.grad = None
        return peak_bytes_of(lambda: fn(logits, labels).sum().backward())

    assert step(fn) <= budget

    def naive(x, y):  # what the budget must catch: an fp32 log-softmax over the vocabulary
        return torch.log_softmax(x.float(), dim=-1)[..., 0].sum()

    assert step(naive) > gradient_bytes + full_fp32_bytes / 2

    # The reference pass (no grad) allocates no more than a few chunks.
    with torch.no_grad():
        assert peak_bytes_of(lambda: fn(logits, labels)) <= budget - gradient_bytes


# ---------------------------------------------------------------- concatenated_forward


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_concatenated_forward_matches_per_sequence_loop(lora_and_base, padding_side):
    model, _ = lora_and_base
    pairs = random_pairs(model.config.vocab_size, PAIR_LENGTHS)
    batch = pair_batch(pairs, padding_side, extra_padding=2)
    weights = pair_weights(len(pairs))

    chosen, rejected, grads = backward_and_grads(model, concatenated_forward, batch, weights)
    model.zero_grad()
    ref_chosen, ref_rejected = naive_pair_logps(model, pairs)
    (ref_chosen.float() @ weights[0] + ref_rejected.float() @ weights[1]).backward()

    assert chosen.dtype == rejected.dtype == torch.float32
    torch.testing.assert_close(chosen.double(), ref_chosen.detach(), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(rejected.double(), ref_rejected.detach(), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(grads, lora_grads(model), atol=1e-5, rtol=1e-4)


def test_concatenated_forward_independent_of_batch_neighbours(lora_and_base):
    model, _ = lora_and_base
    vocab = model.config.vocab_size
    moved = random_pairs(vocab, [(4, 5, 2)], seed=11)
    short_neighbours = random_pairs(vocab, [(2, 1, 1)], seed=12)
    long_neighbours = random_pairs(vocab, [(12, 9, 3), (1, 2, 15)], seed=13)
    with torch.no_grad():
        in_first = concatenated_forward(model, pair_batch(short_neighbours + moved, "left"))
        in_second = concatenated_forward(model, pair_batch(moved + long_neighbours, "right"))
    torch.testing.assert_close(in_first[0][1], in_second[0][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(in_first[1][1], in_second[1][0], atol=1e-5, rtol=0)


def test_concatenated_forward_never_builds_token_by_vocab_logits(lora_and_base, monkeypatch):
    """The model's own head projects no position. The label positions are projected
    by head_label_logps: through the frozen head's weight (PEFT model), or by calling the
    trainable head module (plain model) one chunk at a time: no [tokens, vocab] logits."""
    model, base = lora_and_base
    vocab = model.config.vocab_size
    monkeypatch.setattr(logps_module, "CHUNK_ELEMENTS", 10 * vocab)
    batch = pair_batch(random_pairs(vocab, PAIR_LENGTHS), "left")
    rows = 2 * batch["chosen_input_ids"].shape[0]
    num_labels = sum(int((batch[f"{s}_labels"] != IGNORE).sum()) for s in ("chosen", "rejected"))
    chunks = [(10, vocab)] * (num_labels // 10) + [(num_labels % 10, vocab)]
    for called, lm_head, expected in ((model, model.get_base_model().lm_head, []),
                                      (base, base.lm_head, chunks)):
        shapes: list = []
        hook = lm_head.register_forward_hook(
            lambda module, args, out, shapes=shapes: shapes.append(out.shape))
        concatenated_forward(called, batch)[0].sum().backward()
        hook.remove()
        # Forward: no position, then the chunks; backward recomputes the chunks.
        assert shapes[0] == (rows, 0, vocab)
        assert sorted(shapes[1:]) == sorted(expected + expected)


def test_reference_pass_equals_base_model_without_lora(lora_and_base):
    model, base = lora_and_base
    batch = pair_batch(random_pairs(model.config.vocab_size, PAIR_LENGTHS), "right")
    with torch.no_grad():
        with model.disable_adapter():
            reference = concatenated_forward(model, batch)
        base_logps = concatenated_forward(base, batch)
        policy = concatenated_forward(model, batch)
    torch.testing.assert_close(reference, base_logps, atol=1e-6, rtol=0)
    # The LoRA weights are non-zero, so the check above is not vacuous.
    assert (policy[0] - reference[0]).abs().max() > 1e-2


class WithoutLogitsToKeep(torch.nn.Module):
    """A model whose forward has no `logits_to_keep`: full logits come back."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, input_ids, attention_mask, position_ids, use_cache):
        return self.inner(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
        )


@pytest.mark.parametrize("forward", [concatenated_forward, prefix_shared_forward])
def test_wrapped_models_give_the_same_logps(lora_and_base, forward):
    """DataParallel (unwrapped to read the signature, called at the top) and the no-keep path."""
    model, _ = lora_and_base
    batch = pair_batch(random_pairs(model.config.vocab_size, PAIR_LENGTHS), "left")
    with torch.no_grad():
        expected = forward(model, batch)
        for wrapped in (torch.nn.DataParallel(model), WithoutLogitsToKeep(model)):
            torch.testing.assert_close(forward(wrapped, batch), expected, atol=1e-5, rtol=0)


def test_missing_or_mismatched_fields_are_named(tiny_model):
    batch = pair_batch(random_pairs(50, PAIR_LENGTHS), "right")
    del batch["rejected_labels"]
    with pytest.raises(KeyError, match="rejected_labels"):
        concatenated_forward(tiny_model, batch)
    batch = pair_batch(random_pairs(50, PAIR_LENGTHS), "right")
    batch["rejected_attention_mask"] = batch["rejected_attention_mask"][:, :-1]
    with pytest.raises(ValueError, match="rejected_attention_mask"):
        concatenated_forward(tiny_model, batch)
    batch = pair_batch(random_pairs(50, PAIR_LENGTHS), "right")
    del batch["prompt_lengths"]
    with pytest.raises(KeyError, match="prompt_lengths"):
        prefix_shared_forward(tiny_model, batch)


# ---------------------------------------------------------------- prefix sharing


def test_prefix_shared_rows_layout():
    pairs = [([5, 6], [7, 8, 9], [10]), ([11], [12], [13, 14])]
    shared = prefix_shared_batch(pair_batch(pairs, "left", extra_padding=1))
    assert shared.input_ids.tolist() == [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]]
    assert shared.position_ids.tolist() == [[0, 1, 2, 3, 4, 2], [0, 1, 1, 2, 0, 0]]
    assert shared.segment_ids.tolist() == [[0, 0, 1, 1, 1, 2], [0, 1, 2, 2, -1, -1]]
    # Pair 0: chosen 7, 8, 9 from positions 1, 2, 3; rejected 10 from the last prompt token (1).
    # Pair 1: chosen 12 from 0; rejected 13 from 0 and 14 from 2.
    predictions = list(
        zip(
            shared.source_rows.tolist(),
            shared.source_positions.tolist(),
            shared.targets.tolist(),
            shared.sequence_index.tolist(),
            strict=True,
        )
    )
    assert sorted(predictions) == sorted(
        [
            (0, 1, 7, 0),
            (0, 2, 8, 0),
            (0, 3, 9, 0),
            (0, 1, 10, 2),
            (1, 0, 12, 1),
            (1, 0, 13, 3),
            (1, 2, 14, 3),
        ]
    )
    layout = shared.layout()
    rows, columns = torch.arange(6)[:, None], torch.arange(6)[None, :]
    visible = layout.visible(torch.tensor(0), None, rows, columns).int().tolist()
    assert visible == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 0, 0, 0, 1],  # rejected: the prompt and itself, never the chosen tokens
    ]
    # Padding sees only padding; and a model's sliding window of 2 counts in positions: the
    # rejected token (position 2) still sees the last prompt token (position 1), not the first.
    padded = layout.visible(torch.tensor(1), None, rows, columns).int().tolist()
    assert padded[4] == [0, 0, 0, 0, 1, 0] and padded[5] == [0, 0, 0, 0, 1, 1]
    window = layout.mask_function(sliding_window_causal_mask_function(2))
    assert window(torch.tensor(0), None, rows, columns)[5].int().tolist() == [0, 1, 0, 0, 0, 1]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_prefix_shared_forward_equals_concatenated(tiny_model, attn_implementation, padding_side):
    """The layout's masks reach transformers' Llama for eager and sdpa (and PEFT)."""
    tiny_model.set_attn_implementation(attn_implementation)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(tiny_model, config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)
    # An empty prompt too: its first response token is predicted by nothing, on both paths.
    pairs = random_pairs(model.config.vocab_size, [*PAIR_LENGTHS, (0, 3, 4)], seed=3)
    batch = pair_batch(pairs, padding_side, extra_padding=1)
    weights = pair_weights(len(pairs))

    *shared, shared_grads = backward_and_grads(model, prefix_shared_forward, batch, weights)
    *standard, standard_grads = backward_and_grads(model, concatenated_forward, batch, weights)
    torch.testing.assert_close(shared, standard, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared_grads, standard_grads, atol=1e-5, rtol=1e-4)


def test_prefix_shared_forward_with_gradient_checkpointing(lora_and_base):
    model, _ = lora_and_base
    batch = pair_batch(random_pairs(model.config.vocab_size, PAIR_LENGTHS, seed=4), "left")
    weights = pair_weights(len(PAIR_LENGTHS))
    *plain, plain_grads = backward_and_grads(model, prefix_shared_forward, batch, weights)
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.22's name
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # checkpointing is active in training mode only (all dropout rates are 0)
    *checkpointed, checkpointed_grads = backward_and_grads(
        model, prefix_shared_forward, batch, weights
    )
    torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(checkpointed_grads, plain_grads, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_bf16_model_gives_fp32_logps(tiny_model, attn_implementation):
    tiny_model.set_attn_implementation(attn_implementation)
    model = tiny_model.to(torch.bfloat16).eval()
    pairs = random_pairs(model.config.vocab_size, PAIR_LENGTHS, seed=5)
    batch = pair_batch(pairs, "left")
    with torch.no_grad():
        standard = concatenated_forward(model, batch)
        shared = prefix_shared_forward(model, batch)
        reference = naive_pair_logps(model, pairs)
    for logps in (*standard, *shared):
        assert logps.dtype == torch.float32
    # bf16 activations: agreement to bf16 precision of sums of up to 8 token log-probs.
    torch.testing.assert_close(shared, standard, atol=0.1, rtol=0.01)
    torch.testing.assert_close(standard, tuple(r.float() for r in reference), atol=0.1, rtol=0.01)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_absolute_position_model_gets_the_right_positions(padding_side):
    """GPT-2 adds absolute position embeddings, so a wrong position id changes its numbers.

    (RoPE only sees relative offsets: on Llama a left-padding shift would go unnoticed.)
    """
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config).eval()
    pairs = random_pairs(config.vocab_size, PAIR_LENGTHS, seed=6)
    batch = pair_batch(pairs, padding_side, extra_padding=2)
    with torch.no_grad():
        reference = tuple(logps.float() for logps in naive_pair_logps(model, pairs))
        torch.testing.assert_close(concatenated_forward(model, batch), reference, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            prefix_shared_forward(model, batch), reference, atol=1e-5, rtol=0
        )


def test_prefix_sharing_refuses_flash_attention(tiny_model):
    tiny_model.config._attn_implementation = "flash_attention_2"
    batch = pair_batch(random_pairs(50, PAIR_LENGTHS), "right")
    with pytest.raises(ValueError, match="flash_attention_2.*sdpa"):
        prefix_shared_forward(tiny_model, batch)


def test_prefix_sharing_refuses_pairs_with_different_prompts(tiny_model):
    pairs = random_pairs(50, PAIR_LENGTHS)
    batch = pair_batch(pairs, "right")
    batch["rejected_input_ids"][2, 1] += 1  # inside pair 2's prompt (9 tokens)
    with pytest.raises(ValueError, match="pair 2 .*identical prompt"):
        prefix_shared_forward(tiny_model, batch)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_collated_batches_match_per_sequence_loop(tiny_tokenizer, lora_and_base, padding_side):
    """End to end from text: tokenize_pair + PreferenceCollator batches into both forwards."""
    model, _ = lora_and_base
    texts = [
        ("what is a cat", "a happy cat runs", "no"),
        (
            [{"role": "system", "content": "be good"}, {"role": "user", "content": "hello world"}],
            "hello you are here",
            "the lazy dog jumps over the quick brown fox please",
        ),
        ("why", "one two three", "yes sure thanks"),
    ]
    pairs = [
        tokenize_pair(
            tiny_tokenizer,
            PreferencePair(prompt, chosen, rejected),
            max_length=64,
            max_prompt_length=32,
            use_chat_template=True,
        )
        for prompt, chosen, rejected in texts
    ]
    collate = PreferenceCollator(tiny_tokenizer.eos_token_id, padding_side=padding_side)
    batch = collate(pairs)
    with torch.no_grad():
        reference = naive_pair_logps(
            model, [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs]
        )
        reference = tuple(logps.float() for logps in reference)
        torch.testing.assert_close(concatenated_forward(model, batch), reference, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            prefix_shared_forward(model, batch), reference, atol=1e-5, rtol=0
        )
