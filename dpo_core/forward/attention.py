"""The attention a model runs, and the packed SDPA attention that keeps packed sequences apart.

A packed row (`dpo_core.forward.packing`) concatenates *blocks*: `(start, shared, first,
second)`, where the `shared + first` tokens from `start` are one causal sequence and the
`second` tokens after them attend to the block's first `shared` tokens and to themselves.
`packed_sdpa_attention`, registered with transformers' `AttentionInterface` as
PACKED_ATTENTION, runs SDPA block by block on such a row (cost linear in the number of blocks,
no [T, T] mask), with the masks its mask builder made from the model's own mask functions
(`masks.BlockMasks`: a sliding window applies inside each block as in the sequence alone).
Given any other mask it is transformers' own SDPA, so a model switched to it still generates
and evaluates as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo_core.forward.masks import BlockMasks, LayoutNotHonoured, active_layout, packed_mask_builder
from dpo_core.modeling.loading import base_model_of

# Name under which `packed_sdpa_attention` is registered with transformers.
PACKED_ATTENTION = "dpo_packed_sdpa"
# Attention implementations whose masks follow a `masks.RowLayout`.
LAYOUT_ATTENTION = ("eager", "sdpa", PACKED_ATTENTION)


def attn_implementation(model: torch.nn.Module) -> str | None:
    """The attention implementation `model` (any wrapper of a transformers model) runs."""
    return getattr(getattr(base_model_of(model), "config", None), "_attn_implementation", None)


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | BlockMasks | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers attention function: query [B, H, T, D], key/value [B, KV, T, D] ->
    ([B, T, H, D], None). Given `BlockMasks` (a packed row, B = 1) SDPA runs per block;
    given a tensor or None, this is transformers' own SDPA attention."""
    if not isinstance(attention_mask, BlockMasks):
        if active_layout() is not None and active_layout().blocks is not None:
            raise LayoutNotHonoured(
                "a packed row reached the attention without its block masks: this model "
                "passes its masks in a way the packed attention does not know; turn "
                "--padding_free off")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise LayoutNotHonoured(
            "the per-block packed attention has no attention soft-capping or attention sinks; "
            "load the model with --attn_implementation eager")
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # grouped-query attention: key/value head i serves query heads i*g .. i*g+g-1
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    # One split per tensor into block-sized pieces, not a slice per block: the backward of a
    # split is one concatenation, where each slice's backward would fill a zero tensor of the
    # whole row.
    blocks = attention_mask.blocks
    sizes = [size for _, shared, first, second in blocks
             for size in (shared + first, second) if size]
    pieces = [tensor.split(sizes, dim=2) for tensor in (query, key, value)]
    outputs = []
    index = 0
    for (_, shared, first, second), first_mask, second_mask in zip(
            blocks, attention_mask.first, attention_mask.second, strict=True):
        if shared + first:
            outputs.append(F.scaled_dot_product_attention(
                pieces[0][index], pieces[1][index], pieces[2][index], attn_mask=first_mask,
                dropout_p=dropout, is_causal=first_mask is None, scale=scaling))
            index += 1
        if second:
            prompt_keys, prompt_values = (p[index - 1][:, :, :shared] for p in pieces[1:])
            keys = torch.cat([prompt_keys, pieces[1][index]], 2)
            values = torch.cat([prompt_values, pieces[2][index]], 2)
            outputs.append(F.scaled_dot_product_attention(
                pieces[0][index], keys, values, attn_mask=second_mask, dropout_p=dropout,
                scale=scaling))
            index += 1
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def register_packed_attention() -> None:
    """Make PACKED_ATTENTION a transformers attention implementation (idempotent), with the
    mask builder that gives it `BlockMasks` for packed rows (SDPA's masks otherwise)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, packed_mask_builder())


def use_packed_attention(model: torch.nn.Module) -> bool:
    """Switch a model using SDPA to PACKED_ATTENTION (the same numbers; per-block SDPA for
    packed rows). `model` is the transformers model (PEFT/DDP unwrapped). Returns whether the
    model now uses it."""
    config = model.config
    if config._attn_implementation == PACKED_ATTENTION:
        return True
    if config._attn_implementation != "sdpa":
        return False
    register_packed_attention()
    model.set_attn_implementation(PACKED_ATTENTION)
    return model.config._attn_implementation == PACKED_ATTENTION
