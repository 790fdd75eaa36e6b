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

import csv
import dataclasses
import io
import json
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import datasets
import numpy as np

from dpo_core.errors import UserError, first_line

ROLES = ("system", "user", "assistant")
HH_ASSISTANT = "\n\nAssistant:"
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
# The columns a preference row is read from; any others are never converted.
DPO_COLUMNS = ("prompt", "chosen", "rejected")
FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
IDENTICAL_REPLIES = "chosen and rejected are identical"

# Reason -> number of rows dropped for it.
DropCounts = Counter[str]

T = TypeVar("T")


class DataError(UserError, ValueError):
    """Bad input data; the message names the source (file or dataset), row and field.

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
    when no chat template applies. `origin` names the row in error messages ("pairs.jsonl: line 7").
    """

    prompt: list[dict[str, str]] | str
    chosen: str
    rejected: str
    raw_text: tuple[str, str, str] | None = None
    origin: str = dataclasses.field(default="", compare=False)


Fail = Callable[[str, str], DataError]


COLUMNS_HELP = "expected 'chosen' and 'rejected', and 'prompt' unless the rows are HH dialogues"


@dataclass
class RowSource:
    """The raw rows of one dataset in file order, and where a user finds each of them.

    `rows` holds dicts (JSON, JSONL and CSV files, read here so that a key that is missing
    stays missing) or is a `datasets.Dataset` (Parquet, save_to_disk, Hub). `locations[i]`
    names row i as the user's editor or spreadsheet shows it, e.g. "line 7" (None: "row i+1");
    `dropped` counts the rows that could not even be parsed and were skipped (only with
    skip_bad_rows).
    """

    name: str
    rows: Sequence[Mapping[str, Any]]
    columns: list[str]
    locations: Sequence[str] | None = None
    dropped: DropCounts = dataclasses.field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.rows)

    def location(self, index: int) -> str:
        return self.locations[index] if self.locations is not None else f"row {index + 1}"

    def take(self, indices: Sequence[int]) -> list[Mapping[str, Any]]:
        """The rows at `indices` as Python objects (only these rows, and only the columns DPO
        reads, are converted)."""
        if isinstance(self.rows, datasets.Dataset):
            columns = [c for c in DPO_COLUMNS if c in self.columns]
            return self.rows.select_columns(columns).select(indices).to_list()
        return [self.rows[i] for i in indices]


