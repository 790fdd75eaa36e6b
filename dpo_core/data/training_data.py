"""From a dataset name to tokenized train and eval pairs: load, validate, sample, split,
tokenize, in one call; what was dropped, and why, is said once.

The token ids go into compact `TokenStore`s, saved in the tokenized cache
(`dpo_core.data.tokenized_cache`) unless --no-tokenized_cache: a later run with the same data,
tokenizer and data settings maps them instead of tokenizing again, and says again what the
run that tokenized them said.

A pair whose chosen and rejected responses are the same token ids has a DPO gradient of
exactly zero (the policy's log-ratio difference is identically 0); truncation to --max_length
can make two different replies identical. Such pairs are counted and said out loud, and a run
where every training pair is one stops before it starts.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dpo_core.config.train import TrainConfig
from dpo_core.console import logger
from dpo_core.data.pairs import PreferencePair, load_pairs, split_pairs
from dpo_core.data.streaming import PairStream
from dpo_core.data.templates import pair_view
from dpo_core.data.token_store import StoreWriter, TokenStore, tokenize_to_store
from dpo_core.data.tokenization import TokenizedPair
from dpo_core.data.tokenized_cache import (
    EVAL_PROMPTS,
    TokenizedCache,
    cache_key,
    default_cache_dir,
    source_fingerprint,
    tokenizer_fingerprint,
)
from dpo_core.errors import ConfigError
from dpo_core.run_files import SAMPLES_FILE

# What the run plan says of the tokenized cache.
CACHE_HIT, CACHE_MISS, CACHE_OFF = "hit", "miss", "off"
CACHE_UNWRITABLE = "miss, not saved (directory not writable)"


@dataclass(frozen=True)
class TrainingData:
    """Tokenized pairs, the first `num_sample_prompts` eval prompts as they were (messages or
    text) for samples.md, and what the tokenized cache did (CACHE_*)."""

    train: Sequence[TokenizedPair] | PairStream
    eval: Sequence[TokenizedPair]
    sample_prompts: list
    tokenized_cache: str = CACHE_OFF

    @property
    def num_train(self) -> int | None:
        """Training pairs; None when they are streamed."""
        return None if isinstance(self.train, PairStream) else len(self.train)


class _Notes:
    """Messages logged as they are made and kept ([level, message]), so a cache hit can say
    them again."""

    def __init__(self):
        self.kept: list[list[str]] = []

    def say(self, level: str, message: str) -> None:
        getattr(logger, level)(message)
        self.kept.append([level, message])


def cache_parts(config: TrainConfig, tokenizer, use_chat_template: bool) -> dict:
    """Everything that changes a run's token ids, or which pairs it has (the cache key)."""
    return {
        "train_data": (None if config.streaming  # streamed: only the eval set is cached
                       else source_fingerprint(config.dataset_name, config.dataset_split)),
        "eval_data": (source_fingerprint(config.eval_dataset, "train")
                      if config.eval_dataset else None),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "use_chat_template": use_chat_template,
        "max_length": config.max_length,
        "max_prompt_length": config.max_prompt_length,
        "skip_bad_rows": config.skip_bad_rows,
        "seed": config.seed,
        "num_samples": config.num_samples,
        "eval_fraction": None if config.eval_dataset else config.eval_fraction,
    }


def build_training_data(config: TrainConfig, tokenizer, use_chat_template: bool,
                        show_progress: bool = True) -> TrainingData:
    """Load `--dataset_name` (and `--eval_dataset`, or hold out `--eval_fraction`), then
    tokenize and truncate both splits, or find them in the tokenized cache; ConfigError if no
    training pair is left. With --streaming the training pairs are a `PairStream`, and only
    --eval_dataset is tokenized here."""
    data = _training_data(config, tokenizer, use_chat_template, show_progress)
    if not config.streaming:
        return data
    stream = PairStream(config.dataset_name, config.dataset_split, config.seed,
                        config.shuffle_buffer_size, config.num_samples or None,
                        config.skip_bad_rows, tokenizer, config.max_length,
                        config.max_prompt_length, use_chat_template)
    return dataclasses.replace(data, train=stream)


def _training_data(config: TrainConfig, tokenizer, use_chat_template: bool,
                   show_progress: bool) -> TrainingData:
    count = config.num_sample_prompts
    if not config.tokenized_cache:
        built = _tokenize(config, tokenizer, use_chat_template, None, show_progress)
        return TrainingData(built.stores["train"], built.stores["eval"], built.prompts[:count])
    parts = cache_parts(config, tokenizer, use_chat_template)
    cache = TokenizedCache(config.tokenized_cache_dir or default_cache_dir(), cache_key(parts))
    if (cached := cache.load()) is not None:
        for level, message in cached.notes:
            getattr(logger, level)(message)
        logger.info(f"Token ids from the tokenized cache: {cached.directory}")
        return TrainingData(cached.stores["train"], cached.stores["eval"],
                            cached.eval_prompts(count), CACHE_HIT)
    with cache.writing() as directory:
        built = _tokenize(config, tokenizer, use_chat_template, directory, show_progress)
        if directory is None:
            return TrainingData(built.stores["train"], built.stores["eval"],
                                built.prompts[:count], CACHE_UNWRITABLE)
        _write_prompts(directory / EVAL_PROMPTS, built.prompts)
        cached = cache.commit(directory, {name: store.digest
                                          for name, store in built.stores.items()},
                              built.notes, parts)
    return TrainingData(cached.stores["train"], cached.stores["eval"], built.prompts[:count],
                        CACHE_MISS)


