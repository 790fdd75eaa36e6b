"""The demo task: two-digit addition, where the preference is a rule checked in code.

The user asks ``"What is 37 + 48?"``; the preferred reply restates the sum with the right
answer, ``"37 + 48 = 85"``; the rejected one stops a digit short, ``"37 + 48 = 8"``. The
bundled base model was fine-tuned on both kinds of reply in equal parts, so before DPO it
gets the sum right on roughly half of the prompts; DPO on the preference pairs teaches it to
prefer the full answer. The same `follows_rule` judges generations before and after.

Why this mistake: two others were tried first, with the same base-model recipe. Off by one
(85 vs 86) sits next to the right answer on the number line, and DPO widened the gap the
cheap way, shifting every sum down (85 -> 84, 74): held-out accuracy peaked after a few
dozen steps, then collapsed. Digits backwards (85 vs 58) plateaued near 90%, the rest wrong
sums. A reply cut short differs from the right one only in where it ends, and no shift of
the sums separates them.

Held-out prompts are disjoint from the training prompts as *unordered* operand pairs: if
``(37, 48)`` is held out, neither ``37 + 48`` nor ``48 + 37`` is trained on, by the base
model's fine-tuning or by DPO.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from dpo_core.evaluation.judges import RuleJudge
from dpo_core.modeling.generation import generate_replies

OPERANDS = range(10, 100)  # two-digit operands keep every prompt the same shape
PROMPT_PATTERN = re.compile(r"What is (\d+) \+ (\d+)\?")

OperandPair = tuple[int, int]


def make_prompt(a: int, b: int) -> str:
    """The user's question, a plain string (the trainer applies the chat template)."""
    return f"What is {a} + {b}?"


def make_reply(a: int, b: int, answer: int | str) -> str:
    """A reply in the fixed short form, giving `answer` as the sum (right or not)."""
    return f"{a} + {b} = {answer}"


def cut_short(number: int) -> str:
    """`number` without its last digit, as a reply that stops too early writes it: 85 -> "8"."""
    return str(number)[:-1]


def make_pair(a: int, b: int) -> dict[str, str]:
    """One "standard" preference row: the right sum chosen, the sum cut short rejected."""
    return {
        "prompt": make_prompt(a, b),
        "chosen": make_reply(a, b, a + b),
        "rejected": make_reply(a, b, cut_short(a + b)),
    }


def make_pairs(operands: Iterable[OperandPair]) -> list[dict[str, str]]:
    """Preference rows for the given operand pairs, in order."""
    return [make_pair(a, b) for a, b in operands]


def split_operands(num_eval: int, seed: int) -> tuple[list[OperandPair], list[OperandPair]]:
    """Split every ordered pair of two-digit operands into (train, held-out), seeded.

    `num_eval` unordered pairs are held out; the held-out list holds one order of each
    (drawn at random), the train list every ordered pair whose unordered pair is not held
    out, shuffled. So no held-out prompt, nor its commuted twin, is ever trained on.
    """
    rng = random.Random(seed)
    unordered = [(a, b) for a in OPERANDS for b in OPERANDS if a <= b]
    rng.shuffle(unordered)
    held_out = unordered[:num_eval]
    held_out_keys = set(held_out)
    eval_operands = [(b, a) if rng.random() < 0.5 else (a, b) for a, b in held_out]
    train_operands = [
        (a, b) for a in OPERANDS for b in OPERANDS if (min(a, b), max(a, b)) not in held_out_keys
    ]
    rng.shuffle(train_operands)
    return train_operands, eval_operands


def parse_prompt(prompt: str) -> OperandPair:
    """The two operands of a demo prompt; ValueError naming the prompt if it is not one."""
    match = PROMPT_PATTERN.fullmatch(prompt.strip())
    if match is None:
        raise ValueError(f"not a demo prompt (expected 'What is A + B?'): {prompt!r}")
    return int(match.group(1)), int(match.group(2))


def follows_rule(prompt: str, response: str) -> bool:
    """True when `response` is exactly ``"A + B = <A+B>"`` for the prompt's operands.

    Surrounding whitespace is ignored; anything else (a wrong sum, extra text, another
    format) breaks the rule, so a reply cannot pass by containing the answer somewhere.
    """
    a, b = parse_prompt(prompt)
    return response.strip() == make_reply(a, b, a + b)


# The rule as a `dpo-eval` judge: `--judge rule:dpo_core.demo.task:follows_rule` scores the
# replies of the trained model and of its reference as `generation_accuracy` does.
RULE_JUDGE = RuleJudge(follows_rule, "rule:dpo_core.demo.task:follows_rule")


def generation_accuracy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 16,
    batch_size: int = 64,
) -> float:
    """Fraction of `prompts` whose greedy reply `follows_rule` (0.0 to 1.0): the mean score
    of `RULE_JUDGE`.

    Replies come from `dpo_core.modeling.generation.generate_replies`, as in `chat.py`: chat
    template applied, greedy decoding, the reply cut from the output by token ids at the first
    EOS.
    """
    if not prompts:
        raise ValueError("generation_accuracy needs at least one prompt")
    replies = generate_replies(
        model, tokenizer, list(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    return sum(RULE_JUDGE.score(prompts, replies)) / len(prompts)


def preference_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> float:
    """Fraction of pairs whose chosen score is strictly higher than the rejected one.

    Scores are shape [N], one per pair. Two uses, the same code:
    - sequence log-probs ``log pi(chosen|x)`` vs ``log pi(rejected|x)``: does the model itself
      rank the right answer above the wrong one? Meaningful before and after training.
    - implicit DPO rewards ``log pi - log pi_ref`` (see `implicit_reward_accuracy`).
    Ties count as misses (strict ``>``), as trl counts ``rewards/accuracies``.
    """
    if chosen_scores.shape != rejected_scores.shape or chosen_scores.ndim != 1:
        raise ValueError(
            f"expected two [N] tensors, got {tuple(chosen_scores.shape)} and "
            f"{tuple(rejected_scores.shape)}"
        )
    if chosen_scores.numel() == 0:
        raise ValueError("preference_accuracy needs at least one pair")
    return (chosen_scores > rejected_scores).sum().item() / chosen_scores.numel()


def implicit_reward_accuracy(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
) -> float:
    """Fraction of pairs where DPO's implicit reward ranks chosen above rejected, shape [N] each.

    The reward is ``beta * (log pi - log pi_ref)``; beta > 0 does not change the ranking, so
    it is left out. Before training the policy *is* the reference, every reward is 0 and
    this is 0.0 by the strict ``>``: it only measures something after training.
    """
    return preference_accuracy(
        policy_chosen_logps - reference_chosen_logps,
        policy_rejected_logps - reference_rejected_logps,
    )
