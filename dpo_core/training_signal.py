"""Runs that would 'train' without a training signal, found and said out loud.

A pair whose chosen and rejected responses are the same token ids has a DPO gradient of
exactly zero (the policy's log-ratio difference is identically 0); truncation to
--max_length can make two different replies identical. A run whose every step had a zero
gradient norm changed nothing, whatever its exit status.
"""

from __future__ import annotations

from collections.abc import Sequence

from dpo_core.config import ConfigError
from dpo_core.tokenization import TokenizedPair


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


class ZeroGradientWatch:
    """Notes each applied step's gradient norm; `warning()` is non-empty when all were 0."""

    def __init__(self) -> None:
        self.steps = 0
        self.nonzero = 0

    def observe(self, grad_norm: float) -> None:
        self.steps += 1
        self.nonzero += grad_norm != 0

    def warning(self) -> str:
        if not self.steps or self.nonzero:
            return ""
        return (f"WARNING: all {self.steps} optimizer steps had a zero gradient: the adapter "
                "did not change. Check that chosen and rejected replies differ within "
                "--max_length, that --lora_alpha and --learning_rate are not tiny, and that "
                "--lora_target_modules names layers the model uses.")
