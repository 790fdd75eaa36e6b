"""Prefix sharing (arXiv 2410.20305): one row per pair, `[prompt | chosen | rejected]`, the
prompt encoded once.

The row's layout (`masks.RowLayout`) keeps the rejected tokens from seeing the chosen ones,
and position ids restart the rejected part where the prompt ends, so every token sees exactly
what it sees in the standard two-row forward, under the model's own mask of each layer (a
sliding window included): the same log-probs, fewer tokens, longer rows. It needs an
attention implementation whose masks follow the layout (eager or sdpa).
`prefix_sharing_when_it_pays` chooses per batch, by how many tokens sharing saves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dpo_core.data.tokenization import IGNORE_INDEX
from dpo_core.forward.attention import LAYOUT_ATTENTION, attn_implementation
from dpo_core.forward.logps import (
    PAIR_FIELDS,
    TokenLogps,
    check_pair_batch,
    concatenated_token_logps,
    predicted_logps,
)
from dpo_core.forward.masks import FIRST, SECOND, SHARED, RowLayout


@dataclass
class PrefixSharedRows:
    """One right-padded row per pair: `[prompt | chosen response | rejected response | pad]`.

    input_ids, position_ids, segment_ids: [B, L]; segment ids are PROMPT, CHOSEN, REJECTED or PAD.
    Predictions (one per label token): the logits at row position `source_positions[i]` of row
    `source_rows[i]` predict `targets[i]`, which belongs to sequence `sequence_index[i]`
    (b for the chosen response of pair b, B + b for its rejected response).
    """

    PROMPT = SHARED
    CHOSEN = FIRST
    REJECTED = SECOND
    PAD = -1

    input_ids: Tensor
    position_ids: Tensor
    segment_ids: Tensor
    source_rows: Tensor
    source_positions: Tensor
    targets: Tensor
    sequence_index: Tensor

    def layout(self) -> RowLayout:
        """Who sees whom: prompt tokens the prompt, chosen tokens the prompt and chosen,
        rejected tokens the prompt and rejected (never chosen), each within the model's own
        mask (a sliding window counts in position ids). Padding (at the end of each row) is
        its own group, so every query sees at least itself."""
        padding = self.segment_ids == self.PAD
        return RowLayout(group_ids=padding.long().neg(), part_ids=self.segment_ids,
                         position_ids=self.position_ids)


def prefix_shared_batch(batch: dict[str, Tensor]) -> PrefixSharedRows:
    """Rebuild a standard pair batch (either padding side) as prefix-shared rows.

    Needs `prompt_lengths` [B]: the number of prompt tokens at the start of each unpadded
    sequence; the first prompt_lengths[b] tokens of chosen and rejected must be identical.
    """
    check_pair_batch(batch, (*PAIR_FIELDS, "prompt_lengths"))
    device = batch["chosen_input_ids"].device
    rows, positions, segments = [], [], []
    source_rows, source_positions, targets, sequence_index = [], [], [], []
    num_pairs = batch["chosen_input_ids"].shape[0]
    for b in range(num_pairs):
        chosen_mask = batch["chosen_attention_mask"][b].bool()
        rejected_mask = batch["rejected_attention_mask"][b].bool()
        chosen_ids = batch["chosen_input_ids"][b][chosen_mask]
        rejected_ids = batch["rejected_input_ids"][b][rejected_mask]
        chosen_labels = batch["chosen_labels"][b][chosen_mask]
        rejected_labels = batch["rejected_labels"][b][rejected_mask]
        prompt_len = int(batch["prompt_lengths"][b])
        if not (
            0 <= prompt_len <= min(len(chosen_ids), len(rejected_ids))
            and torch.equal(chosen_ids[:prompt_len], rejected_ids[:prompt_len])
        ):
            raise ValueError(
                f"prefix sharing: pair {b} of the batch: the first prompt_lengths={prompt_len} "
                f"tokens of chosen ({len(chosen_ids)} tokens) and rejected ({len(rejected_ids)} "
                "tokens) must be one identical prompt"
            )
        chosen_len, rejected_len = len(chosen_ids), len(rejected_ids)
        rows.append(torch.cat([chosen_ids, rejected_ids[prompt_len:]]))
        arange = torch.arange(max(chosen_len, rejected_len), device=device)
        positions.append(torch.cat([arange[:chosen_len], arange[prompt_len:rejected_len]]))
        segments.append(
            torch.repeat_interleave(
                torch.tensor(
                    [PrefixSharedRows.PROMPT, PrefixSharedRows.CHOSEN, PrefixSharedRows.REJECTED],
                    device=device,
                ),
                torch.tensor(
                    [prompt_len, chosen_len - prompt_len, rejected_len - prompt_len], device=device
                ),
            )
        )
        # Chosen keeps its own coordinates; rejected position j >= prompt_len moves right by the
        # chosen response length, and its prompt positions are the shared ones.
        chosen_targets = (chosen_labels[1:] != IGNORE_INDEX).nonzero().squeeze(1) + 1
        rejected_targets = (rejected_labels[1:] != IGNORE_INDEX).nonzero().squeeze(1) + 1
        rejected_sources = rejected_targets - 1
        shift = chosen_len - prompt_len
        rejected_sources = torch.where(
            rejected_sources >= prompt_len, rejected_sources + shift, rejected_sources
        )
        for sources, target_ids, sequence in (
            (chosen_targets - 1, chosen_labels[chosen_targets], b),
            (rejected_sources, rejected_labels[rejected_targets], num_pairs + b),
        ):
            source_rows.append(torch.full_like(sources, b))
            source_positions.append(sources)
            targets.append(target_ids)
            sequence_index.append(torch.full_like(sources, sequence))

    row_len = max(len(row) for row in rows)

    def right_padded(parts: list[Tensor], value: int) -> Tensor:
        padded = torch.full((num_pairs, row_len), value, dtype=torch.long, device=device)
        for b, part in enumerate(parts):
            padded[b, : len(part)] = part
        return padded

    return PrefixSharedRows(
        input_ids=right_padded(rows, 0),  # any pad id: padding comes after every real token
        position_ids=right_padded(positions, 0),
        segment_ids=right_padded(segments, PrefixSharedRows.PAD),
        source_rows=torch.cat(source_rows),
        source_positions=torch.cat(source_positions),
        targets=torch.cat(targets),
        sequence_index=torch.cat(sequence_index),
    )


def prefix_shared_token_logps(model: torch.nn.Module, batch: dict[str, Tensor], *,
                              log_sum_sq_probs: bool = False) -> TokenLogps:
    """Prompt encoded once per pair -> the response tokens' `TokenLogps`.

    Equals `concatenated_token_logps` up to float rounding. Needs an attention implementation
    whose masks follow a `RowLayout` (eager, sdpa); flash-attention models raise ValueError.
    """
    attention = attn_implementation(model)
    if attention not in LAYOUT_ATTENTION:
        raise ValueError(
            f"prefix sharing needs a 4D attention mask, which attn_implementation="
            f"{attention!r} cannot take; load the model with attn_implementation="
            "'sdpa' (or 'eager'), or turn prefix sharing off"
        )
    shared = prefix_shared_batch(batch)
    # The 2D mask only marks padding (a model may read it, e.g. for MoE router statistics);
    # the attention masks come from the layout.
    inputs = dict(input_ids=shared.input_ids,
                  attention_mask=(shared.segment_ids != shared.PAD).long(),
                  position_ids=shared.position_ids, use_cache=False)
    layout = shared.layout()
    with layout.active():
        token_logps, sum_sq = predicted_logps(model, inputs, shared.source_rows,
                                              shared.source_positions, shared.targets,
                                              token_weights=layout.token_weights(),
                                              log_sum_sq_probs=log_sum_sq_probs)
    return TokenLogps(token_logps, shared.sequence_index, shared.input_ids.shape[0], sum_sq)


def prefix_shared_forward(model: torch.nn.Module,
                          batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(chosen_logps [B], rejected_logps [B]) fp32: the sums of `prefix_shared_token_logps`."""
    return prefix_shared_token_logps(model, batch).sums()


