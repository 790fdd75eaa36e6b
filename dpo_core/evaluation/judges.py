"""Judges: who scores a reply to a prompt, and what their scores say about policy vs reference.

- `RuleJudge`: a Python function (prompt, reply) -> score, for tasks with a checkable answer
  (`--judge rule:MODULE:FUNCTION`; the demo's `follows_rule` is one);
- `RewardModelJudge`: a reward model (`AutoModelForSequenceClassification` with one output)
  reading prompt and reply through its own tokenizer and chat template, in batches.

`judge_summary` turns both models' scores into the mean scores, the win rate of the policy over
the reference (a tie counts half) with its 95% Wilson interval, and the length-controlled win
rate (`dpo_core.evaluation.statistics`).
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from dpo_core.config.evaluation import RULE_JUDGE_PREFIX
from dpo_core.data.templates import Prompt, as_messages, render_prompt
from dpo_core.errors import EvaluationError, ModelLoadError, first_line
from dpo_core.evaluation.statistics import length_controlled_win_rate, wilson_interval, wins
from dpo_core.modeling.loading import _load_error, hub_access, load_tokenizer

REWARD_MODEL_PREFIX = "reward_model:"


class Judge(Protocol):
    name: str

    def score(self, prompts: Sequence[Prompt], replies: Sequence[str]) -> list[float]:
        """One score per (prompt, reply); higher is better."""


@dataclass(frozen=True)
class RuleJudge:
    """`function(prompt, reply)` -> a bool or a number, for every reply. `prompt` is as the
    data gave it: text, or a list of {"role", "content"} messages."""

    function: Callable[[Prompt, str], float | bool]
    name: str

    def score(self, prompts: Sequence[Prompt], replies: Sequence[str]) -> list[float]:
        scores = []
        for number, (prompt, reply) in enumerate(zip(prompts, replies, strict=True), start=1):
            try:
                value = self.function(prompt, reply)
            except Exception as error:  # the user's function: say where it failed
                raise EvaluationError(
                    f"--judge {self.name} raised {type(error).__name__} on prompt {number} "
                    f"({first_line(error)}); prompt: {prompt!r:.200}") from None
            if not isinstance(value, bool | int | float) or not math.isfinite(value):
                raise EvaluationError(
                    f"--judge {self.name} returned {value!r:.80} for prompt {number}; a judge "
                    "returns a bool or a finite number")
            scores.append(float(value))
        return scores


def rule_judge(spec: str) -> RuleJudge:
    """The judge of `--judge rule:MODULE:FUNCTION`. MODULE is imported as `python -m` would:
    from the current directory first, then the installed packages."""
    module_name, function_name = spec.removeprefix(RULE_JUDGE_PREFIX).split(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise EvaluationError(f"--judge {spec}: cannot import {module_name!r} "
                              f"({first_line(error)}); run dpo-eval where the module is, or "
                              "install it") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise EvaluationError(f"--judge {spec}: {module_name!r} has no function "
                              f"{function_name!r}")
    return RuleJudge(function, spec)


class RewardModelJudge:
    """A sequence classifier's single logit as the score of (prompt, reply), rendered as one
    conversation with the reward model's own chat template (plain "role: content" lines if it
    has none). Replies are scored in batches of similar length."""

    def __init__(self, name: str, model: torch.nn.Module, tokenizer, batch_size: int):
        self.name, self.model, self.tokenizer, self.batch_size = name, model, tokenizer, batch_size

    @classmethod
    def load(cls, name_or_path: str, *, dtype: torch.dtype, device: torch.device,
             batch_size: int, trust_remote_code: bool = False) -> RewardModelJudge:
        """The reward model on `device` (`check_reward_model` first); ModelLoadError naming it
        when its weights do not make a trained sequence classifier."""
        from transformers import AutoModelForSequenceClassification

        check_reward_model(name_or_path, trust_remote_code)
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                name_or_path, dtype=dtype, trust_remote_code=trust_remote_code,
                output_loading_info=True, **hub_access(name_or_path))
        except (OSError, ValueError) as error:
            raise _load_error("reward model", name_or_path, error) from None
        if info["missing_keys"]:
            missing = sorted(info["missing_keys"])
            raise ModelLoadError(f"--reward_model {name_or_path!r} lacks {len(missing)} weights "
                                 f"(e.g. {missing[0]}): it is not a trained sequence classifier")
        tokenizer = load_tokenizer(name_or_path, trust_remote_code)
        if model.config.pad_token_id is None:  # batches need it to find each row's last token
            model.config.pad_token_id = tokenizer.pad_token_id
        return cls(REWARD_MODEL_PREFIX + name_or_path, model.to(device).eval(), tokenizer,
                   batch_size)

    def texts(self, prompts: Sequence[Prompt], replies: Sequence[str]) -> list[str]:
        """Each (prompt, reply) as the text the reward model reads."""
        templated = bool(getattr(self.tokenizer, "chat_template", None))
        texts = []
        for prompt, reply in zip(prompts, replies, strict=True):
            messages = [*as_messages(prompt), {"role": "assistant", "content": reply}]
            texts.append(self.tokenizer.apply_chat_template(messages, tokenize=False)
                         if templated else render_prompt(self.tokenizer, messages[:-1], False)
                         + reply)
        return texts

    @torch.no_grad()
    def score(self, prompts: Sequence[Prompt], replies: Sequence[str]) -> list[float]:
        texts = self.texts(prompts, replies)
        templated = bool(getattr(self.tokenizer, "chat_template", None))
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        scores = [0.0] * len(texts)
        device = next(self.model.parameters()).device
        for start in range(0, len(order), self.batch_size):
            indices = order[start:start + self.batch_size]
            encoded = self.tokenizer([texts[i] for i in indices], padding=True,
                                     add_special_tokens=not templated, return_tensors="pt")
            logits = self.model(**encoded.to(device)).logits
            for i, value in zip(indices, logits[:, 0].float().tolist(), strict=True):
                scores[i] = value
        return scores


def check_reward_model(name_or_path: str, trust_remote_code: bool = False) -> None:
    """From its configuration alone (before any reply is generated): ModelLoadError naming the
    model when it cannot be found, is not a sequence classifier (e.g. a causal LM, whose score
    head would be random) or gives more than one output."""
    from transformers import AutoConfig

    where = f"--reward_model {name_or_path!r}"
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code,
                                            **hub_access(name_or_path))
    except (OSError, ValueError) as error:
        raise _load_error("reward model", name_or_path, error) from None
    architectures = config.architectures or []
    if architectures and not any(a.endswith("ForSequenceClassification")
                                 for a in architectures):
        raise ModelLoadError(
            f"{where} is a {', '.join(architectures)}, not a sequence classifier: a reward model "
            "is an AutoModelForSequenceClassification with one output (its score head would be "
            "random here)")
    if config.num_labels != 1:
        raise ModelLoadError(f"{where} has {config.num_labels} outputs; a reward model gives "
                             "one score per reply")


def judge_summary(reference_scores: Sequence[float], policy_scores: Sequence[float],
                  reference_lengths: Sequence[int],
                  policy_lengths: Sequence[int]) -> dict[str, float | int | list[float]]:
    """Mean scores, wins / ties / losses of the policy, its win rate with the 95% Wilson
    interval, and the length-controlled win rate with its length coefficient."""
    outcomes = wins(policy_scores, reference_scores)
    rate = float(outcomes.mean())
    differences = np.asarray(policy_lengths, float) - np.asarray(reference_lengths, float)
    controlled, coefficient = length_controlled_win_rate(outcomes, differences)
    return {
        "reference_mean": float(np.mean(reference_scores)),
        "policy_mean": float(np.mean(policy_scores)),
        "wins": int((outcomes == 1).sum()),
        "ties": int((outcomes == 0.5).sum()),
        "losses": int((outcomes == 0).sum()),
        "win_rate": rate,
        "win_rate_ci95": list(wilson_interval(rate, len(outcomes))),
        "lc_win_rate": controlled,
        "length_coefficient": coefficient,
    }
