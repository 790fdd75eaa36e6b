"""Token ids of many pairs held compactly, and tokenized into that form with every core.

A `TokenStore` is the `Sequence[TokenizedPair]` the rest of the pipeline reads (collators,
epoch order, the reference pass): `tokens` holds every pair's prompt, chosen and rejected ids
back to back as int32, `lengths` [N, 3] the three lengths of each pair. Item i is cut from the
two arrays when asked for, so N pairs cost 4 bytes a token and 20 a pair instead of a Python
list per pair (~36 bytes a token). In the tokenized cache the tokens stay in their file
(`TokenFile`): each pair's ids are read when it is batched, through the page cache that every
process of a machine shares, and no process holds the whole array.

`tokenize_to_store` fills a `StoreWriter` (files, or memory) chunk by chunk, in worker
processes when there are enough pairs to pay for starting them; the ids and their order are
exactly `tokenize_pairs`'s, and so is the first error it would raise.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash
from tqdm.auto import tqdm

from dpo_core.data.pairs import PreferencePair
from dpo_core.data.sources import DropCounts
from dpo_core.data.tokenization import TokenizedPair, tokenize_pairs

TOKEN_DTYPE = np.int32

# Pairs per task of a worker process: large enough that sending the pairs and the ids costs
# little next to tokenizing them, small enough that the workers stay evenly busy.
CHUNK_PAIRS = 512
# A worker process takes ~1.5 s to start (importing transformers and unpickling the
# tokenizer), about what it tokenizes of this many UltraFeedback-sized pairs.
MIN_PAIRS_PER_WORKER = 2000


class TokenStore(Sequence[TokenizedPair]):
    """N pairs' token ids in two int32 arrays (module docstring); `digest` names the content."""

    def __init__(self, tokens: np.ndarray | TokenFile, lengths: np.ndarray,
                 digest: str | None = None):
        if lengths.ndim != 2 or lengths.shape[1] != 3:
            raise ValueError(f"lengths must be [N, 3], got {lengths.shape}")
        self.tokens, self.lengths = tokens, lengths
        self.starts = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths.sum(axis=1, dtype=np.int64), out=self.starts[1:])
        if self.starts[-1] != len(tokens):
            raise ValueError(f"lengths sum to {self.starts[-1]} tokens, the array has "
                             f"{len(tokens)}")
        self.digest = digest or content_digest(tokens, lengths)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int | slice) -> TokenizedPair | list[TokenizedPair]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"TokenStore indices are integers, not {type(index).__name__}")
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"pair {index} of {len(self)}")
        prompt, chosen, _ = self.lengths[index].tolist()
        ids = self.tokens[self.starts[index]:self.starts[index + 1]].tolist()
        return TokenizedPair(ids[:prompt], ids[prompt:prompt + chosen], ids[prompt + chosen:])

    @classmethod
    def of(cls, pairs: Sequence[TokenizedPair]) -> TokenStore:
        return cls(*pack(pairs))


def pack(pairs: Sequence[TokenizedPair]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [T] int32, lengths [N, 3] int32) of `pairs`, in `TokenStore`'s layout."""
    lengths = _lengths(pairs)
    ids = itertools.chain.from_iterable(
        itertools.chain(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs)
    return np.fromiter(ids, dtype=TOKEN_DTYPE, count=int(lengths.sum())), lengths


def token_counts(pairs: Sequence[TokenizedPair]) -> np.ndarray:
    """[N, 3] prompt, chosen and rejected token counts of each pair."""
    return pairs.lengths if isinstance(pairs, TokenStore) else _lengths(pairs)


def _lengths(pairs: Sequence[TokenizedPair]) -> np.ndarray:
    return np.array([(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids))
                     for p in pairs], dtype=TOKEN_DTYPE).reshape(-1, 3)


def content_digest(tokens: np.ndarray, lengths: np.ndarray) -> str:
    """Hex digest of a store's content: equal for equal ids in equal order, whatever holds
    them."""
    digest = xxhash.xxh3_128()
    digest.update(np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE).tobytes())
    digest.update(np.ascontiguousarray(lengths, dtype=TOKEN_DTYPE).tobytes())
    return digest.hexdigest()


def digest_of(pairs: Sequence[TokenizedPair]) -> str:
    """`content_digest` of any sequence of pairs (a store knows its own)."""
    return pairs.digest if isinstance(pairs, TokenStore) else TokenStore.of(pairs).digest


@dataclass
class EncodedChunk:
    """Consecutive pairs tokenized: their ids in `TokenStore`'s layout, the rows dropped (by
    reason) and how many kept pairs have the same chosen and rejected ids."""

    tokens: np.ndarray
    lengths: np.ndarray
    drops: DropCounts
    identical: int