# Prefix sharing feeds fewer tokens but attends over rows about twice as long (with a dense
# mask); measured on CPU it pays once the rows hold at least this much fewer tokens.
PREFIX_SHARING_MIN_SAVING = 0.2


def prefix_sharing_pays(prompt_lengths: Tensor, chosen_lengths: Tensor,
                        rejected_lengths: Tensor) -> bool:
    """Whether one prefix-shared row per pair (prompt + chosen + rejected) is at least
    PREFIX_SHARING_MIN_SAVING narrower than the two padded rows per pair of the standard
    forward (prompt + longer response). Lengths are per pair, [B], in tokens; a response
    length here counts the prompt too, as the attention masks do."""
    shared_width = (chosen_lengths + rejected_lengths - prompt_lengths).max()
    two_rows_width = 2 * torch.maximum(chosen_lengths, rejected_lengths).max()
    return bool(shared_width <= (1 - PREFIX_SHARING_MIN_SAVING) * two_rows_width)


def prefix_sharing_when_it_pays(model: torch.nn.Module, batch: dict[str, Tensor], *,
                                log_sum_sq_probs: bool = False) -> TokenLogps:
    """`prefix_shared_token_logps` for batches where `prefix_sharing_pays` (long prompts), else
    `concatenated_token_logps`. Both give the same log-probs, so the choice is per batch."""
    shared = prefix_sharing_pays(batch["prompt_lengths"], batch["chosen_attention_mask"].sum(-1),
                                 batch["rejected_attention_mask"].sum(-1))
    path = prefix_shared_token_logps if shared else concatenated_token_logps
    return path(model, batch, log_sum_sq_probs=log_sum_sq_probs)