def load_rows(name_or_path: str, split: str = "train", *, skip_bad_rows: bool = False) -> RowSource:
    """Load raw rows from a local file or `save_to_disk` directory, else from the Hub.

    Local files (.json, .jsonl, .csv, .parquet) hold a single split, so `split` only applies
    to `save_to_disk` directories holding a `DatasetDict` and to Hub datasets. A JSON line or a
    CSV row that cannot be parsed raises `DataError`, or with `skip_bad_rows` is dropped and
    counted in `RowSource.dropped`.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _dataset_source(str(name_or_path), _load_saved_dataset(path, split))
    if path.is_file():
        file_format = FILE_FORMATS.get(path.suffix.lower())
        if file_format is None:
            raise DataError(
                f"{path}: unsupported file type {path.suffix!r} "
                f"(use {', '.join(FILE_FORMATS)} or a save_to_disk directory)"
            )
        if file_format == "parquet":
            return _dataset_source(str(name_or_path), _load_parquet(path))
        text = _read_utf8(path)
        read = _read_csv if file_format == "csv" else _read_json
        return read(str(name_or_path), text, skip_bad_rows)
    if _looks_like_local_path(name_or_path):
        raise DataError(f"{name_or_path}: no such file or directory")
    try:
        rows = datasets.load_dataset(name_or_path, split=split)
    except OSError as error:  # ConnectionError, offline mode, dataset not found
        raise DataError(
            f"Could not load dataset '{name_or_path}' from the Hugging Face Hub "
            f"({type(error).__name__}: {first_line(error)}). "
            "Pass a local file or directory instead, or use --demo."
        ) from None
    except ValueError as error:  # e.g. an unknown split
        raise DataError(f"dataset '{name_or_path}': {first_line(error)}") from None
    return _dataset_source(name_or_path, rows)


def _dataset_source(name: str, rows: datasets.Dataset) -> RowSource:
    return RowSource(name, rows, list(rows.column_names))


def _load_parquet(path: Path) -> datasets.Dataset:
    try:
        return datasets.load_dataset("parquet", data_files=str(path), split="train")
    except (datasets.exceptions.DatasetGenerationError, OSError, ValueError) as error:
        cause = error.__cause__ or error
        raise DataError(f"{path}: cannot read it as Parquet: {first_line(cause)}") from None


def _read_utf8(path: Path) -> str:
    """The file's text (a UTF-8 byte-order mark dropped); names the first byte that is not
    UTF-8 by line and column."""
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path}: the file is empty" if not raw else
                        f"{path}: the file holds only blank lines, no rows")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        column = error.start - raw.rfind(b"\n", 0, error.start)
        raise DataError(
            f"{path}: line {line}, column {column}: byte 0x{raw[error.start]:02x} is not UTF-8; "
            "save the file with UTF-8 encoding"
        ) from None


class _BadLines:
    """Lines that do not parse: the first (in file order) is an error, or with skip_bad_rows
    each is dropped and counted by reason."""

    def __init__(self, name: str, skip: bool):
        self.name, self.skip, self.dropped = name, skip, Counter()

    def add(self, where: str, reason: str, detail: str = "") -> None:
        if not self.skip:
            raise DataError(
                f"{self.name}: {where}: {reason}{detail} (--skip_bad_rows drops such rows)")
        self.dropped[reason] += 1


def _read_json(name: str, text: str, skip_bad_rows: bool) -> RowSource:
    """A JSON array of row objects, or JSON Lines (one object per line, blank lines allowed);
    rows keep only the columns DPO reads, so a large file holds little memory."""
    bad = _BadLines(name, skip_bad_rows)
    if text.lstrip().startswith("["):
        entries = _json_array_entries(name, text)
    else:
        entries = _json_lines_entries(name, text, bad)
    rows, locations, columns = [], [], {}
    for where, value in entries:
        if not isinstance(value, dict):
            bad.add(where, "not a JSON object", f" (got {_json_type(value)}; one row per "
                    "object, with 'prompt', 'chosen' and 'rejected' keys)")
            continue
        columns.update(dict.fromkeys(value))
        rows.append({k: value[k] for k in DPO_COLUMNS if k in value})
        locations.append(where)
    if not rows and not bad.dropped:
        raise DataError(f"{name}: the file holds no rows (an empty JSON array)")
    return RowSource(name, rows, list(columns), locations, bad.dropped)


def _json_lines_entries(name: str, text: str, bad: _BadLines) -> list[tuple[str, Any]]:
    entries = []
    # Split on newlines only: str.splitlines would also split on U+2028 inside a string.
    lines = text.split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entries.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as error:
            if number == 1 and _is_one_json_document(text):
                raise DataError(
                    f"{name}: one JSON object spanning several lines; expected a JSON array "
                    "of rows ([{...}, {...}]) or JSON Lines (one row object per line)"
                ) from None
            bad.add(f"line {number}", "not valid JSON", f" ({error.msg} at column {error.colno})")
    return entries


def _is_one_json_document(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _json_array_entries(name: str, text: str) -> list[tuple[str, Any]]:
    """Each element of a top-level JSON array with the line it starts on. A syntax error
    anywhere is a whole-file error: past it, where rows begin and end is unknown."""
    decoder = json.JSONDecoder()
    entries = []
    position = text.index("[") + 1
    line, counted_to = 1, 0

    def skip_space(at: int) -> int:
        while at < len(text) and text[at] in " \t\r\n":
            at += 1
        return at

    def fail(at: int, problem: str) -> DataError:
        line_number = text.count("\n", 0, at) + 1
        column = at - (text.rfind("\n", 0, at) + 1) + 1
        return DataError(f"{name}: line {line_number}, column {column}: {problem}")

    position = skip_space(position)
    if text.startswith("]", position):
        return entries
    while True:
        line += text.count("\n", counted_to, position)
        counted_to = position
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise fail(error.pos, f"not valid JSON ({error.msg})") from None
        entries.append((f"line {line}", value))
        position = skip_space(position)
        if text.startswith("]", position):
            break
        if not text.startswith(",", position):
            raise fail(position, "not valid JSON (expected ',' or ']' after an array element)")
        position = skip_space(position + 1)
    if text[position + 1:].strip():
        raise fail(skip_space(position + 1), "not valid JSON (extra data after the array)")
    return entries


def _json_type(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _read_csv(name: str, text: str, skip_bad_rows: bool) -> RowSource:
    """Rows numbered as a spreadsheet shows them: the header is row 1, blank rows count."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
        records = list(reader)
    except csv.Error as error:
        raise DataError(f"{name}: line {reader.line_num}: not valid CSV ({error})") from None
    bad = _BadLines(name, skip_bad_rows)
    rows, locations = [], []
    for number, record in enumerate(records, start=2):
        if not record:
            continue
        where = f"row {number} (header = row 1)"
        if len(record) != len(header):
            bad.add(where, "wrong number of fields",
                    f" ({len(record)}; the header has {len(header)})")
            continue
        rows.append(dict(zip(header, record, strict=True)))
        locations.append(where)
    if not rows and not bad.dropped:
        raise DataError(f"{name}: the file holds a header ({', '.join(header)}) but no rows")
    return RowSource(name, rows, header, locations, bad.dropped)


def to_pair(
    row: Mapping[str, Any], location: str, *, prompt_column: bool | None = None
) -> PreferencePair:
    """Validate one raw row (any accepted shape) and normalise it; raises `DataError`.

    `location` names the row for the user ("pairs.jsonl: line 7"). `prompt_column` says
    whether the dataset has a 'prompt' column: a row without the key is then missing its
    prompt rather than an HH dialogue (None: decide from this row alone).
    """

    def fail(field: str, problem: str) -> DataError:
        message = f"{location}, field '{field}': {problem}"
        return DataError(message, reason=f"{field}: {problem}")

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
