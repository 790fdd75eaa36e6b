"""Padding-free layout: every sequence of a micro-batch in one row, and attention that keeps
them apart.

A packed row concatenates *blocks*, one per sequence (standard layout: each chosen and each
rejected sequence) or one per pair (prefix sharing: `[prompt | chosen | rejected]`). A block is
`(start, shared, first, second)`: the `shared + first` tokens from `start` are one causal
sequence; the `second` tokens after them attend to the block's first `shared` tokens and to
themselves, never to the `first` part. A standard sequence is `(start, 0, length, 0)`, a
prefix-shared pair `(start, prompt, chosen response, rejected response)`. Position ids restart
in every sequence, and the row's `masks.RowLayout` makes every attention mask the model builds
(each layer type's: causal, a sliding window, ...) apply per sequence, in its own positions:
each sequence sees exactly what it sees alone.

Attention, per device:
- CPU (and wherever else SDPA runs): `packed_sdpa_attention`, registered with transformers'
  `AttentionInterface` as PACKED_ATTENTION, runs SDPA block by block (plain causal within a
  block where the model's mask is, plus a small `[second, shared + second]` mask for the
  rejected part): cost linear in the number of blocks, no `[T, T]` mask. Given any other mask
  it is plain SDPA, so a model switched to it still generates and evaluates as before.
- CUDA: FlexAttention, when the model was loaded with `attn_implementation="flex_attention"`:
  its `BlockMask` is built by transformers from the layout. FlexAttention has no backward on
  CPU, so this path is refused there.
- Any other model with eager or SDPA attention (eager: Gemma 2's soft-capped attention): one
  dense `[T, T]` mask per layer type, exact but quadratic in the row length.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from dpo_core.data.tokenization import IGNORE_INDEX
from dpo_core.forward.attention import LAYOUT_ATTENTION, attn_implementation
from dpo_core.forward.logps import PAIR_FIELDS, TokenLogps, check_pair_batch, predicted_logps
from dpo_core.forward.masks import FIRST, SECOND, SHARED, Block, RowLayout
from dpo_core.forward.prefix_sharing import PrefixSharedRows, prefix_shared_batch


@dataclass
class PackedRow:
    """One padding-free row and what it predicts.

    input_ids, position_ids: [1, T]; blocks: the row's blocks in order, covering [0, T), the
    last `padding` tokens (`--pad_to_multiple_of`) a block of their own that is no sequence.
    Predictions: the hidden state at row position `source_positions[i]` predicts `targets[i]`,
    a label of sequence `sequence_index[i]` (of `num_sequences`).
    """

    input_ids: Tensor
    position_ids: Tensor
    blocks: list[Block]
    source_positions: Tensor
    targets: Tensor
    sequence_index: Tensor
    num_sequences: int
    # The distinct predicting positions [M] and which of them predicts target i [N].
    kept_positions: Tensor
    kept_index: Tensor
    padding: int = 0

    LAYOUT_KEY = "packed_layout"
    _TENSORS = ("input_ids", "position_ids", "source_positions", "targets", "sequence_index",
                "kept_positions", "kept_index")

    @staticmethod
    def layout_name(prefix_shared: bool) -> str:
        return "prefix_shared" if prefix_shared else "sequences"

    def to_batch(self, prefix_shared: bool) -> dict:
        """Batch fields (`packed_*`) that `from_batch` turns back into this row."""
        fields = {f"packed_{name}": getattr(self, name) for name in self._TENSORS}
        fields.update(packed_blocks=self.blocks, packed_num_sequences=self.num_sequences,
                      packed_padding=self.padding)
        fields[self.LAYOUT_KEY] = self.layout_name(prefix_shared)
        return fields

    @classmethod
    def from_batch(cls, batch: dict) -> PackedRow:
        return cls(blocks=[tuple(block) for block in batch["packed_blocks"]],
                   num_sequences=int(batch["packed_num_sequences"]),
                   padding=int(batch.get("packed_padding", 0)),
                   **{name: batch[f"packed_{name}"] for name in cls._TENSORS})

    def padded_to_multiple_of(self, multiple: int, pad_token_id: int) -> PackedRow:
        """This row grown to a multiple of `multiple` tokens (`--pad_to_multiple_of`): the
        padding is one more block of `pad_token_id`s that is no sequence (it sees only itself,
        predicts nothing and weighs nothing), so every real token's log-prob is unchanged."""
        length = self.input_ids.shape[1]
        padding = -length % multiple
        if not padding:
            return self
        ids = self.input_ids.new_full((1, padding), pad_token_id)
        positions = torch.arange(padding, device=ids.device)[None]
        return dataclasses.replace(
            self, input_ids=torch.cat([self.input_ids, ids], dim=1),
            position_ids=torch.cat([self.position_ids, positions], dim=1),
            blocks=[*self.blocks, (length, 0, padding, 0)], padding=self.padding + padding)

    def token_kinds(self) -> tuple[Tensor, Tensor]:
        """(block index [T], kind [T] in SHARED / FIRST / SECOND) of every position."""
        device = self.input_ids.device
        sizes = torch.tensor([size for _, *parts in self.blocks for size in parts], device=device)
        kinds = torch.tensor([SHARED, FIRST, SECOND] * len(self.blocks), device=device)
        owners = torch.arange(len(self.blocks), device=device).repeat_interleave(3)
        return owners.repeat_interleave(sizes), kinds.repeat_interleave(sizes)

    def layout(self) -> RowLayout:
        """Who sees whom: each block is a group; the second part of a block sees its shared
        tokens and itself, never the first part."""
        owner, kind = self.token_kinds()
        if self.padding:  # padding is no sequence: a group of its own, negative (weight 0)
            owner = torch.where(torch.arange(owner.numel(), device=owner.device)
                                >= owner.numel() - self.padding, -1, owner)
        return RowLayout(group_ids=owner[None], part_ids=kind[None],
                         position_ids=self.position_ids, blocks=self.blocks)


