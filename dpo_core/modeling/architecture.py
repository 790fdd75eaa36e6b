"""What a run takes from the loaded model's architecture: the longest sequence it can place,
the attention it runs and why, and its router's auxiliary loss (mixture-of-experts models).

Each function reads the transformers model (any wrapper: `loading.base_model_of`) and returns
a value and, where the run does something the user may not expect, a sentence for the run plan.
"""

from __future__ import annotations

import inspect

import torch

from dpo_core.modeling.loading import base_model_of


def context_length(model: torch.nn.Module) -> int | None:
    """Positions the model has (`max_position_embeddings`, GPT-2's `n_positions`): the size of
    a learned position table (a longer sequence would index past it), the trained context of a
    rotary model; None when the config does not say."""
    limit = getattr(base_model_of(model).config, "max_position_embeddings", None)
    return int(limit) if limit else None


def fit_lengths(model: torch.nn.Module, max_length: int,
                max_prompt_length: int) -> tuple[int, int, str | None]:
    """(--max_length, --max_prompt_length, note): clamped to the model's `context_length`,
    the prompt keeping below it the share of the length it was asked to."""
    limit = context_length(model)
    if limit is None or max_length <= limit:
        return max_length, max_prompt_length, None
    prompt = max(1, min(max_prompt_length, max_prompt_length * limit // max_length))
    return limit, prompt, (
        f"--max_length {max_length} is longer than the {limit} positions of this model "
        f"(max_position_embeddings): sequences are cut to {limit} tokens, prompts kept to at "
        f"least {prompt} (--max_prompt_length {max_prompt_length})")


def attention_note(model: torch.nn.Module, asked: str) -> str | None:
    """Why the model runs eager attention when 'auto' was asked (its class has no SDPA)."""
    base = base_model_of(model)
    if asked == "auto" and base.config._attn_implementation == "eager":
        return (f"attention: eager, as {type(base).__name__} cannot run SDPA (its attention "
                "is soft-capped, or its code has no SDPA path)")
    return None


def router_shape(config) -> tuple[int, int] | None:
    """(number of experts, experts per token) of a mixture-of-experts model config, or None
    for a dense model."""
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    return (int(experts), int(top_k)) if experts and top_k else None


def router_aux_loss_coef(model: torch.nn.Module,
                         asked: float | None) -> tuple[float | None, str | None]:
    """(weight of the router's load-balancing loss, note): `asked`, or unset the model
    config's `router_aux_loss_coef`, for a mixture of experts whose forward returns router
    logits; None (no router) for any other model."""
    base = base_model_of(model)
    routes = router_shape(base.config) is not None and (
        "output_router_logits" in inspect.signature(base.forward).parameters)
    if not routes:
        note = (f"--router_aux_loss_coef {asked} ignored: this model has no router"
                if asked else None)
        return None, note
    coef = float(getattr(base.config, "router_aux_loss_coef", 0.0) if asked is None else asked)
    return coef, (f"the router's load-balancing loss is added with weight {coef:g} "
                  "(loss/aux)" if coef else "no router load-balancing loss (weight 0)")
