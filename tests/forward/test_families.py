"""Every model family users fine-tune, on every forward path the run plan can choose: the
path's log-probs equal the model's own (each sequence alone, a float64 log_softmax of its
logits) within 1e-5, adapter on and off, and so do the LoRA gradients; the precomputed
reference pass gives the same values; a mixture of experts' router loss is the model's own.

Tiny random models of each family (`dpo_core.testing.MODEL_FAMILIES`: windows of 4 tokens,
shorter than every sequence here; soft-capping; partial rotary; fused projections; learned
positions; experts), built once per session.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from accelerate import Accelerator
from test_logps import (
    naive_pair_logps,
    pair_batch,
    pair_weights,
    random_pairs,
    with_nonzero_lora,
)
from transformers import LlamaForCausalLM, LlamaModel
from transformers.models.llama import modeling_llama

from dpo_core.data.tokenization import TokenizedPair
from dpo_core.forward.logps import concatenated_token_logps
from dpo_core.forward.masks import LayoutNotHonoured
from dpo_core.forward.prefix_sharing import prefix_shared_forward
from dpo_core.forward.router import router_logits_recorded
from dpo_core.forward.strategy import PrefixSharing, choose_forward
from dpo_core.modeling.adapters import add_lora
from dpo_core.modeling.architecture import router_shape
from dpo_core.testing import MODEL_FAMILIES, TINY_WINDOW, tiny_family, tiny_llama
from dpo_core.training.objective import PreferenceObjective
from dpo_core.training.reference_logps import compute_reference_logps

VOCAB = 96
# (prompt, chosen, rejected) lengths: sequences of 10 to 24 tokens, all longer than the
# windows; rejected replies that start past the window of their prompt's first tokens.
LENGTHS = [(9, 6, 3), (2, 11, 7), (14, 3, 10)]
assert all(p + min(c, r) > TINY_WINDOW for p, c, r in LENGTHS)

# Each path the run plan can choose: (--padding_free, --prefix_sharing) as asked, and what
# `choose_forward` must then pick (padded prefix sharing "always" forces it on every batch).
PATHS = {
    "padded": ((False, False), (False, PrefixSharing.OFF)),
    "prefix-shared": ((False, True), (False, PrefixSharing.ALWAYS)),
    "padding-free": ((True, False), (True, PrefixSharing.OFF)),
    "padding-free+prefix-shared": ((True, None), (True, PrefixSharing.ALWAYS)),
}


def pairs() -> list[TokenizedPair]:
    return [TokenizedPair(*ids) for ids in random_pairs(VOCAB, LENGTHS)]


@functools.cache
def family_policy(family: str, targets: str = "auto"):
    """The family's tiny model under LoRA with the run's default targets ('auto') and
    non-zero B weights (so adapter on and off differ), in eval mode."""
    return with_nonzero_lora(add_lora(tiny_family(family, VOCAB), r=4, alpha=8, dropout=0.0,
                                      target_modules=targets, gradient_checkpointing=False,
                                      quantized=False))


@functools.cache
def own_logps(family: str, targets: str = "auto"):
    """The model's own log-probs of every pair, adapter on (with LoRA gradients for the
    pair weights) and off: ((chosen, rejected), grads, (reference chosen, rejected))."""
    model = family_policy(family, targets)
    pairs = random_pairs(VOCAB, LENGTHS)
    weights = pair_weights(len(pairs))
    model.zero_grad()
    chosen, rejected = naive_pair_logps(model, pairs)
    (chosen.float() @ weights[0] + rejected.float() @ weights[1]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    with torch.no_grad(), model.disable_adapter():
        reference = naive_pair_logps(model, pairs)
    return (chosen.detach(), rejected.detach()), grads, reference


def prepared_forward(family: str, path: str, targets: str = "auto"):
    """(a copy of the family's policy, the `Forward` the plan chooses for `path`, prepared)."""
    model = copy.deepcopy(family_policy(family, targets))
    asked, expected = PATHS[path]
    forward = choose_forward(model, *asked)
    assert (forward.padding_free, forward.prefix_sharing) == expected
    forward.prepare(model)
    return model, forward


# Mixtral with its fused expert weights adapted too (peft's lora.ParamWrapper), on top.
CASES = [(family, "auto") for family in MODEL_FAMILIES] + [("mixtral", "all-linear")]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize(("family", "targets"), CASES,
                         ids=[f"{f}-{t}" if t != "auto" else f for f, t in CASES])
def test_every_path_gives_the_models_own_logps_and_gradients(family, targets, path):
    model, forward = prepared_forward(family, path, targets)
    (want_chosen, want_rejected), want_grads, want_reference = own_logps(family, targets)
    # The batch as the run's collator lays it out (padding-free: with its packed row).
    batch = forward.collator(pad_token_id=0)(pairs())
    weights = pair_weights(len(LENGTHS))

    model.zero_grad()
    chosen, rejected = forward.token_logps(model, batch).sums()
    (chosen @ weights[0] + rejected @ weights[1]).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad(), model.disable_adapter():
        reference = forward.token_logps(model, batch).sums()

    close = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chosen.double(), want_chosen, **close)
    torch.testing.assert_close(rejected.double(), want_rejected, **close)
    torch.testing.assert_close(tuple(r.double() for r in reference), want_reference, **close)
    assert grads.keys() == want_grads.keys()
    torch.testing.assert_close(grads, want_grads, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", list(MODEL_FAMILIES))
def test_precomputed_reference_is_the_models_own(family):
    """The reference pass before training (longest pairs first, in batches the run's
    collator lays out; here the default path, packed and prefix-shared) gives the model's own
    log-probs with the adapter off."""
    model, forward = prepared_forward(family, "padding-free+prefix-shared")
    objective = PreferenceObjective(token_logps_fn=forward.token_logps)
    values = compute_reference_logps(
        model, pairs(), logps=objective.reference_logps,  # the adapter switched off
        collator=forward.collator(pad_token_id=0), accelerator=Accelerator(cpu=True),
        batch_size=2)
    _, _, (want_chosen, want_rejected) = own_logps(family)
    torch.testing.assert_close(values.double(), torch.stack([want_chosen, want_rejected], 1),
                               atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- mixture of experts


def own_aux_loss(model, batch, sides=("chosen", "rejected")) -> torch.Tensor:
    """transformers' own router loss of the padded rows of `sides` (both: as trl reads it)."""
    ids = torch.cat([batch[f"{side}_input_ids"] for side in sides])
    mask = torch.cat([batch[f"{side}_attention_mask"] for side in sides])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions,
                 output_router_logits=True).aux_loss


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_router_loss_is_the_models_own_on_every_path(family):
    """loss/aux on every path equals the model's own aux_loss of the padded rows, which counts
    a prompt once per sequence (sharper routing makes the loss depend on which tokens count:
    the chosen rows alone give another value), and each pair's loss is the DPO loss plus
    coef * aux."""
    routed = copy.deepcopy(family_policy(family))
    with torch.no_grad():
        for name, param in routed.named_parameters():
            if name.endswith("gate.weight"):
                param.mul_(20.0)
    batch = pair_batch(random_pairs(VOCAB, LENGTHS), "left", extra_padding=2)
    with torch.no_grad():
        want = own_aux_loss(routed, batch)
        assert abs(float(want - own_aux_loss(routed, batch, sides=("chosen",)))) > 1e-3
    for path in PATHS:
        model = copy.deepcopy(routed)
        forward = choose_forward(model, *PATHS[path][0])
        forward.prepare(model)
        with router_logits_recorded() as recorded:
            forward.token_logps(model, batch)
        torch.testing.assert_close(recorded.load_balancing_loss(*router_shape(model.config)),
                                   want, atol=1e-6, rtol=1e-6)
    coef = 0.25
    with_router = PreferenceObjective(token_logps_fn=concatenated_token_logps,
                                      router_aux_loss_coef=coef)
    without = PreferenceObjective(token_logps_fn=concatenated_token_logps)
    stats = with_router(routed, batch)
    torch.testing.assert_close(stats["loss/aux"], want.expand(len(LENGTHS)), atol=1e-6, rtol=0)
    torch.testing.assert_close(stats["losses"], without(routed, batch)["losses"] + coef * want,
                               atol=1e-6, rtol=0)


# ---------------------------------------------------------------- models with their own masks


class OwnMasksLlama(LlamaForCausalLM):
    """A model whose code (this module) builds no mask with transformers' builders, as remote
    code may."""


def test_a_model_building_its_own_masks_keeps_the_padded_path(monkeypatch):
    """Shared and packed rows are never laid out for a model whose code makes its masks by
    itself (the plan says why); and if one were, the forward refuses instead of computing
    with masks that ignore the layout."""
    model = tiny_llama(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=2)
    model.__class__ = OwnMasksLlama
    model.model.__class__ = type("OwnMasksDecoder", (LlamaModel,), {})
    forward = choose_forward(model, padding_free=True, prefix_sharing=True)
    assert (forward.padding_free, forward.prefix_sharing) == (False, PrefixSharing.OFF)
    assert "OwnMasksLlama builds its attention masks by itself" in forward.notes[0]
    monkeypatch.setattr(modeling_llama, "create_causal_mask", lambda **kwargs: None)
    batch = pair_batch(random_pairs(VOCAB, LENGTHS), "right")
    with pytest.raises(LayoutNotHonoured, match="without transformers' mask builders"):
        prefix_shared_forward(model, batch)
