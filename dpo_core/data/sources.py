"""Raw rows of a dataset, in file order, with where a user finds each one.

`load_rows` reads a local JSON, JSON Lines, CSV or Parquet file, a `datasets.save_to_disk`
directory, or a Hub dataset, into a `RowSource`: the rows (only the columns DPO reads are ever
converted to Python objects) and, for each, its location as an editor or a spreadsheet shows it
("line 7", "row 3 (header = row 1)"). A file that cannot be read at all is a `DataError` naming
the file and line; a line that does not parse is one too, or with `skip_bad_rows` is dropped
and counted. Turning rows into pairs is `dpo_core.data.pairs`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from dpo_core.errors import DataError, first_line
from dpo_core.paths import DATA_FILE_FORMATS, looks_like_local_path

# The columns a preference row is read from (`tools`: trl's tool schemas, optional); any
# others are never converted.
DPO_COLUMNS = ("prompt", "chosen", "rejected", "tools")


# Reason -> number of rows dropped for it.
DropCounts = Counter[str]


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
        file_format = DATA_FILE_FORMATS.get(path.suffix.lower())
        if file_format is None:
            raise DataError(
                f"{path}: unsupported file type {path.suffix!r} "
                f"(use {', '.join(DATA_FILE_FORMATS)} or a save_to_disk directory)"
            )
        if file_format == "parquet":
            return _dataset_source(str(name_or_path), _load_parquet(path))
        text = _read_utf8(path)
        read = _read_csv if file_format == "csv" else _read_json
        return read(str(name_or_path), text, skip_bad_rows)
    if looks_like_local_path(name_or_path):
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
