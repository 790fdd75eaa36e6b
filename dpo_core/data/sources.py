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
from collections.abc import Callable, Iterator, Mapping, Sequence
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
        if file_format == "csv":
            return _read_csv(str(name_or_path), read_utf8(path), skip_bad_rows)
        return _read_json(str(name_or_path), path, skip_bad_rows)
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


def read_utf8(path: Path) -> str:
    """The file's text (a UTF-8 byte-order mark dropped); names the first byte that is not
    UTF-8 by line and column."""
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(_no_rows(path, raw))
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        column = error.start - raw.rfind(b"\n", 0, error.start)
        raise _not_utf8(path, line, column, raw[error.start]) from None


def _no_rows(path: Path, raw: bytes) -> str:
    return f"{path}: the file is empty" if not raw else \
        f"{path}: the file holds only blank lines, no rows"


def _not_utf8(path: Path, line: int, column: int, byte: int) -> DataError:
    return DataError(f"{path}: line {line}, column {column}: byte 0x{byte:02x} is not UTF-8; "
                     "save the file with UTF-8 encoding")


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of each line of a UTF-8 file that is not blank, read one
    line at a time (a large file is never held whole). Lines end at "\\n" only (never at
    U+2028 inside a string); the first non-UTF-8 byte is a `DataError` by line and column, a
    file without a non-blank line one saying so."""
    seen_text, size = False, path.stat().st_size
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            raw = raw.removesuffix(b"\n")
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise _not_utf8(path, number, error.start + 1, raw[error.start]) from None
            seen_text = True
            yield number, text
    if not seen_text:
        raise DataError(_no_rows(path, b"" if not size else b" "))


def _starts_with_array(path: Path) -> bool:
    """Whether the first character that is not whitespace (or a byte-order mark) is '['."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            head = chunk.lstrip(b"\xef\xbb\xbf \t\r\n")
            if head:
                return head.startswith(b"[")
    return False


class _BadLines:
    """Lines that do not parse: the first (in file order) is an error, or with skip_bad_rows
    each is dropped and counted by reason."""

    def __init__(self, name: str, skip: bool):
        self.name, self.skip, self.dropped = name, skip, Counter()

    def add(self, where: str, reason: str, detail: str = "") -> None:
        if not self.skip:
            raise bad_row(f"{self.name}: {where}", reason, detail)
        self.dropped[reason] += 1


def bad_row(location: str, reason: str, detail: str = "") -> DataError:
    """A row that does not parse, named by its location; `reason` is what drops count."""
    return DataError(f"{location}: {reason}{detail} (--skip_bad_rows drops such rows)",
                     reason=reason)


NOT_AN_OBJECT = "not a JSON object"


def _not_an_object(value: Any) -> str:
    return (f" (got {_json_type(value)}; one row per object, with 'prompt', 'chosen' and "
            "'rejected' keys)")


def _read_json(name: str, path: Path, skip_bad_rows: bool) -> RowSource:
    """A JSON array of row objects, or JSON Lines (one object per line, blank lines allowed);
    rows keep only the columns DPO reads, so a large file holds little memory."""
    bad = _BadLines(name, skip_bad_rows)
    if _starts_with_array(path):
        entries = _json_array_entries(name, read_utf8(path))
    else:
        entries = _json_lines_entries(name, path, bad)
    rows, locations, columns = [], [], {}
    for where, value in entries:
        if not isinstance(value, dict):
            bad.add(where, NOT_AN_OBJECT, _not_an_object(value))
            continue
        columns.update(dict.fromkeys(value))
        rows.append({k: value[k] for k in DPO_COLUMNS if k in value})
        locations.append(where)
    if not rows and not bad.dropped:
        raise DataError(f"{name}: the file holds no rows (an empty JSON array)")
    return RowSource(name, rows, list(columns), locations, bad.dropped)


def _json_lines_entries(name: str, path: Path, bad: _BadLines) -> Iterator[tuple[str, Any]]:
    for number, line in text_lines(path):
        try:
            yield f"line {number}", json.loads(line)
        except json.JSONDecodeError as error:
            if number == 1 and _is_one_json_document(read_utf8(path)):
                raise DataError(
                    f"{name}: one JSON object spanning several lines; expected a JSON array "
                    "of rows ([{...}, {...}]) or JSON Lines (one row object per line)"
                ) from None
            bad.add(f"line {number}", NOT_JSON, _json_error(error))


NOT_JSON = "not valid JSON"


def _json_error(error: json.JSONDecodeError) -> str:
    return f" ({error.msg} at column {error.colno})"


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


# -- streaming: rows one at a time ----------------------------------------------------------

# Rows converted per call when streaming a dataset that `load_rows` reads.
_STREAM_BLOCK = 1024


def stream_rows(name_or_path: str, split: str, keep: Callable[[int], bool], *,
                skip_bad_rows: bool = False) -> Iterator[tuple[str, Any]]:
    """(location, row) of each row whose 0-based index `keep` accepts, in file order, never
    holding the whole dataset as Python objects.

    A JSON Lines file is read line by line, and its row is the line's text, parsed by
    `parse_row` only where it is used; a Hub dataset comes through `datasets`' streaming;
    other local files and save_to_disk directories are read by `load_rows` (Parquet and
    Arrow memory-mapped) and converted a block at a time.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file() and DATA_FILE_FORMATS.get(path.suffix.lower()) == "json" \
            and not _starts_with_array(path):
        for index, (number, text) in enumerate(text_lines(path)):
            if keep(index):
                yield f"{name_or_path}: line {number}", text
        return
    if path.exists() or looks_like_local_path(name_or_path):
        source = load_rows(name_or_path, split, skip_bad_rows=skip_bad_rows)
        for start in range(0, len(source), _STREAM_BLOCK):
            indices = [i for i in range(start, min(start + _STREAM_BLOCK, len(source)))
                       if keep(i)]
            for index, row in zip(indices, source.take(indices), strict=True):
                yield f"{source.name}: {source.location(index)}", row
        return
    try:
        rows = datasets.load_dataset(name_or_path, split=split, streaming=True)
    except (OSError, ValueError) as error:
        raise DataError(f"Could not stream dataset '{name_or_path}' ({type(error).__name__}: "
                        f"{first_line(error)})") from None
    for index, row in enumerate(rows):
        if keep(index):
            yield f"{name_or_path}: row {index + 1}", {k: row[k] for k in DPO_COLUMNS
                                                       if k in row}


def parse_row(location: str, row: Any) -> Mapping[str, Any]:
    """A row `stream_rows` gave: a JSON line parsed (the columns DPO reads), any other row
    as it is; a line that is not a JSON object is a `DataError` (see `bad_row`)."""
    if not isinstance(row, str):
        return row
    try:
        value = json.loads(row)
    except json.JSONDecodeError as error:
        raise bad_row(location, NOT_JSON, _json_error(error)) from None
    if not isinstance(value, dict):
        raise bad_row(location, NOT_AN_OBJECT, _not_an_object(value))
    return {k: value[k] for k in DPO_COLUMNS if k in value}