def pack_sequences(
    input_ids: Tensor, attention_mask: Tensor, labels: Tensor
) -> PackedRow:
    """Rows of a padded batch ([S, W] each, either padding side) -> one packed row, a standard
    block per sequence. A label at unpadded position t + 1 is predicted from position t, so the
    first token of a sequence is never scored (as in the padded forward)."""
    device = input_ids.device
    lengths = attention_mask.sum(-1).tolist()
    real = attention_mask.bool()
    ids = input_ids[real]  # row-major: the sequences one after another
    row_labels = labels[real]
    starts = list(itertools.accumulate(lengths[:-1], initial=0))
    start_of = torch.tensor(starts, device=device)
    sequence_of = torch.arange(len(lengths), device=device).repeat_interleave(
        torch.tensor(lengths, device=device))
    position_ids = torch.arange(len(ids), device=device) - start_of[sequence_of]
    # Position t predicts t + 1 within one sequence: t + 1 must not start the next sequence.
    scored = (row_labels[1:] != IGNORE_INDEX) & (position_ids[1:] != 0)
    sources = scored.nonzero().squeeze(1)
    return PackedRow(
        input_ids=ids[None],
        position_ids=position_ids[None],
        blocks=[(start, 0, length, 0) for start, length in zip(starts, lengths, strict=True)],
        source_positions=sources,
        targets=row_labels[sources + 1],
        sequence_index=sequence_of[sources],
        num_sequences=len(lengths),
        kept_positions=sources,  # each position predicts at most one label here
        kept_index=torch.arange(len(sources), device=device),
    )


def pack_prefix_shared(
    input_ids: Tensor, position_ids: Tensor, segment_counts: Tensor, source_rows: Tensor,
    source_positions: Tensor, targets: Tensor, sequence_index: Tensor
) -> PackedRow:
    """Prefix-shared rows (one right-padded `[prompt | chosen | rejected]` row per pair, as
    `logps.prefix_shared_batch` builds them) -> one packed row, a block per pair.

    segment_counts: [B, 3] tokens of prompt, chosen response and rejected response per row.
    """
    counts = segment_counts.tolist()
    lengths = [sum(row) for row in counts]
    starts = list(itertools.accumulate(lengths[:-1], initial=0))
    width = input_ids.shape[1]
    real = torch.arange(width, device=input_ids.device)[None, :] < torch.tensor(
        lengths, device=input_ids.device)[:, None]
    sources = torch.tensor(starts, device=input_ids.device)[source_rows] + source_positions
    # A prompt's last token predicts the first chosen and the first rejected token.
    kept_positions, kept_index = torch.unique(sources, return_inverse=True)
    return PackedRow(
        input_ids=input_ids[real][None],
        position_ids=position_ids[real][None],
        blocks=[(start, *row) for start, row in zip(starts, counts, strict=True)],
        source_positions=sources,
        targets=targets,
        sequence_index=sequence_index,
        num_sequences=2 * len(lengths),
        kept_positions=kept_positions,
        kept_index=kept_index,
    )


