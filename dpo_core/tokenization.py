"""Turn preference pairs into token ids, truncate them, and collate them into padded batches.

Prompt / response boundary (found in token space):
    The prompt is rendered to text P (chat template with the generation prompt, or plain text),
    then P, P + chosen and P + rejected are tokenized. The prompt ids are the longest common
    prefix of all three, and each response's ids are the rest of its joint tokenization, plus
    EOS unless it already ends with EOS. So prompt + response ids are exactly the tokenization of
    the full text, chosen and rejected share identical prompt ids, and every response label is a
    response token. Byte-level BPE can merge the end of P into the first response token (P ending
    with a space, then "the" -> " the"); that token then belongs to the response, so the few
    prompt characters it carries get a label too (in both responses alike).
    Text rendered by a chat template is tokenized without special tokens (the template writes BOS
    itself if it wants one); plain text gets the tokenizer's usual special tokens. Those sit only
    at the ends of the text, never at the boundary: a leading BOS is part of the common prefix,
    and a trailing EOS added to P alone is not.

Truncation, when prompt + longest response exceeds `max_length`:
    1. the prompt is cut to its last `max_prompt_length` tokens (prompts keep their end);
    2. both responses are cut to their first `max_length - len(prompt)` tokens (responses keep
       their start; a cut response loses its EOS).
    A pair where a response would be left with no tokens is dropped (`tokenize_pair` returns
    None, `tokenize_pairs` counts it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from dpo_core.data import PreferencePair

IGNORE_INDEX = -100
CHAT_TEMPLATE_MODES = ("auto", "none")


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one pair; `chosen_ids` / `rejected_ids` are response tokens + EOS.

    EOS is missing only where truncation cut it, or if the tokenizer has no EOS token.
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def resolve_chat_template(tokenizer: PreTrainedTokenizerBase, mode: str) -> bool:
    """Whether to apply the chat template: mode "auto" (if the tokenizer has one) or "none"."""
    if mode not in CHAT_TEMPLATE_MODES:
        raise ValueError(f"chat template mode must be one of {CHAT_TEMPLATE_MODES}, got {mode!r}")
    return mode == "auto" and bool(getattr(tokenizer, "chat_template", None))


def render_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: list[dict[str, str]] | str, use_chat_template: bool
) -> str:
    """The prompt as text, ending where the assistant's reply begins.

    With the chat template a plain-text prompt becomes one user message. Without it, a plain
    text prompt is used as is and messages become "role: content" lines then "assistant: ".
    """
    if use_chat_template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if isinstance(prompt, str):
        return prompt
    return "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant: "


def tokenize_pair(
    tokenizer: PreTrainedTokenizerBase,
    pair: PreferencePair,
    *,
    max_length: int,
    max_prompt_length: int,
    use_chat_template: bool,
) -> TokenizedPair | None:
    """Tokenize and truncate one pair (rules in the module docstring); None if it is dropped."""
    if max_length <= 0 or max_prompt_length <= 0:
        raise ValueError(
            f"max_length and max_prompt_length must be positive, "
            f"got {max_length} and {max_prompt_length}"
        )
    prompt_text = render_prompt(tokenizer, pair.prompt, use_chat_template)
    prompt_ids, chosen_full, rejected_full = tokenizer(
        [prompt_text, prompt_text + pair.chosen, prompt_text + pair.rejected],
        add_special_tokens=not use_chat_template,
    )["input_ids"]
    boundary = min(
        _common_prefix_length(prompt_ids, chosen_full),
        _common_prefix_length(prompt_ids, rejected_full),
    )
    prompt_ids = prompt_ids[:boundary]
    chosen_ids = _with_eos(chosen_full[boundary:], tokenizer.eos_token_id)
    rejected_ids = _with_eos(rejected_full[boundary:], tokenizer.eos_token_id)

    if len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)) > max_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
        response_budget = max_length - len(prompt_ids)
        if response_budget <= 0:
            return None
        chosen_ids = chosen_ids[:response_budget]
        rejected_ids = rejected_ids[:response_budget]
    return TokenizedPair(prompt_ids, chosen_ids, rejected_ids)


def tokenize_pairs(
    tokenizer: PreTrainedTokenizerBase,
    pairs: Iterable[PreferencePair],
    *,
    max_length: int,
    max_prompt_length: int,
    use_chat_template: bool,
    desc: str = "Tokenizing",
    disable: bool | None = None,
) -> tuple[list[TokenizedPair], int]:
    """Tokenize every pair; returns the kept pairs and how many were dropped by truncation.

    `disable` hides the progress bar (None: hidden when stderr is not a terminal).
    """
    kept: list[TokenizedPair] = []
    dropped = 0
    for pair in tqdm(pairs, desc=desc, unit="pair", disable=disable):
        tokenized = tokenize_pair(
            tokenizer,
            pair,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            use_chat_template=use_chat_template,
        )
        if tokenized is None:
            dropped += 1
        else:
            kept.append(tokenized)
    return kept, dropped


class PreferenceCollator:
    """Pads a list of `TokenizedPair` into a batch of chosen and rejected sequences.

    Returns `chosen_input_ids`, `chosen_attention_mask`, `chosen_labels` and the same for
    `rejected_*`, all [B, T] with one T for chosen and rejected (so they stack into 2B rows);
    labels are the input ids on response tokens and -100 on prompt and padding. Also
    `prompt_lengths` [B] (long): prompt tokens per pair, padding not counted.
    """

    def __init__(
        self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None
    ):
        if not isinstance(pad_token_id, int):
            raise ValueError(f"pad_token_id must be an int, got {pad_token_id!r}")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if pad_to_multiple_of is not None and pad_to_multiple_of <= 0:
            raise ValueError(f"pad_to_multiple_of must be positive, got {pad_to_multiple_of}")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, pairs: Sequence[TokenizedPair]) -> dict[str, torch.Tensor]:
        if not pairs:
            raise ValueError("cannot collate an empty batch")
        # Rows 0..B-1 are chosen, B..2B-1 rejected: (prompt, response) per row.
        rows = [(p.prompt_ids, p.chosen_ids) for p in pairs]
        rows += [(p.prompt_ids, p.rejected_ids) for p in pairs]
        width = max(len(prompt) + len(response) for prompt, response in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of

        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for row, (prompt, response) in enumerate(rows):
            length = len(prompt) + len(response)
            start = 0 if self.padding_side == "right" else width - length
            input_ids[row, start : start + length] = torch.tensor(prompt + response)
            attention_mask[row, start : start + length] = 1
            labels[row, start + len(prompt) : start + length] = torch.tensor(response)

        b = len(pairs)
        return {
            "chosen_input_ids": input_ids[:b],
            "chosen_attention_mask": attention_mask[:b],
            "chosen_labels": labels[:b],
            "rejected_input_ids": input_ids[b:],
            "rejected_attention_mask": attention_mask[b:],
            "rejected_labels": labels[b:],
            "prompt_lengths": torch.tensor([len(p.prompt_ids) for p in pairs], dtype=torch.long),
        }


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length


def _with_eos(ids: list[int], eos_token_id: int | None) -> list[int]:
    if eos_token_id is None or (ids and ids[-1] == eos_token_id):
        return ids
    return ids + [eos_token_id]
