"""The demo's held-out evaluation, run on the base model and on the DPO-trained model.

`train.py --demo` calls `demo_evaluation(model, tokenizer)` twice after training: once inside
`model.disable_adapter()` ("before": the bundled base model) and once with the adapter on
("after"). Three numbers, all on the held-out pairs of `eval_file()`:

- ``generation_accuracy``: share of greedy replies that `follows_rule`.
- ``preference_accuracy``: share of pairs where the model gives the right reply a higher
  sequence log-prob than the reply cut short. The same code before and after, so the two
  numbers compare like with like.
- ``reward_accuracy``: share of pairs where DPO's implicit reward
  ``beta * (log pi - log pi_ref)`` ranks chosen above rejected, the reference being the base
  model (the adapter turned off). Before training the policy *is* the reference: every reward
  is exactly 0, so the number would only say "ties" (0.0 by trl's strict ``>``, 0.5 with ties
  as half). It is reported as None ("n/a") then, not as a made-up baseline.
"""

from __future__ import annotations

import json

import torch
from transformers import PreTrainedTokenizerBase

from dpo_core.data.batches import PreferenceCollator
from dpo_core.data.pairs import PreferencePair
from dpo_core.data.tokenization import tokenize_pairs
from dpo_core.demo.paths import eval_file
from dpo_core.demo.task import generation_accuracy, implicit_reward_accuracy, preference_accuracy
from dpo_core.forward.logps import concatenated_forward
from dpo_core.modeling.loading import eval_mode

# Demo pairs are about 30 tokens; these limits never cut one (checked: none may be dropped).
MAX_LENGTH, MAX_PROMPT_LENGTH = 64, 32
BATCH_SIZE = 100

METRIC_LABELS = {
    "generation_accuracy": "greedy reply follows the rule",
    "preference_accuracy": "log p(chosen) > log p(rejected)",
    "reward_accuracy": "implicit reward: chosen > rejected",
}


def load_eval_pairs() -> list[PreferencePair]:
    with eval_file().open() as f:
        return [PreferencePair(**json.loads(line)) for line in f]


@torch.no_grad()
def pair_logps(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: list[PreferencePair]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs (chosen [N], rejected [N]) under `model`, tokenized as in training."""
    tokenized, drops = tokenize_pairs(
        tokenizer,
        pairs,
        max_length=MAX_LENGTH,
        max_prompt_length=MAX_PROMPT_LENGTH,
        use_chat_template=True,
        disable=True,
    )
    if drops:
        raise ValueError(f"demo pairs dropped: {dict(drops)}")
    pad_id = tokenizer.pad_token_id
    collate = PreferenceCollator(tokenizer.eos_token_id if pad_id is None else pad_id)
    device = next(model.parameters()).device
    chosen, rejected = [], []
    with eval_mode(model):
        for start in range(0, len(tokenized), BATCH_SIZE):
            batch = collate(tokenized[start : start + BATCH_SIZE])
            chosen_logps, rejected_logps = concatenated_forward(
                model, {key: value.to(device) for key, value in batch.items()}
            )
            chosen.append(chosen_logps.cpu())
            rejected.append(rejected_logps.cpu())
    return torch.cat(chosen), torch.cat(rejected)


def demo_evaluation(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> dict:
    """Held-out metrics of `model` as it is now (module docstring), plus ``num_pairs``.

    `model` is a PEFT model, or a plain one (then ``reward_accuracy`` is None: no reference).
    Nesting `disable_adapter()` inside the trainer's own is safe: PEFT re-enables the adapter
    on exit only if it was enabled on entry.
    """
    pairs = load_eval_pairs()
    prompts = [pair.prompt for pair in pairs]
    policy_chosen, policy_rejected = pair_logps(model, tokenizer, pairs)
    reward_accuracy = None
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            reference_chosen, reference_rejected = pair_logps(model, tokenizer, pairs)
        policy_is_reference = torch.equal(policy_chosen, reference_chosen) and torch.equal(
            policy_rejected, reference_rejected
        )
        if not policy_is_reference:
            reward_accuracy = implicit_reward_accuracy(
                policy_chosen, policy_rejected, reference_chosen, reference_rejected
            )
    return {
        "generation_accuracy": generation_accuracy(model, tokenizer, prompts),
        "preference_accuracy": preference_accuracy(policy_chosen, policy_rejected),
        "reward_accuracy": reward_accuracy,
        "num_pairs": len(pairs),
    }


def format_before_after(metrics: dict) -> str:
    """The before/after table printed at the end of `train.py --demo`."""
    before, after = metrics["before"], metrics["after"]
    label_width = max(map(len, METRIC_LABELS.values()))
    lines = [
        f"Held-out prompts never trained on ({after['num_pairs']} pairs)",
        f"  {'':{label_width}}  {'before':>7}  {'after':>7}",
    ]
    for key, label in METRIC_LABELS.items():
        lines.append(f"  {label:{label_width}}  {_percent(before[key]):>7}  "
                     f"{_percent(after[key]):>7}")
    if after["reward_accuracy"] is None:  # a plain model: no adapter to switch off
        lines.append("  n/a: full fine-tuning keeps no reference model for this evaluation.")
    elif before["reward_accuracy"] is None:
        lines.append("  n/a: before training the policy is the reference, so every implicit "
                     "reward is 0.")
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"