class StoreWriter:
    """Collects `EncodedChunk`s into a `TokenStore`: appended to `<directory>/<name>.tokens`
    and `.lengths` as they come (nothing held in memory), or in memory (directory None)."""

    def __init__(self, directory: Path | None = None, name: str = "train"):
        self.directory, self.name = directory, name
        self.digest = xxhash.xxh3_128()
        self.lengths: list[np.ndarray] = []
        self.tokens: list[np.ndarray] = []
        self.file = open(self.path("tokens"), "wb") if directory is not None else None

    def path(self, kind: str) -> Path:
        return self.directory / f"{self.name}.{kind}"

    def append(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        data = np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE)
        self.digest.update(data.tobytes())
        if self.file is not None:
            self.file.write(data.tobytes())
        else:
            self.tokens.append(data)
        self.lengths.append(np.asarray(lengths, dtype=TOKEN_DTYPE).reshape(-1, 3))

    def finish(self) -> TokenStore:
        lengths = np.concatenate(self.lengths) if self.lengths else \
            np.zeros((0, 3), dtype=TOKEN_DTYPE)
        self.digest.update(lengths.tobytes())
        if self.file is None:
            tokens = np.concatenate(self.tokens) if self.tokens else np.zeros(0, TOKEN_DTYPE)
            return TokenStore(tokens, lengths, self.digest.hexdigest())
        self.file.close()
        lengths.tofile(self.path("lengths"))
        return open_store(self.directory, self.name, self.digest.hexdigest())


class TokenFile:
    """A file of int32 token ids, read a slice at a time (`os.pread`): the array's interface
    for `TokenStore` without mapping the file into the process."""

    dtype = np.dtype(TOKEN_DTYPE)

    def __init__(self, path: Path):
        self.path = path
        self.size = os.path.getsize(path) // self.dtype.itemsize
        self.fd = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, part: slice) -> np.ndarray:
        start, stop, _ = part.indices(self.size)
        count = max(stop - start, 0)
        data = os.pread(self.fd, count * self.dtype.itemsize, start * self.dtype.itemsize)
        return np.frombuffer(data, dtype=self.dtype)

    def __reduce__(self):  # another process opens the file for itself
        return TokenFile, (self.path,)

    def __del__(self):
        if hasattr(self, "fd"):
            os.close(self.fd)


def open_store(directory: Path, name: str, digest: str) -> TokenStore:
    """The store `StoreWriter(directory, name)` wrote: lengths in memory, tokens read from
    their file as pairs are asked for."""
    lengths = np.fromfile(directory / f"{name}.lengths", dtype=TOKEN_DTYPE).reshape(-1, 3)
    return TokenStore(TokenFile(directory / f"{name}.tokens"), lengths, digest)


def tokenize_to_store(tokenizer, pairs: Sequence[PreferencePair], writer: StoreWriter, *,
                      num_proc: int, desc: str = "Tokenizing", disable: bool | None = None,
                      **options) -> tuple[TokenStore, DropCounts, int]:
    """`tokenize_pairs(tokenizer, pairs, **options)` into `writer`: (the store, dropped rows
    by reason, pairs identical after truncation). `num_proc` worker processes (0: one per
    core, fewer for few pairs; 1: this process)."""
    # A tokenizer class from outside transformers (trust_remote_code) may not unpickle in a
    # fresh worker process: this process tokenizes.
    transformers_class = type(tokenizer).__module__.startswith("transformers.")
    workers = worker_count(len(pairs), num_proc) if transformers_class else 1
    chunks = (pairs[i:i + CHUNK_PAIRS] for i in range(0, len(pairs), CHUNK_PAIRS))
    drops: DropCounts = Counter()
    identical = 0
    with tqdm(total=len(pairs), desc=desc, unit="pair", disable=disable or not pairs) as progress:
        for chunk in _encoded_chunks(tokenizer, chunks, workers, options):
            writer.append(chunk.tokens, chunk.lengths)
            drops.update(chunk.drops)
            identical += chunk.identical
            progress.update(len(chunk.lengths) + sum(chunk.drops.values()))
    return writer.finish(), drops, identical


def worker_count(num_pairs: int, num_proc: int) -> int:
    """Processes to tokenize `num_pairs` with: `num_proc`, or (0) one per usable core, but no
    more than there are MIN_PAIRS_PER_WORKER pairs for."""
    if num_proc:
        return num_proc
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, math.ceil(num_pairs / MIN_PAIRS_PER_WORKER)))


def _encoded_chunks(tokenizer, chunks: Iterator[Sequence[PreferencePair]], workers: int,
                    options: dict) -> Iterator[EncodedChunk]:
    """Each chunk encoded, in order; a worker's DataError is raised here, after the chunks
    before it, so the error is the one `tokenize_pairs` would raise first."""
    if workers == 1:
        yield from (encode_chunk(tokenizer, chunk, options) for chunk in chunks)
        return
    # Spawned, not forked: the trainer may hold CUDA and thread pools, which a fork copies
    # in an unusable state.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_start_worker, initargs=(tokenizer, options)) as pool:
        yield from pool.imap(_encode_in_worker, chunks)


def encode_chunk(tokenizer, pairs: Sequence[PreferencePair], options: dict) -> EncodedChunk:
    kept, drops = tokenize_pairs(tokenizer, pairs, disable=True, **options)
    tokens, lengths = pack(kept)
    identical = sum(p.chosen_ids == p.rejected_ids for p in kept)
    return EncodedChunk(tokens, lengths, drops, identical)


_worker: dict = {}


def _start_worker(tokenizer, options: dict) -> None:
    # One thread per worker: the workers are the parallelism, and the tokenizer's own thread
    # pool would oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker.update(tokenizer=tokenizer, options=options)


def _encode_in_worker(pairs: Sequence[PreferencePair]) -> EncodedChunk:
    return encode_chunk(_worker["tokenizer"], pairs, _worker["options"])
