"""Load preference data and normalise every row into a `PreferencePair`.

Accepted row shapes (any extra columns are ignored):

- UltraFeedback: `prompt` string, `chosen` / `rejected` message lists ending with the
  assistant reply (`[user, assistant]`). The turns before the final reply must be the same
  in both lists and become the prompt messages; the `prompt` column is then redundant.
- Standard: `prompt`, `chosen`, `rejected` plain strings. The prompt stays a string.
- Conversational: `prompt` a message list (optional system message first, then user and
  assistant turns alternating, ending with a user turn); `chosen` / `rejected` hold only the
  assistant reply (a one-message list, or a plain string).
- Any of these may carry a `tools` column (trl's): the function schemas a tool-calling chat
  template renders into the prompt (`apply_chat_template(..., tools=...)`), a list of JSON
  objects or a JSON string of one; null or an empty list is no tools.
- HH (Anthropic hh-rlhf): no `prompt` column; `chosen` / `rejected` are whole dialogues
  `"\n\nHuman: ...\n\nAssistant: ..."`. The prompt is the shared beginning up to and
  including the last `"\n\nAssistant:"`. Without a chat template that text and the
  remainders are used exactly as written (`raw_text`). With a template the prompt is parsed
  into messages, each "Human:" turn a user message and each "Assistant:" turn an assistant
  message (content stripped of surrounding whitespace), and the replies are the remainders less
  the one space that follows "Assistant:".

A row that breaks these rules raises `DataError` naming the source, the row as an editor or a
spreadsheet shows it (JSON / JSONL: 1-based line; CSV: 1-based row with the header as row 1;
Parquet, save_to_disk and Hub datasets: 1-based row) and the field; of several bad rows the
first in file order is named. A whole file that cannot be read (empty, only blank lines, bytes
that are not UTF-8, a JSON document that does not parse) is a `DataError` naming the file and
line. `load_pairs(skip_bad_rows=True)` drops bad rows instead (JSON Lines that do not parse and
CSV rows with the wrong number of fields included) and counts the reasons. A pair whose
chosen and rejected replies are identical carries no preference (its DPO gradient is zero): it
is always dropped and counted, never an error.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from dpo_core.data.sources import DropCounts, load_rows
from dpo_core.errors import DataError

ROLES = ("system", "user", "assistant")

HH_ASSISTANT = "\n\nAssistant:"

HH_TURN = re.compile(r"\n\n(Human|Assistant):")

HH_ROLES = {"Human": "user", "Assistant": "assistant"}

IDENTICAL_REPLIES = "chosen and rejected are identical"

T = TypeVar("T")


@dataclass(frozen=True)
class PreferencePair:
    """One preference example.

    `prompt` is either a message list (roles system/user/assistant, ending with a user turn)
    or plain text; `chosen` and `rejected` are the two assistant replies as text. `raw_text`
    (HH rows only): (prompt, chosen, rejected) exactly as the dataset writes them, used instead
    when no chat template applies. `tools`: the row's tool (function) schemas, for the chat
    template. `origin` names the row in error messages ("pairs.jsonl: line 7").
    """

    prompt: list[dict[str, str]] | str
    chosen: str
    rejected: str
    raw_text: tuple[str, str, str] | None = None
    origin: str = dataclasses.field(default="", compare=False)
    tools: list[dict[str, Any]] | None = None


Fail = Callable[[str, str], DataError]

COLUMNS_HELP = "expected 'chosen' and 'rejected', and 'prompt' unless the rows are HH dialogues"


def to_pair(
    row: Mapping[str, Any], location: str, *, prompt_column: bool | None = None
) -> PreferencePair:
    """Validate one raw row (any accepted shape) and normalise it; raises `DataError`.

    `location` names the row for the user ("pairs.jsonl: line 7"). `prompt_column` says
    whether the dataset has a 'prompt' column: a row without the key is then missing its
    prompt rather than an HH dialogue (None: decide from this row alone).
    """

    fail = _failure(location)
    pair = _pair_of(row, fail, prompt_column)
    tools = _tools(row.get("tools"), fail)
    return dataclasses.replace(pair, tools=tools) if tools else pair


def _pair_of(row: Mapping[str, Any], fail: Fail, prompt_column: bool | None) -> PreferencePair:
    """`to_pair` without the tools."""
    for field in ("chosen", "rejected"):
        if field not in row:
            raise fail(field, "is missing")
    if prompt_column and "prompt" not in row:
        raise fail("prompt", "is missing")
    if "prompt" not in row:
        return _hh_pair(row["chosen"], row["rejected"], fail)

    prompt = row["prompt"]
    chosen_turns, chosen = _dialogue(row["chosen"], "chosen", fail)
    rejected_turns, rejected = _dialogue(row["rejected"], "rejected", fail)
    if isinstance(prompt, list):  # conversational: the prompt holds every earlier turn
        for field, turns in (("chosen", chosen_turns), ("rejected", rejected_turns)):
            if turns:
                raise fail(field, "must hold only the assistant reply when 'prompt' is a list")
        return PreferencePair(_prompt_messages(prompt, "prompt", fail), chosen, rejected)
    if chosen_turns != rejected_turns:
        raise fail("rejected", "the turns before the final reply differ from chosen's")
    if chosen_turns:  # UltraFeedback: the lists carry the conversation, `prompt` repeats it
        return PreferencePair(_check_prompt_roles(chosen_turns, "chosen", fail), chosen, rejected)
    return PreferencePair(_text(prompt, "prompt", fail), chosen, rejected)


def to_prompt(value: Any, location: str) -> list[dict[str, str]] | str:
    """A prompt on its own (e.g. a row of `dpo-eval --prompts`), validated as a pair's prompt
    is: text, or messages ending with a user turn; raises `DataError` naming `location`."""
    fail = _failure(location)
    if isinstance(value, list):
        return _prompt_messages(value, "prompt", fail)
    return _text(value, "prompt", fail)


def _failure(location: str) -> Fail:
    """The `DataError` for a field of the row at `location`."""

    def fail(field: str, problem: str) -> DataError:
        message = f"{location}, field '{field}': {problem}"
        return DataError(message, reason=f"{field}: {problem}")

    return fail


def load_pairs(
    name_or_path: str,
    *,
    split: str = "train",
    num_samples: int | None,
    seed: int,
    skip_bad_rows: bool,
) -> tuple[list[PreferencePair], DropCounts]:
    """Seeded shuffle of all rows, keep the first `num_samples` (None or <= 0: all), normalise.

    Only the sampled rows are converted to Python objects, in file order, so the bad row
    named is the first in the file; the pairs come back in shuffled order. Returns the pairs
    and the counts of dropped rows by reason (bad rows when `skip_bad_rows`, and identical
    replies).
    """
    source = load_rows(name_or_path, split, skip_bad_rows=skip_bad_rows)
    drops: DropCounts = Counter(source.dropped)
    if len(source) == 0:
        raise DataError(f"{source.name}: the dataset has no rows" + (
            f" that parse (dropped: {dict(drops)})" if drops else ""))
    missing = [c for c in ("chosen", "rejected") if c not in source.columns]
    if missing:
        raise DataError(
            f"{source.name}: no column {', '.join(map(repr, missing))} "
            f"(columns: {', '.join(source.columns)}; {COLUMNS_HELP})"
        )
    order = np.random.default_rng(seed).permutation(len(source))
    if num_samples is not None and num_samples > 0:
        order = order[:num_samples]
    in_file_order = sorted(order.tolist())
    prompt_column = "prompt" in source.columns
    converted: dict[int, PreferencePair] = {}
    for index, row in zip(in_file_order, source.take(in_file_order), strict=True):
        try:
            location = f"{source.name}: {source.location(index)}"
            pair = dataclasses.replace(to_pair(row, location, prompt_column=prompt_column),
                                       origin=location)
        except DataError as error:
            if not skip_bad_rows:
                raise
            drops[error.reason] += 1
            continue
        if pair.chosen == pair.rejected:
            drops[IDENTICAL_REPLIES] += 1
            continue
        converted[index] = pair
    pairs = [converted[i] for i in order.tolist() if i in converted]
    if not pairs:
        raise DataError(
            f"{source.name}: no usable pairs among {len(order)} rows (dropped: {dict(drops)})"
        )
    return pairs, drops


def split_pairs(pairs: Sequence[T], eval_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Seeded train/eval split; both keep the input order.

    The eval set has round(len * eval_fraction) items, at least one when the fraction is
    positive and at least one item is left for training.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    num_eval = round(len(pairs) * eval_fraction)
    if eval_fraction > 0:
        num_eval = min(max(num_eval, 1), len(pairs) - 1)
    eval_indices = set(np.random.default_rng(seed).permutation(len(pairs))[:num_eval].tolist())
    train = [p for i, p in enumerate(pairs) if i not in eval_indices]
    evaluation = [p for i, p in enumerate(pairs) if i in eval_indices]
    return train, evaluation


def _tools(value: Any, fail: Fail) -> list[dict[str, Any]] | None:
    """The `tools` column: a list of JSON objects (or a JSON string of one); None when absent,
    null or empty."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as error:
            raise fail("tools", f"is not valid JSON ({error})") from None
    if value is None or value == []:
        return None
    if not isinstance(value, list) or not all(isinstance(tool, Mapping) for tool in value):
        raise fail("tools", "must be a list of tool schemas (JSON objects), or a JSON string "
                            "of one")
    return [dict(tool) for tool in value]


