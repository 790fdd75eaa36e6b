"""`Forward`: the one choice of how a run's micro-batches go through the model.

Chosen once per run by `choose_forward`, from the model's attention and the `--padding_free`
and `--prefix_sharing` settings, then asked by everything that depends on it: the log-prob
function (`token_logps`), the collator that lays batches out on the CPU (`collator`), the
length a pair costs (`pair_lengths`, for length grouping and the reference pass) and the run plan
(`record`). `prepare(model)` makes the one change a path needs in the model: padding-free rows
under SDPA switch it to the per-block packed SDPA attention (the same numbers for any other
input). Every path gives the same log-probs; tests/forward checks each against the others.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dpo_core.console import logger
from dpo_core.data.batches import PreferenceCollator, pair_lengths
from dpo_core.data.tokenization import TokenizedPair
from dpo_core.forward.attention import (
    LAYOUT_ATTENTION,
    PACKED_ATTENTION,
    attn_implementation,
    use_packed_attention,
)
from dpo_core.forward.logps import TokenLogpsFn, concatenated_token_logps
from dpo_core.forward.masks import masks_follow_layouts
from dpo_core.forward.packing import (
    PaddingFreeCollator,
    padding_free_prefix_shared_token_logps,
    padding_free_token_logps,
)
from dpo_core.forward.prefix_sharing import prefix_shared_token_logps, prefix_sharing_when_it_pays
from dpo_core.modeling.loading import base_model_of


class PrefixSharing(str, enum.Enum):
    """Whether chosen and rejected share one pass over their prompt."""

    OFF = "off"  # two rows per pair (or two packed sequences)
    PER_BATCH = "per batch"  # padded rows: shared where it saves enough tokens
    ALWAYS = "always"


def resolve_padding_free(requested: bool | None, attention: str | None, on_cuda: bool) -> bool:
    """--padding_free on: wherever some attention can keep packed sequences apart (a dense mask
    with eager); unset: where that attention is fast (SDPA per block, FlexAttention on CUDA)."""
    fast = attention in ("sdpa", PACKED_ATTENTION) or (
        attention == "flex_attention" and on_cuda)
    if requested is None:
        return fast
    return bool(requested) and (fast or attention == "eager")


def resolve_prefix_sharing(setting: bool | None, attention: str | None,
                           padding_free: bool = False) -> PrefixSharing:
    """--prefix_sharing on: ALWAYS; unset: PER_BATCH (when it pays); off, or when the model's
    attention cannot take a 4D mask: OFF (the standard two-row forward). Padding-free rows
    share the prompt unless it is off: packed, sharing always saves tokens and widens nothing,
    and the packed attention keeps the parts apart."""
    if padding_free:
        return PrefixSharing.OFF if setting is False else PrefixSharing.ALWAYS
    if setting is False or attention not in LAYOUT_ATTENTION:
        return PrefixSharing.OFF
    return PrefixSharing.ALWAYS if setting else PrefixSharing.PER_BATCH


# The log-prob function of each (padding-free, prefix sharing) choice; all give the same numbers.
_LOGPS: dict[tuple[bool, PrefixSharing], TokenLogpsFn] = {
    (False, PrefixSharing.OFF): concatenated_token_logps,
    (False, PrefixSharing.PER_BATCH): prefix_sharing_when_it_pays,
    (False, PrefixSharing.ALWAYS): prefix_shared_token_logps,
    (True, PrefixSharing.OFF): padding_free_token_logps,
    (True, PrefixSharing.ALWAYS): padding_free_prefix_shared_token_logps,
}


def token_logps_fn_for(prefix_sharing: PrefixSharing | str, padding_free: bool) -> TokenLogpsFn:
    """The log-prob function for a prefix-sharing mode and padding-free setting."""
    return _LOGPS[(padding_free, PrefixSharing(prefix_sharing))]


@dataclass(frozen=True)
class Forward:
    """How every micro-batch of a run goes through the model (module docstring).

    `attention` is the attention implementation the model runs once `prepare`d (None: not
    known, e.g. a model outside transformers' registry).
    """

    padding_free: bool = False
    prefix_sharing: PrefixSharing = PrefixSharing.OFF
    attention: str | None = None
    # Why a path the settings asked for (or would take by default) is not taken, for the plan.
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        token_logps_fn_for(self.prefix_sharing, self.padding_free)  # KeyError: no such path

    @property
    def token_logps(self) -> TokenLogpsFn:
        """(model, batch, *, log_sum_sq_probs=False) -> the response tokens' `TokenLogps`."""
        return token_logps_fn_for(self.prefix_sharing, self.padding_free)

    def collator(self, pad_token_id: int,
                 pad_to_multiple_of: int | None = None) -> Callable[[list[TokenizedPair]], dict]:
        """Pairs -> a batch for `token_logps`: padded rows, plus (padding-free) the packed
        layout, built on the CPU in the DataLoader so the forward needs no host sync. With
        `pad_to_multiple_of` the padded rows and the packed row are both grown to a multiple of
        it (prefix-shared rows, built in the forward, keep their own width)."""
        collator = PreferenceCollator(pad_token_id, pad_to_multiple_of=pad_to_multiple_of)
        if not self.padding_free:
            return collator
        return PaddingFreeCollator(collator,
                                   prefix_shared=self.prefix_sharing is PrefixSharing.ALWAYS)

    def pair_lengths(self, pairs: Sequence[TokenizedPair]) -> list[int]:
        """Tokens each pair costs this forward, padding aside."""
        return pair_lengths(pairs, self.prefix_sharing is PrefixSharing.ALWAYS)

    def prepare(self, model: torch.nn.Module) -> None:
        """Switch `model` to the attention this forward runs (idempotent)."""
        if self.attention == PACKED_ATTENTION:
            use_packed_attention(base_model_of(model))

    def record(self) -> dict:
        """The run plan's entries for this choice (also part of what a reference log-prob
        cache is keyed by)."""
        return {"attn_implementation": self.attention, "padding_free": self.padding_free,
                "prefix_sharing": self.prefix_sharing.value}


def choose_forward(model: torch.nn.Module, padding_free: bool | None = None,
                   prefix_sharing: bool | None = None) -> Forward:
    """The `Forward` for `model` and the settings (None: decide). A path the model's attention
    cannot run exactly is dropped, and why goes in `notes` (one asked for is also warned
    about). Changes nothing: call `prepare`."""
    attention = attn_implementation(model)
    if not masks_follow_layouts(model):
        return Forward(attention=attention, notes=(
            f"prefix sharing and padding-free rows off: {type(base_model_of(model)).__name__} "
            "builds its attention masks by itself, not with transformers' mask builders, so "
            "sequences sharing a row could not be kept apart",))
    notes = []
    on_cuda = any(p.device.type == "cuda" for p in base_model_of(model).parameters())
    packed = resolve_padding_free(padding_free, attention, on_cuda)
    if padding_free and not packed:
        logger.warning(f"--padding_free needs attn_implementation sdpa or eager (or "
                       f"flex_attention on CUDA), and this model uses {attention!r}: "
                       "padding as before.")
    if padding_free is None and attention == "eager":
        notes.append("padding-free rows off: with eager attention they need a dense [T, T] "
                     "mask per layer type (--padding_free takes it)")
    mode = resolve_prefix_sharing(prefix_sharing, attention, packed)
    if prefix_sharing and mode is PrefixSharing.OFF:
        logger.warning(f"--prefix_sharing needs attn_implementation sdpa or eager, and this "
                       f"model uses {attention!r}: using the standard two-row forward "
                       "instead.")
    if not packed and attention not in LAYOUT_ATTENTION:
        notes.append("prefix sharing and padding-free rows off: " + (
            "FlexAttention has no backward on the CPU" if attention == "flex_attention"
            else f"{attention} attention takes no 4D mask"))
    if packed and attention == "sdpa":
        attention = PACKED_ATTENTION
    return Forward(packed, mode, attention, tuple(notes))
