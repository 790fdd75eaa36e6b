"""Token ids into batches: padded collation, and the order in which an epoch visits the pairs.

`PreferenceCollator` pads pairs into chosen and rejected rows. An epoch's order is shuffled, or
grouped by length; both orders are a pure function of (seed, epoch), so a resumed run that
skips the micro-batches it has already seen continues with exactly the batches it would have
had.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from dpo_core.data.token_store import token_counts
from dpo_core.data.tokenization import IGNORE_INDEX, TokenizedPair


class PreferenceCollator:
    """Pads a list of `TokenizedPair` into a batch of chosen and rejected sequences.

    Returns `chosen_input_ids`, `chosen_attention_mask`, `chosen_labels` and the same for
    `rejected_*`, all [B, T] with one T for chosen and rejected (so they stack into 2B rows);
    labels are the input ids on response tokens and -100 on prompt and padding. Also
    `prompt_lengths` [B] (long): prompt tokens per pair, padding not counted.
    """

    def __init__(
        self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None
    ):
        if not isinstance(pad_token_id, int):
            raise ValueError(f"pad_token_id must be an int, got {pad_token_id!r}")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if pad_to_multiple_of is not None and pad_to_multiple_of <= 0:
            raise ValueError(f"pad_to_multiple_of must be positive, got {pad_to_multiple_of}")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, pairs: Sequence[TokenizedPair]) -> dict[str, torch.Tensor]:
        if not pairs:
            raise ValueError("cannot collate an empty batch")
        # Rows 0..B-1 are chosen, B..2B-1 rejected: (prompt, response) per row.
        rows = [(p.prompt_ids, p.chosen_ids) for p in pairs]
        rows += [(p.prompt_ids, p.rejected_ids) for p in pairs]
        input_ids, attention_mask, labels = pad_rows(rows, self.pad_token_id, self.padding_side,
                                                     self.pad_to_multiple_of)
        b = len(pairs)
        return {
            "chosen_input_ids": input_ids[:b],
            "chosen_attention_mask": attention_mask[:b],
            "chosen_labels": labels[:b],
            "rejected_input_ids": input_ids[b:],
            "rejected_attention_mask": attention_mask[b:],
            "rejected_labels": labels[b:],
            "prompt_lengths": torch.tensor([len(p.prompt_ids) for p in pairs], dtype=torch.long),
        }


def pad_rows(rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_token_id: int,
             padding_side: str = "right", pad_to_multiple_of: int | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt ids, response ids) rows -> input_ids, attention_mask, labels, each [R, T]:
    padded to the longest row (rounded up to `pad_to_multiple_of`); labels are the response
    ids, IGNORE_INDEX on prompt and padding."""
    width = max(len(prompt) + len(response) for prompt, response in rows)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, response) in enumerate(rows):
        length = len(prompt) + len(response)
        start = 0 if padding_side == "right" else width - length
        input_ids[row, start : start + length] = torch.tensor([*prompt, *response])
        attention_mask[row, start : start + length] = 1
        labels[row, start + len(prompt) : start + length] = torch.tensor(response).long()
    return input_ids, attention_mask, labels


# Pairs are sorted by length within windows of this many batches: enough to bring similar
# lengths together, few enough that an epoch still mixes short and long batches at random.
MEGABATCH_BATCHES = 50


def pair_lengths(pairs: Sequence[TokenizedPair], prefix_sharing: bool) -> list[int]:
    """Tokens the forward pass spends on each pair's row(s), padding aside.

    Standard: chosen and rejected rows padded to one width, prompt + longer response.
    Prefix sharing: one row, prompt + chosen + rejected.
    """
    counts = token_counts(pairs).astype(np.int64)
    responses = (counts[:, 1] + counts[:, 2] if prefix_sharing
                 else np.maximum(counts[:, 1], counts[:, 2]))
    return (counts[:, 0] + responses).tolist()


