"""Offline demo: by DPO, a tiny bundled model learns to give whole sums, not ones cut short.

`python train.py --demo` trains on the bundled pairs and prints a before/after table;
`python chat.py --demo` chats with the result. `scripts/build_demo_assets.py` rebuilds the
bundled model and data from scratch.
"""

from dpo_core.demo.evaluation import demo_evaluation, format_before_after
from dpo_core.demo.paths import ASSETS_DIR, eval_file, model_dir, train_file
from dpo_core.demo.presets import CHAT_PRESETS, DEMO_OUTPUT_DIR, DEMO_PRESETS
from dpo_core.demo.task import (
    cut_short,
    follows_rule,
    generation_accuracy,
    implicit_reward_accuracy,
    make_pair,
    make_pairs,
    make_prompt,
    make_reply,
    parse_prompt,
    preference_accuracy,
    split_operands,
)

__all__ = [
    "ASSETS_DIR",
    "CHAT_PRESETS",
    "DEMO_OUTPUT_DIR",
    "DEMO_PRESETS",
    "cut_short",
    "demo_evaluation",
    "eval_file",
    "follows_rule",
    "format_before_after",
    "generation_accuracy",
    "implicit_reward_accuracy",
    "make_pair",
    "make_pairs",
    "make_prompt",
    "make_reply",
    "model_dir",
    "parse_prompt",
    "preference_accuracy",
    "split_operands",
    "train_file",
]
