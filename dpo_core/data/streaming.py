"""--streaming: training pairs read, shuffled and tokenized as training consumes them, for data
that does not fit in memory.

Rows come in file order (`sources.stream_rows`: a JSON Lines file line by line, a Hub dataset
through `datasets`' streaming), the first --num_samples of them (0: all); process r of P takes
rows r, r + P, r + 2P, ... They pass through a seeded shuffle buffer (`shuffled`; epoch e draws
with seed and e), are validated (`to_pair`), tokenized and truncated exactly as the in-memory
path does (`tokenize_batch`, ENCODE_BATCH pairs per tokenizer call) and collated into
micro-batches of --batch_size pairs, in a background worker process (a DataLoader worker), so
tokenizing overlaps training. A bad row stops the run naming it, or with --skip_bad_rows is
dropped and counted; the counts are said at the end of the first pass.

Where a process stands is a `Position`: [epoch, rows taken out of the shuffle buffer]; each
micro-batch carries the position after its last pair, and `StreamingBatches.resume` keeps it
in the train state, which a checkpoint saves for each process. Resuming replays that epoch's
reading and shuffling up to the position, without parsing or tokenizing those rows, and goes
on with the very micro-batches the run would have had.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device
from torch.utils.data import DataLoader, IterableDataset

from dpo_core.console import logger
from dpo_core.data.pairs import IDENTICAL_REPLIES, to_pair
from dpo_core.data.sources import parse_row, stream_rows
from dpo_core.data.templates import end_of_turn_ids
from dpo_core.data.tokenization import ENCODE_BATCH, TokenizedPair, tokenize_batch
from dpo_core.errors import DataError

Position = list[int]  # [epoch, rows taken out of the shuffle buffer in that epoch]

T = TypeVar("T")

# Micro-batches the background worker prepares ahead of training.
PREFETCH_BATCHES = 8


def shuffled(items: Iterable[T], buffer_size: int, rng: random.Random) -> Iterator[T]:
    """`items` in a seeded buffered shuffle: the buffer fills with the first `buffer_size`
    items, then each new item takes the place of one drawn at random and given out; the rest
    comes out shuffled at the end. Reproducible: the same items and rng state give the same
    order."""
    buffer: list[T] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        slot = rng.randrange(buffer_size)
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


@dataclass(frozen=True)
class PairStream:
    """What a run streams, and how its rows become token ids (module docstring)."""

    name: str
    split: str
    seed: int
    buffer_size: int
    num_rows: int | None  # read only the first rows (--num_samples); None: all
    skip_bad_rows: bool
    tokenizer: Any
    max_length: int
    max_prompt_length: int
    use_chat_template: bool

    def pairs(self, start: Position, process_index: int = 0,
              num_processes: int = 1) -> Iterator[tuple[TokenizedPair, Position]]:
        """This process's pairs from `start` on, epoch after epoch, each with the position
        just after it."""
        end_of_turn = end_of_turn_ids(self.tokenizer) if self.use_chat_template else []
        epoch, skip = start
        while True:
            drops: Counter[str] = Counter()
            kept = identical = 0
            rows = shuffled(self._rows(process_index, num_processes), self.buffer_size,
                            random.Random(f"dpo-stream:{self.seed}:{epoch}"))
            taken = skip
            for chunk in _chunks(itertools.islice(rows, skip, None), ENCODE_BATCH):
                pairs, positions = [], []
                for location, row in chunk:
                    taken += 1
                    try:
                        pair = to_pair(parse_row(location, row), location)
                    except DataError as error:
                        drops[self._drop(error)] += 1
                        continue
                    if pair.chosen == pair.rejected:
                        drops[IDENTICAL_REPLIES] += 1
                        continue
                    pairs.append(dataclasses.replace(pair, origin=location))
                    positions.append(taken)
                results = tokenize_batch(self.tokenizer, pairs, max_length=self.max_length,
                                         max_prompt_length=self.max_prompt_length,
                                         use_chat_template=self.use_chat_template,
                                         end_of_turn=end_of_turn)
                for result, position in zip(results, positions, strict=True):
                    if isinstance(result, DataError):
                        drops[self._drop(result)] += 1
                        continue
                    kept += 1
                    identical += result.chosen_ids == result.rejected_ids
                    yield result, [epoch, position]
            if skip == 0 and kept == 0:
                raise DataError(f"{self.name}: no usable pairs among the rows this process "
                                f"reads (dropped: {dict(drops)})")
            if epoch == 0:
                self._report(drops, identical, kept)
            epoch, skip = epoch + 1, 0

    def _rows(self, process_index: int, num_processes: int) -> Iterator[tuple[str, Any]]:
        def keep(index: int) -> bool:
            return index % num_processes == process_index

        rows = stream_rows(self.name, self.split, keep, skip_bad_rows=self.skip_bad_rows)
        if self.num_rows is None:
            return rows
        # Row i is the (i // num_processes)-th of this process's rows.
        own = (self.num_rows - process_index + num_processes - 1) // num_processes
        return itertools.islice(rows, max(own, 0))

    def _drop(self, error: DataError) -> str:
        if not self.skip_bad_rows:
            raise error
        return error.reason

    def _report(self, drops: Counter[str], identical: int, kept: int) -> None:
        """What the first pass dropped, said once."""
        if drops:
            reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(drops.items()))
            logger.info(f"Dropped {sum(drops.values())} rows of {self.name} in the first pass "
                        f"of the stream: {reasons}.")
        if identical:
            logger.warning(f"WARNING: {identical} of {kept} streamed pairs are identical after "
                           f"truncation and carry no preference (zero DPO gradient): raise "
                           f"--max_length {self.max_length} to keep the difference.")


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


class _MicroBatches(IterableDataset):
    """(collated micro-batch, position after it), or the DataError that stopped the stream:
    raised in the training process, not as a worker's traceback."""

    def __init__(self, stream: PairStream, batch_size: int, collator: Callable,
                 start: Position, process_index: int, num_processes: int):
        super().__init__()
        self.stream, self.batch_size, self.collator = stream, batch_size, collator
        self.start, self.process_index, self.num_processes = start, process_index, num_processes

    def __iter__(self):
        batch = []
        try:
            for pair, position in self.stream.pairs(self.start, self.process_index,
                                                    self.num_processes):
                batch.append(pair)
                if len(batch) == self.batch_size:
                    yield self.collator(batch), position
                    batch = []
        except DataError as error:
            yield error