def _text(value: Any, field: str, fail: Fail) -> str:
    if value is None:
        raise fail(field, "is None")
    if not isinstance(value, str):
        raise fail(field, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise fail(field, "is empty")
    return value


def _messages(value: Any, field: str, fail: Fail) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise fail(field, "must be a non-empty list of messages")
    messages = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, Mapping):
            raise fail(where, f"must be a message with 'role' and 'content', got {message!r:.40}")
        role = message.get("role")
        if role not in ROLES:
            raise fail(f"{where}.role", f"is {role!r}, expected one of {', '.join(ROLES)}")
        content = _text(message.get("content"), f"{where}.content", fail)
        messages.append({"role": role, "content": content})
    return messages


def _check_prompt_roles(
    messages: list[dict[str, str]], field: str, fail: Fail
) -> list[dict[str, str]]:
    """An optional system message, then user and assistant alternating, ending with user."""
    first_turn = 1 if messages[0]["role"] == "system" else 0
    for i in range(first_turn, len(messages)):
        expected = "user" if (i - first_turn) % 2 == 0 else "assistant"
        if messages[i]["role"] != expected:
            raise fail(
                f"{field}[{i}].role",
                f"is {messages[i]['role']!r}, expected {expected!r} (optional system message "
                "first, then user and assistant alternating)",
            )
    if messages[-1]["role"] != "user":
        raise fail(f"{field}[{len(messages) - 1}].role", "the prompt must end with a user turn")
    return messages


