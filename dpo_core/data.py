"""Load preference data and normalise every row into a `PreferencePair`.

Accepted row shapes (any extra columns are ignored):

- UltraFeedback: `prompt` string, `chosen` / `rejected` message lists ending with the
  assistant reply (`[user, assistant]`). The turns before the final reply must be the same
  in both lists and become the prompt messages; the `prompt` column is then redundant.
- Standard: `prompt`, `chosen`, `rejected` plain strings. The prompt stays a string.
- Conversational: `prompt` a message list (optional system message first, then user and
  assistant turns alternating, ending with a user turn); `chosen` / `rejected` hold only the
  assistant reply (a one-message list, or a plain string).
- HH (Anthropic hh-rlhf): no `prompt` column; `chosen` / `rejected` are whole dialogues
  `"\\n\\nHuman: ...\\n\\nAssistant: ..."`. The prompt is the shared beginning up to and
  including the last `"\\n\\nAssistant:"`. Without a chat template that text and the
  remainders are used exactly as written (`raw_text`). With a template the prompt is parsed
  into messages, each "Human:" turn a user message and each "Assistant:" turn an assistant
  message (content stripped of surrounding whitespace), and the replies are the remainders less
  the one space that follows "Assistant:".

A row that breaks these rules raises `DataError` naming the source, the row index (in the
dataset as stored, before shuffling) and the field. `load_pairs(skip_bad_rows=True)` drops
such rows instead and counts the reasons. A pair whose chosen and rejected replies are
identical carries no preference (its DPO gradient is zero): it is always dropped and counted,
never an error.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import datasets
import numpy as np

ROLES = ("system", "user", "assistant")
HH_ASSISTANT = "\n\nAssistant:"
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
IDENTICAL_REPLIES = "chosen and rejected are identical"

# Reason -> number of rows dropped for it.
DropCounts = Counter[str]

T = TypeVar("T")


class DataError(ValueError):
    """Bad input data; the message names the source (file or dataset), row index and field.

    `reason` is the same problem without the row index, for counting dropped rows.
    """

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


@dataclass(frozen=True)
class PreferencePair:
    """One preference example.

    `prompt` is either a message list (roles system/user/assistant, ending with a user turn)
    or plain text; `chosen` and `rejected` are the two assistant replies as text. `raw_text`
    (HH rows only): (prompt, chosen, rejected) exactly as the dataset writes them, used instead
    when no chat template applies. `origin` names the row in error messages ("file: row N").
    """

    prompt: list[dict[str, str]] | str
    chosen: str
    rejected: str
    raw_text: tuple[str, str, str] | None = None
    origin: str = dataclasses.field(default="", compare=False)


Fail = Callable[[str, str], DataError]


def load_rows(name_or_path: str, split: str = "train") -> datasets.Dataset:
    """Load raw rows from a local file or `save_to_disk` directory, else from the Hub.

    Local files (.json, .jsonl, .csv, .parquet) hold a single split, so `split` only applies
    to `save_to_disk` directories holding a `DatasetDict` and to Hub datasets.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _load_saved_dataset(path, split)
    if path.is_file():
        file_format = FILE_FORMATS.get(path.suffix.lower())
        if file_format is None:
            raise DataError(
                f"{path}: unsupported file type {path.suffix!r} "
                f"(use {', '.join(FILE_FORMATS)} or a save_to_disk directory)"
            )
        try:
            return datasets.load_dataset(file_format, data_files=str(path), split="train")
        except datasets.exceptions.DatasetGenerationError as error:
            cause = error.__cause__ or error
            raise DataError(f"{path}: cannot read it as {file_format}: {cause}") from None
    if _looks_like_local_path(name_or_path):
        raise DataError(f"{name_or_path}: no such file or directory")
    try:
        return datasets.load_dataset(name_or_path, split=split)
    except OSError as error:  # ConnectionError, offline mode, dataset not found
        raise DataError(
            f"Could not load dataset '{name_or_path}' from the Hugging Face Hub "
            f"({type(error).__name__}: {_first_line(error)}). "
            "Pass a local file or directory instead, or use --demo."
        ) from None
    except ValueError as error:  # e.g. an unknown split
        raise DataError(f"dataset '{name_or_path}': {_first_line(error)}") from None


def to_pair(row: Mapping[str, Any], index: int, source: str) -> PreferencePair:
    """Validate one raw row (any accepted shape) and normalise it; raises `DataError`."""

    def fail(field: str, problem: str) -> DataError:
        message = f"{source}: row {index}, field '{field}': {problem}"
        return DataError(message, reason=f"{field}: {problem}")

    for field in ("chosen", "rejected"):
        if field not in row:
            raise fail(field, "is missing")
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


def load_pairs(
    name_or_path: str,
    *,
    split: str = "train",
    num_samples: int | None,
    seed: int,
    skip_bad_rows: bool,
) -> tuple[list[PreferencePair], DropCounts]:
    """Seeded shuffle of all rows, keep the first `num_samples` (None or <= 0: all), normalise.

    Only the sampled rows are converted to Python objects. Returns the pairs and the counts of
    dropped rows by reason (bad rows when `skip_bad_rows`, and identical replies).
    """
    rows = load_rows(name_or_path, split)
    source = str(name_or_path)
    if len(rows) == 0:
        raise DataError(f"{source}: the dataset has no rows")
    missing = [c for c in ("chosen", "rejected") if c not in rows.column_names]
    if missing:
        raise DataError(
            f"{source}: no column {', '.join(map(repr, missing))} "
            f"(columns: {', '.join(rows.column_names)})"
        )
    order = np.random.default_rng(seed).permutation(len(rows))
    if num_samples is not None and num_samples > 0:
        order = order[:num_samples]
    columns = [c for c in ("prompt", "chosen", "rejected") if c in rows.column_names]
    sampled = rows.select_columns(columns).select(order).to_list()

    pairs: list[PreferencePair] = []
    drops: DropCounts = Counter()
    for index, row in zip(order.tolist(), sampled, strict=True):
        try:
            pair = dataclasses.replace(to_pair(row, index, source), origin=f"{source}: row {index}")
        except DataError as error:
            if not skip_bad_rows:
                raise
            drops[error.reason] += 1
            continue
        if pair.chosen == pair.rejected:
            drops[IDENTICAL_REPLIES] += 1
            continue
        pairs.append(pair)
    if not pairs:
        raise DataError(
            f"{source}: no usable pairs among {len(order)} rows (dropped: {dict(drops)})"
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


def _load_saved_dataset(path: Path, split: str) -> datasets.Dataset:
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(f"{path}: not a directory written by datasets' save_to_disk") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: no split {split!r} (splits: {', '.join(loaded)})")
        return loaded[split]
    return loaded


def _looks_like_local_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else that does not exist is a typo'd path.
    return (
        Path(name).suffix.lower() in FILE_FORMATS
        or name.startswith(("/", ".", "~"))
        or name.count("/") > 1
        or "\\" in name
    )


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


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
