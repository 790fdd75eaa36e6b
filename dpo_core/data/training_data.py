"""From a dataset name to tokenized train and eval pairs: load, validate, sample, split,
tokenize, in one call; what was dropped, and why, is said once.

A pair whose chosen and rejected responses are the same token ids has a DPO gradient of
exactly zero (the policy's log-ratio difference is identically 0); truncation to --max_length
can make two different replies identical. Such pairs are counted and said out loud, and a run
where every training pair is one stops before it starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dpo_core.config.train import TrainConfig
from dpo_core.console import logger
from dpo_core.data.pairs import PreferencePair, load_pairs, split_pairs
from dpo_core.data.templates import pair_view
from dpo_core.data.tokenization import TokenizedPair, tokenize_pairs
from dpo_core.errors import ConfigError
from dpo_core.run_files import SAMPLES_FILE


@dataclass(frozen=True)
class TrainingData:
    """Tokenized pairs, and the first `num_sample_prompts` eval prompts as they were
    (messages or text) for samples.md."""

    train: list[TokenizedPair]
    eval: list[TokenizedPair]
    sample_prompts: list


def build_training_data(config: TrainConfig, tokenizer, use_chat_template: bool,
                        show_progress: bool = True) -> TrainingData:
    """Load `--dataset_name` (and `--eval_dataset`, or hold out `--eval_fraction`), then
    tokenize and truncate both splits; ConfigError if no training pair is left."""
    train_pairs, eval_pairs = load_run_pairs(config)
    if config.num_sample_prompts and not eval_pairs:
        logger.warning(f"No {SAMPLES_FILE}: its prompts come from the eval set, and this run "
                       "has none (--eval_fraction 0 and no --eval_dataset).")
    tokenized = {name: tokenize_split(config, tokenizer, split, name, use_chat_template,
                                      show_progress)
                 for name, split in (("train", train_pairs), ("eval", eval_pairs))}
    logger.info(f"Pairs: {len(tokenized['train'])} train, {len(tokenized['eval'])} eval.")
    if not tokenized["train"]:
        raise ConfigError("no training pairs left after loading and truncation")
    sample_prompts = [pair_view(pair, use_chat_template)[0]
                      for pair in eval_pairs[:config.num_sample_prompts]]
    return TrainingData(tokenized["train"], tokenized["eval"], sample_prompts)


def load_run_pairs(config: TrainConfig) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """The (train, eval) pairs of a run, before tokenization: `--dataset_name` sampled, and
    `--eval_dataset` or the seeded `--eval_fraction` split. The same for the same settings, so
    `dpo-eval` finds the eval split its run held out."""
    pairs, drops = load_pairs(config.dataset_name, split=config.dataset_split,
                              num_samples=config.num_samples or None, seed=config.seed,
                              skip_bad_rows=config.skip_bad_rows)
    _report_drops(config.dataset_name, drops)
    if config.eval_dataset:
        return pairs, load_eval_pairs(config.eval_dataset, config.seed, config.skip_bad_rows)
    return split_pairs(pairs, config.eval_fraction, config.seed)


def load_eval_pairs(name_or_path: str, seed: int, skip_bad_rows: bool) -> list[PreferencePair]:
    """Every pair of an evaluation dataset (its "train" split), in seeded order."""
    pairs, drops = load_pairs(name_or_path, split="train", num_samples=None, seed=seed,
                              skip_bad_rows=skip_bad_rows)
    _report_drops(name_or_path, drops)
    return pairs


def tokenize_split(config: TrainConfig, tokenizer, pairs: Sequence[PreferencePair], name: str,
                   use_chat_template: bool, show_progress: bool = True) -> list[TokenizedPair]:
    """`pairs` tokenized and truncated as the run's settings say; what was dropped, and pairs
    left identical by truncation, are said out loud (`name`: which split, for the messages)."""
    tokenized, drops = tokenize_pairs(
        tokenizer, pairs, max_length=config.max_length,
        max_prompt_length=config.max_prompt_length, use_chat_template=use_chat_template,
        skip_bad_rows=config.skip_bad_rows, desc=f"Tokenizing {name}", disable=not show_progress)
    _report_drops(f"the {name} pairs", drops)
    if warning := check_identical_pairs(tokenized, name, config.max_length):
        logger.warning(warning)
    return tokenized


def _report_drops(source: str, drops: dict[str, int]) -> None:
    if drops:
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(drops.items()))
        logger.info(f"Dropped {sum(drops.values())} rows of {source}: {reasons}.")


def identical_after_truncation(pairs: Sequence[TokenizedPair]) -> int:
    """How many pairs have the same chosen and rejected token ids."""
    return sum(pair.chosen_ids == pair.rejected_ids for pair in pairs)


def check_identical_pairs(pairs: Sequence[TokenizedPair], split: str, max_length: int) -> str:
    """'' when every pair still differs; a warning naming the count and the fix when some do
    not; ConfigError when no training pair does (the run could not learn anything)."""
    identical = identical_after_truncation(pairs)
    if not identical:
        return ""
    fix = (f"their chosen and rejected replies differ only past --max_length {max_length}; "
           "raise it (or --max_prompt_length lower) to keep the difference")
    if split == "train" and identical == len(pairs):
        raise ConfigError(f"every training pair ({identical}) is identical after truncation, "
                          f"so DPO has no gradient: {fix}")
    return (f"WARNING: {identical} of {len(pairs)} {split} pairs are identical after "
            f"truncation and carry no preference (zero DPO gradient): {fix}.")