def _prompt_messages(value: Any, field: str, fail: Fail) -> list[dict[str, str]]:
    return _check_prompt_roles(_messages(value, field, fail), field, fail)


def _dialogue(value: Any, field: str, fail: Fail) -> tuple[list[dict[str, str]], str]:
    """A reply given as text or as messages ending with it: (earlier turns, reply text)."""
    if not isinstance(value, list):
        return [], _text(value, field, fail)
    messages = _messages(value, field, fail)
    if messages[-1]["role"] != "assistant":
        raise fail(
            f"{field}[{len(messages) - 1}].role",
            f"is {messages[-1]['role']!r}, expected 'assistant' (the last message is the reply)",
        )
    return messages[:-1], messages[-1]["content"]


def _hh_pair(chosen: Any, rejected: Any, fail: Fail) -> PreferencePair:
    chosen = _text(chosen, "chosen", fail)
    rejected = _text(rejected, "rejected", fail)
    cut = chosen.rfind(HH_ASSISTANT)
    if cut < 0:
        raise fail("chosen", "no 'prompt' column and no '\\n\\nAssistant:' turn (HH format)")
    prompt_text = chosen[: cut + len(HH_ASSISTANT)]
    if rejected.rfind(HH_ASSISTANT) != cut or not rejected.startswith(prompt_text):
        raise fail("rejected", "does not share chosen's dialogue up to the last '\\n\\nAssistant:'")

    parts = HH_TURN.split(prompt_text)  # [before, role, text, role, text, ..., "Assistant", ""]
    if parts[0].strip():
        raise fail("chosen", "text before the first '\\n\\nHuman:' turn")
    turns = [
        {"role": HH_ROLES[role], "content": text.strip()}
        for role, text in zip(parts[1:-2:2], parts[2:-2:2], strict=True)
    ]
    if not turns:
        raise fail("chosen", "no '\\n\\nHuman:' turn before the last '\\n\\nAssistant:'")
    for i, turn in enumerate(turns):
        _text(turn["content"], f"chosen turns[{i}].content", fail)
    prompt = _check_prompt_roles(turns, "chosen turns", fail)

    def reply(dialogue: str, field: str) -> str:
        text = dialogue[len(prompt_text) :]
        return _text(text[1:] if text.startswith(" ") else text, field, fail)

    raw_text = (prompt_text, chosen[len(prompt_text) :], rejected[len(prompt_text) :])
    return PreferencePair(prompt, reply(chosen, "chosen"), reply(rejected, "rejected"), raw_text)