class StreamingBatches:
    """Micro-batches of a `PairStream` for one process, built by a background worker
    process; the counterpart of `MicroBatchStream` for --streaming."""

    def __init__(self, accelerator: Accelerator, stream: PairStream, batch_size: int,
                 collator: Callable):
        self.accelerator, self.stream = accelerator, stream
        self.batch_size, self.collator = batch_size, collator

    def resume(self, state) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches from `state.stream_position` (None: the start) on, on this process's
        device; `state.stream_position` follows each one handed out (`state`: the
        TrainState)."""
        micro_batches = _MicroBatches(self.stream, self.batch_size, self.collator,
                                      state.stream_position or [0, 0],
                                      self.accelerator.process_index,
                                      self.accelerator.num_processes)
        # Its own generator: a DataLoader otherwise draws a seed from the global RNG, and a
        # resumed run would then continue with other dropout masks.
        loader = DataLoader(micro_batches, batch_size=None, num_workers=1,
                            prefetch_factor=PREFETCH_BATCHES, generator=torch.Generator())
        for item in loader:
            if isinstance(item, DataError):
                raise item
            batch, state.stream_position = item
            yield send_to_device(batch, self.accelerator.device)

    def epoch(self, state) -> float:
        """Passes this process has finished over its rows."""
        return float((state.stream_position or [0, 0])[0])
