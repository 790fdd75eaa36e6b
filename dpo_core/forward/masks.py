"""Attention masks of the rows this project lays out, built from the model's own mask functions.

A prefix-shared row (`prefix_sharing.py`) or a packed row (`packing.py`) holds several
sequences, and every token must see exactly what it sees in its own sequence alone. What that
is, layer by layer, is the model's business: causal, a sliding window (Mistral, Gemma 2 and 3,
Phi-3, Qwen2 and SmolLM3 with `use_sliding_window`, ...), chunks (Llama 4), and whatever comes
next. transformers builds each layer type's mask from a *mask function* (`masking_utils`),
handing it to the mask builder registered for the attention implementation. While
`RowLayout.active()` is on, those builders read the model's mask function in each token's
position within its own sequence and intersect it with the layout's visibility (which tokens of
the row belong to the query's sequence): a window or a chunk then applies per sequence exactly
as when the sequence is alone, on every layer type, for eager, SDPA, FlexAttention and the
per-block packed attention (`attention.py`), and the model's own attention function runs
(Gemma 2's soft-capping included). Outside `active()` the builders are transformers' own.

A layout tags each token with a *group* (the sequences that may see each other's tokens) and a
*part*: SHARED tokens are seen by every part of their group, other parts only by themselves.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dpo_core.errors import ConfigError

# Token parts (the prefix-shared segments reuse these numbers: prompt, chosen, rejected).
SHARED, FIRST, SECOND = 0, 1, 2

# (batch, head, query index, key index) -> whether the query attends to the key, as
# transformers' mask functions; the arguments are broadcastable index tensors.
MaskFunction = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

Block = tuple[int, int, int, int]  # (start, shared, first, second) of a packed row

_ACTIVE: ContextVar[RowLayout | None] = ContextVar("dpo_row_layout", default=None)


class LayoutNotHonoured(ConfigError):
    """The model built its attention masks without transformers' mask builders (or took the
    mask another way), so a shared or packed row would not keep its sequences apart; the
    message says which setting to change."""


@dataclass
class RowLayout:
    """Which tokens of rows [R, L] see each other, and each token's position in its sequence.

    group_ids, part_ids, position_ids: [R, L]. Query q sees key k of its row when k <= q (row
    order), both have one group, and k is SHARED or of q's part; then the model's own mask
    function decides, in position ids. `blocks`: a packed row's blocks (R = 1), for the
    per-block attention.
    """

    group_ids: Tensor
    part_ids: Tensor
    position_ids: Tensor
    blocks: list[Block] | None = None
    masks_built: int = field(default=0, init=False)

    def visible(self, batch: Tensor, head: Tensor, query: Tensor, key: Tensor) -> Tensor:
        """The layout's own rule, as a mask function over row indices."""
        group, part = self.group_ids, self.part_ids
        return ((key <= query) & (group[batch, query] == group[batch, key])
                & ((part[batch, key] == SHARED) | (part[batch, key] == part[batch, query])))

    def token_weights(self) -> Tensor:
        """[R, L]: how many sequences each token is part of (a SHARED token: the two of its
        group; padding, a negative group: none)."""
        return torch.where(self.group_ids < 0, 0, torch.where(self.part_ids == SHARED, 2, 1))

    def mask_function(self, model_function: MaskFunction) -> MaskFunction:
        """`model_function` (in sequence positions) within the layout's visibility."""
        positions = self.position_ids

        def combined(batch: Tensor, head: Tensor, query: Tensor, key: Tensor) -> Tensor:
            own = model_function(batch, head, positions[batch, query], positions[batch, key])
            return own & self.visible(batch, head, query, key)

        return combined

    @contextlib.contextmanager
    def active(self) -> Iterator[RowLayout]:
        """Masks built inside the block follow this layout. Raises LayoutNotHonoured when a
        forward inside built none (the model makes its masks some other way)."""
        install_layout_mask_builders()
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)
        if not self.masks_built:
            raise LayoutNotHonoured(
                "this model builds its attention masks without transformers' mask builders "
                "(transformers.masking_utils), so shared or packed rows cannot be kept apart "
                "in it: turn --prefix_sharing and --padding_free off")


def active_layout() -> RowLayout | None:
    return _ACTIVE.get()


def _layout_aware(builder: Callable, per_block: Callable | None = None) -> Callable:
    """`builder` (a transformers mask builder) following the active `RowLayout`, if any, and
    exactly `builder` otherwise. `per_block(layout, mask_function, use_vmap)`: what to return
    for a packed row instead of one [T, T] mask (the per-block attention's masks)."""

    @functools.wraps(builder)
    def build(*args, **kwargs):
        layout = _ACTIVE.get()
        if layout is None:
            return builder(*args, **kwargs)
        return _layout_mask(layout, builder, per_block, *args, **kwargs)

    build.follows_row_layout = True
    return build


