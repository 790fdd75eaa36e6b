"""dpo_core: Direct Preference Optimization for Hugging Face causal LMs, without trl.

The names below are the public API, stable across releases: script against them
(`from dpo_core import load_pairs, train`) rather than against module paths, which may move.
They are imported on first use, so `import dpo_core` itself loads neither torch nor
transformers.

Data:
    load_pairs(name_or_path, *, split, num_samples, seed, skip_bad_rows) -> (pairs, drops)
    PreferencePair          one normalised row: prompt (text or messages), chosen, rejected
    tokenize_pair(tokenizer, pair, *, max_length, max_prompt_length, use_chat_template)
    tokenize_pairs(...)     the same for many pairs -> (TokenizedPairs, drops)
    TokenizedPair           prompt, chosen and rejected token ids
    PreferenceCollator      pairs -> a padded batch of chosen and rejected rows
Log-probs (fp32 sums of response-token log-probs, [B] each):
    sequence_logps(logits, labels)
    concatenated_forward(model, batch)          chosen and rejected in one 2B-row forward
    prefix_shared_forward(model, batch)         the prompt encoded once per pair
    padding_free_forward(model, batch)          the micro-batch as one row, no padding
    padding_free_prefix_shared_forward(model, batch)
    TokenLogps              the same before summing: each response token's log-prob (.sums())
    concatenated_token_logps(model, batch, *, log_sum_sq_probs)     (likewise for each path)
    Forward, choose_forward(model, padding_free, prefix_sharing)    the path a run takes
Loss:
    LossSettings            every loss option, checked when built
    preference_loss(settings, policy_chosen, policy_rejected, reference_chosen,
                    reference_rejected, *, chosen_lengths, rejected_lengths)
    preference_metrics(...) the trl-named batch metrics
    PreferenceObjective     a micro-batch through policy and reference into per-pair losses
Training:
    TrainConfig             every training setting (what `train.py --help` lists)
    train(config)           run it; returns the final metrics
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "load_pairs": "dpo_core.data.pairs",
    "PreferencePair": "dpo_core.data.pairs",
    "tokenize_pair": "dpo_core.data.tokenization",
    "tokenize_pairs": "dpo_core.data.tokenization",
    "TokenizedPair": "dpo_core.data.tokenization",
    "PreferenceCollator": "dpo_core.data.batches",
    "sequence_logps": "dpo_core.forward.logps",
    "concatenated_forward": "dpo_core.forward.logps",
    "TokenLogps": "dpo_core.forward.logps",
    "concatenated_token_logps": "dpo_core.forward.logps",
    "prefix_shared_forward": "dpo_core.forward.prefix_sharing",
    "padding_free_forward": "dpo_core.forward.packing",
    "padding_free_prefix_shared_forward": "dpo_core.forward.packing",
    "Forward": "dpo_core.forward.strategy",
    "choose_forward": "dpo_core.forward.strategy",
    "LossSettings": "dpo_core.losses.options",
    "preference_loss": "dpo_core.losses.preference",
    "preference_metrics": "dpo_core.losses.preference",
    "PreferenceObjective": "dpo_core.training.objective",
    "TrainConfig": "dpo_core.config.train",
    "train": "dpo_core.training.trainer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dpo_core' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
