"""The order in which an epoch visits the training pairs: shuffled, or grouped by length.

Both orders are a pure function of (seed, epoch), so a resumed run that skips the micro-batches
it has already seen continues with exactly the batches it would have had.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dpo_core.tokenization import TokenizedPair

# Pairs are sorted by length within windows of this many batches: enough to bring similar
# lengths together, few enough that an epoch still mixes short and long batches at random.
MEGABATCH_BATCHES = 50


def pair_length(pair: TokenizedPair, prefix_sharing: bool) -> int:
    """Tokens the forward pass spends on one pair's row(s), padding aside.

    Standard: chosen and rejected rows padded to one width, prompt + longer response.
    Prefix sharing: one row, prompt + chosen + rejected.
    """
    responses = (
        len(pair.chosen_ids) + len(pair.rejected_ids)
        if prefix_sharing
        else max(len(pair.chosen_ids), len(pair.rejected_ids))
    )
    return len(pair.prompt_ids) + responses


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