def _layout_mask(layout: RowLayout, builder: Callable, per_block: Callable | None, *,
                 mask_function: MaskFunction, q_length: int, kv_length: int,
                 q_offset: int = 0, kv_offset: int = 0, attention_mask=None, **kwargs):
    """The mask `builder` makes from the model's `mask_function` within `layout` (transformers
    calls its builders with keywords only)."""
    width = layout.position_ids.shape[1]
    if (q_offset, kv_offset, q_length, kv_length) != (0, 0, width, width):
        raise LayoutNotHonoured(
            f"a shared or packed row of {width} tokens was given to a forward that masks "
            f"{q_length} queries against {kv_length} keys (a cache?); run it with "
            "use_cache=False")
    layout.masks_built += 1
    combined = layout.mask_function(mask_function)
    if per_block is not None and layout.blocks is not None:
        return per_block(layout, combined, kwargs.get("use_vmap", False))
    # The layout covers padding (padding tokens are their own group), and no mask is ever a
    # plain causal one here.
    kwargs["allow_is_causal_skip"] = False
    return builder(mask_function=combined, q_length=q_length, kv_length=kv_length,
                   attention_mask=None, **kwargs)


@functools.cache
def install_layout_mask_builders() -> None:
    """Wrap transformers' mask builders (eager, SDPA, FlexAttention) so that they follow the
    active `RowLayout`: unchanged outside `RowLayout.active()`. Once per process."""
    from transformers.masking_utils import AttentionMaskInterface

    mapping = AttentionMaskInterface._global_mapping
    for name in ("eager", "sdpa", "flex_attention"):
        if not getattr(mapping[name], "follows_row_layout", False):
            AttentionMaskInterface.register(name, _layout_aware(mapping[name]))


def masks_follow_layouts(model: torch.nn.Module) -> bool:
    """Whether `model` (any wrapper) builds its attention masks with transformers' mask
    builders, as every model in transformers 5 does; code shipped with a model
    (trust_remote_code) may not, and a `RowLayout` would not reach its masks."""
    from transformers import masking_utils

    from dpo_core.modeling.loading import base_model_of

    builders = {id(builder) for builder in (masking_utils.create_causal_mask,
                                             masking_utils.create_sliding_window_causal_mask,
                                             masking_utils.create_chunked_causal_mask)}
    base = base_model_of(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base
    modules = {sys.modules.get(type(part).__module__) for part in (base, decoder)}
    return any(id(value) in builders for module in modules if module is not None
               for value in vars(module).values())


@dataclass(frozen=True)
class BlockMasks:
    """A packed row's attention masks for one layer type, block by block (no [T, T] mask).

    first[i]: [n, n] bool for block i's `shared + first` tokens, or None where it is plain
    causal (SDPA's is_causal then); second[i]: [second, shared + second] bool for its second
    part (queries) against its shared and second tokens (keys), or None without a second part.
    """

    blocks: list[Block]
    first: list[Tensor | None]
    second: list[Tensor | None]


def block_masks(layout: RowLayout, combined: MaskFunction, use_vmap: bool) -> BlockMasks:
    """`combined` evaluated on each block of the packed row `layout`, by SDPA's mask builder."""
    from transformers.masking_utils import sdpa_mask

    device = layout.position_ids.device

    def evaluate(q_start: int, q_length: int, kv_start: int, kv_length: int) -> Tensor:
        return sdpa_mask(batch_size=1, q_length=q_length, kv_length=kv_length, q_offset=q_start,
                         kv_offset=kv_start, mask_function=combined, allow_is_causal_skip=False,
                         use_vmap=use_vmap, device=device)[0, 0]

    first, second = [], []
    for start, shared, first_size, second_size in layout.blocks:
        size = shared + first_size
        mask = evaluate(start, size, start, size) if size else None
        causal = mask is not None and torch.equal(
            mask, torch.ones(size, size, dtype=torch.bool, device=device).tril_())
        first.append(None if causal else mask)
        if second_size:
            # Keys: the whole block, then only its shared and second tokens.
            mask = evaluate(start + size, second_size, start, size + second_size)
            second.append(torch.cat([mask[:, :shared], mask[:, size:]], dim=1))
        else:
            second.append(None)
    return BlockMasks(layout.blocks, first, second)


def packed_mask_builder() -> Callable:
    """The mask builder of the per-block packed attention: `BlockMasks` for a packed row,
    SDPA's own mask otherwise (padded rows, generation)."""
    from transformers.masking_utils import sdpa_mask

    return _layout_aware(sdpa_mask, per_block=block_masks)