def epoch_order(
    num_pairs: int,
    batch_size: int,
    generator: torch.Generator,
    lengths: Sequence[int] | None = None,
) -> list[int]:
    """Indices of the pairs in the order one epoch visits them, a function of the generator's
    state (seed it with seed + epoch).

    Without `lengths`: a plain random permutation. With `lengths` (one per pair): length-grouped,
    so the pairs of a batch have similar lengths and need little padding. The random
    permutation is cut into windows of MEGABATCH_BATCHES batches, each window is sorted by
    length (longest first) and cut into batches, the full batches are shuffled, and the batch
    holding the longest pair goes first, so an out-of-memory error shows at step 1, not hours
    in. A final partial batch stays last: the DataLoader cuts the order into consecutive
    `batch_size` blocks, and only the last block may be short.
    """
    order = torch.randperm(num_pairs, generator=generator).tolist()
    if lengths is None:
        return order
    if len(lengths) != num_pairs:
        raise ValueError(f"epoch_order: {len(lengths)} lengths for {num_pairs} pairs")
    window = batch_size * MEGABATCH_BATCHES
    batches: list[list[int]] = []
    for start in range(0, num_pairs, window):
        by_length = sorted(order[start : start + window], key=lambda i: -lengths[i])
        batches += [by_length[i : i + batch_size] for i in range(0, len(by_length), batch_size)]
    partial = [batches.pop()] if batches and len(batches[-1]) < batch_size else []
    batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    if batches:
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        batches.insert(0, batches.pop(longest))
    return [i for batch in batches + partial for i in batch]


def length_sorted_order(lengths: Sequence[int]) -> list[int]:
    """Indices from longest to shortest: for passes whose order does not matter (evaluation,
    the reference pass), where sorting is the least padding there can be."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


class MicroBatchStream:
    """Micro-batches over epochs; epoch e is ordered with seed + e (shuffled, or grouped by
    `lengths` when given), so any position in the stream can be reproduced from the number of
    micro-batches already consumed."""

    def __init__(self, accelerator: Accelerator, pairs: Sequence[TokenizedPair], batch_size: int,
                 collator: PreferenceCollator, seed: int, lengths: list[int] | None = None):
        self.accelerator, self.pairs, self.batch_size = accelerator, pairs, batch_size
        self.collator, self.seed, self.lengths = collator, seed, lengths
        self.batches_per_epoch = len(self._epoch_loader(0))

    def _epoch_loader(self, epoch: int):
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = epoch_order(len(self.pairs), self.batch_size, generator, self.lengths)
        # A DataLoader draws a seed for every new iterator, from the global RNG unless it has
        # its own generator; a resumed run opens an iterator where the original did not, so
        # drawing globally would shift every dropout mask after a resume.
        loader = DataLoader(self.pairs, batch_size=self.batch_size, sampler=order,
                            collate_fn=self.collator, generator=generator)
        return self.accelerator.prepare_data_loader(loader)

    def resume(self, state) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches from where `state` (the TrainState) stands on."""
        return self.iterate(state.micro_batches_seen)

    def epoch(self, state) -> float:
        """Epochs done, fractions included."""
        return state.micro_batches_seen / self.batches_per_epoch

    def iterate(self, start: int) -> Iterator[dict[str, torch.Tensor]]:
        epoch, offset = divmod(start, self.batches_per_epoch)
        while True:
            loader = self._epoch_loader(epoch)
            if offset:
                loader = self.accelerator.skip_first_batches(loader, offset)
            yield from loader
            epoch, offset = epoch + 1, 0


def eval_loader(accelerator: Accelerator, pairs: Sequence[TokenizedPair], batch_size: int,
                collator: PreferenceCollator, lengths: list[int] | None = None) -> DataLoader:
    """Every eval pair once per evaluation; with `lengths`, longest first (evaluation order
    does not change its metrics, and sorted by length it pads least)."""
    order = length_sorted_order(lengths) if lengths is not None else None
    return accelerator.prepare_data_loader(DataLoader(pairs, batch_size=batch_size,
                                                      sampler=order, collate_fn=collator))