@dataclass
class _Tokenized:
    stores: dict[str, TokenStore]  # "train", "eval"
    prompts: list  # every eval prompt, as it was
    notes: list[list[str]]  # what was said, [level, message]


def _tokenize(config: TrainConfig, tokenizer, use_chat_template: bool, directory: Path | None,
              show_progress: bool) -> _Tokenized:
    """Load, sample, split and tokenize the run's data into stores in `directory` (None: in
    memory)."""
    notes = _Notes()
    train_pairs, eval_pairs = load_run_pairs(config, notes)
    if config.num_sample_prompts and not eval_pairs:
        notes.say("warning", f"No {SAMPLES_FILE}: its prompts come from the eval set, and this "
                  "run has none (--eval_fraction 0 and no --eval_dataset).")
    prompts = [pair_view(pair, use_chat_template)[0] for pair in eval_pairs]
    stores = {name: tokenize_split(config, tokenizer, split, name, use_chat_template,
                                   show_progress, directory, notes)
              for name, split in (("train", train_pairs), ("eval", eval_pairs))}
    train = "streamed" if config.streaming else len(stores["train"])
    notes.say("info", f"Pairs: {train} train, {len(stores['eval'])} eval.")
    if not config.streaming and not len(stores["train"]):
        raise ConfigError("no training pairs left after loading and truncation")
    return _Tokenized(stores, prompts, notes.kept)


def load_run_pairs(config: TrainConfig, notes: _Notes | None = None
                   ) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """The (train, eval) pairs of a run, before tokenization: `--dataset_name` sampled (none
    under --streaming: the stream reads them), and `--eval_dataset` or the seeded
    `--eval_fraction` split. The same for the same settings, so `dpo-eval` finds the eval split
    its run held out."""
    notes = notes or _Notes()
    if config.streaming:
        pairs, drops = [], {}
        _say_what_streams(notes, config)
    else:
        pairs, drops = load_pairs(config.dataset_name, split=config.dataset_split,
                                  num_samples=config.num_samples or None, seed=config.seed,
                                  skip_bad_rows=config.skip_bad_rows)
    _report_drops(notes, config.dataset_name, drops)
    if config.eval_dataset:
        return pairs, load_eval_pairs(config.eval_dataset, config.seed, config.skip_bad_rows,
                                      notes)
    return split_pairs(pairs, 0.0 if config.streaming else config.eval_fraction, config.seed)


def load_eval_pairs(name_or_path: str, seed: int, skip_bad_rows: bool,
                    notes: _Notes | None = None) -> list[PreferencePair]:
    """Every pair of an evaluation dataset (its "train" split), in seeded order."""
    pairs, drops = load_pairs(name_or_path, split="train", num_samples=None, seed=seed,
                              skip_bad_rows=skip_bad_rows)
    _report_drops(notes or _Notes(), name_or_path, drops)
    return pairs


def tokenize_split(config: TrainConfig, tokenizer, pairs: Sequence[PreferencePair], name: str,
                   use_chat_template: bool, show_progress: bool = True,
                   directory: Path | None = None, notes: _Notes | None = None) -> TokenStore:
    """`pairs` tokenized and truncated as the run's settings say, into a `TokenStore` in
    `directory` (None: in memory); what was dropped, and pairs left identical by truncation,
    are said out loud (`name`: which split, for the messages and the store's files)."""
    notes = notes or _Notes()
    store, drops, identical = tokenize_to_store(
        tokenizer, pairs, StoreWriter(directory, name), num_proc=config.tokenize_num_proc,
        desc=f"Tokenizing {name}", disable=not show_progress, max_length=config.max_length,
        max_prompt_length=config.max_prompt_length, use_chat_template=use_chat_template,
        skip_bad_rows=config.skip_bad_rows)
    _report_drops(notes, f"the {name} pairs", drops)
    if warning := check_identical_pairs(identical, len(store), name, config.max_length):
        notes.say("warning", warning)
    return store


def _say_what_streams(notes: _Notes, config: TrainConfig) -> None:
    """What of the data settings a stream reads differently."""
    if config.num_samples:
        notes.say("warning", f"--streaming reads only the first {config.num_samples} rows of "
                  f"{config.dataset_name} (--num_samples {config.num_samples}; 0 reads all).")
    if not config.eval_dataset and config.eval_fraction:
        notes.say("info", "--streaming holds no rows out for evaluation (--eval_fraction "
                  "applies to data read whole); pass --eval_dataset to evaluate.")


def _write_prompts(path: Path, prompts: list) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(prompt) + "\n" for prompt in prompts)


def _report_drops(notes: _Notes, source: str, drops: dict[str, int]) -> None:
    if drops:
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(drops.items()))
        notes.say("info", f"Dropped {sum(drops.values())} rows of {source}: {reasons}.")


def check_identical_pairs(identical: int, total: int, split: str, max_length: int) -> str:
    """'' when every pair still differs; a warning naming the count and the fix when
    `identical` of the `total` pairs do not; ConfigError when no training pair does (the run
    could not learn anything)."""
    if not identical:
        return ""
    fix = (f"their chosen and rejected replies differ only past --max_length {max_length}; "
           "raise it (or --max_prompt_length lower) to keep the difference")
    if split == "train" and identical == total:
        raise ConfigError(f"every training pair ({identical}) is identical after truncation, "
                          f"so DPO has no gradient: {fix}")
    return (f"WARNING: {identical} of {total} {split} pairs are identical after "
            f"truncation and carry no preference (zero DPO gradient): {fix}.")