def _packed_logps(model: torch.nn.Module, row: PackedRow, log_sum_sq_probs: bool) -> TokenLogps:
    """One forward over a packed row -> its response tokens' `TokenLogps`; the attention that
    keeps its sequences apart is chosen by the model's implementation."""
    attention = attn_implementation(model)
    on_cuda = row.input_ids.device.type == "cuda"
    if attention not in LAYOUT_ATTENTION and not (attention == "flex_attention" and on_cuda):
        raise ValueError(
            f"padding-free batches need attn_implementation 'sdpa' or 'eager' (or "
            f"'flex_attention' on CUDA); this model uses {attention!r}: load it with "
            "attn_implementation='sdpa', or turn --padding_free off")
    # A 2D mask of ones, not None: with None, transformers would read the restarting position
    # ids as packed sequences and cut the shared prompts off; the masks come from the layout.
    inputs = dict(input_ids=row.input_ids, attention_mask=torch.ones_like(row.input_ids),
                  position_ids=row.position_ids, use_cache=False)
    layout = row.layout()
    with layout.active():
        token_logps, sum_sq = predicted_logps(
            model, inputs, torch.zeros_like(row.source_positions), row.source_positions,
            row.targets, kept=(row.kept_positions, row.kept_index),
            token_weights=layout.token_weights(), log_sum_sq_probs=log_sum_sq_probs)
    return TokenLogps(token_logps, row.sequence_index, row.num_sequences // 2, sum_sq)


def padding_free_token_logps(model: torch.nn.Module, batch: dict[str, Tensor], *,
                             log_sum_sq_probs: bool = False) -> TokenLogps:
    """Chosen and rejected sequences packed into one row without padding -> the response
    tokens' `TokenLogps`. Equals `concatenated_token_logps` up to float rounding."""
    return _packed_logps(model, packed_row(batch, prefix_shared=False), log_sum_sq_probs)


def padding_free_prefix_shared_token_logps(model: torch.nn.Module, batch: dict[str, Tensor], *,
                                           log_sum_sq_probs: bool = False) -> TokenLogps:
    """`[prompt | chosen | rejected]` of every pair packed into one row without padding -> the
    response tokens' `TokenLogps`. Equals `concatenated_token_logps` up to float rounding;
    each prompt is encoded once."""
    return _packed_logps(model, packed_row(batch, prefix_shared=True), log_sum_sq_probs)


def padding_free_forward(model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(chosen_logps [B], rejected_logps [B]) fp32: the sums of `padding_free_token_logps`."""
    return padding_free_token_logps(model, batch).sums()


def padding_free_prefix_shared_forward(model: torch.nn.Module,
                                       batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(chosen_logps [B], rejected_logps [B]) fp32: the sums of
    `padding_free_prefix_shared_token_logps`."""
    return padding_free_prefix_shared_token_logps(model, batch).sums()


def packed_row(batch: dict, prefix_shared: bool) -> PackedRow:
    """The batch's packed layout: the one `PaddingFreeCollator` put in the batch (built on the
    CPU), or built here from the padded fields."""
    if batch.get(PackedRow.LAYOUT_KEY) == PackedRow.layout_name(prefix_shared):
        return PackedRow.from_batch(batch)
    if not prefix_shared:
        check_pair_batch(batch, PAIR_FIELDS)
        return pack_sequences(
            torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]),
            torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]]),
            torch.cat([batch["chosen_labels"], batch["rejected_labels"]]),
        )
    shared = prefix_shared_batch(batch)
    counts = torch.stack([(shared.segment_ids == kind).sum(-1) for kind in (
        PrefixSharedRows.PROMPT, PrefixSharedRows.CHOSEN, PrefixSharedRows.REJECTED)], dim=1)
    return pack_prefix_shared(shared.input_ids, shared.position_ids, counts, shared.source_rows,
                              shared.source_positions, shared.targets, shared.sequence_index)


class PaddingFreeCollator:
    """A pair collator whose batches also carry their packed layout (`PackedRow` fields),
    built here on the CPU, in the DataLoader: the padding-free forward then needs no host
    sync to find lengths and positions. The padded fields stay, for everything else that
    reads the batch (lengths, token counts). With the inner collator's `pad_to_multiple_of`
    the packed row is grown to a multiple of it too (`PackedRow.padded_to_multiple_of`)."""

    def __init__(self, collator, prefix_shared: bool):
        self.collator, self.prefix_shared = collator, prefix_shared

    def __call__(self, pairs) -> dict:
        batch = self.collator(pairs)
        row = packed_row(batch, self.prefix_shared)
        if multiple := self.collator.pad_to_multiple_of:
            row = row.padded_to_multiple_of(multiple, self.collator.pad_token_id)
        batch.update(row.to_batch(self.prefix_shared))
        return batch
