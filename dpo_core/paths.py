"""Local paths and Hugging Face Hub ids: the one rule that tells them apart.

A model, adapter or dataset argument may be either. Hub ids are "name" or "owner/name"; a value
that starts with '/', '.' or '~', has more than one '/', a backslash, or a data-file suffix is a
local path, so a missing one is reported as a missing path instead of a failed download.
"""

from __future__ import annotations

from pathlib import Path

# The local data files `dpo_core.data.sources` reads, by suffix.
DATA_FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def looks_like_local_path(name: str) -> bool:
    """Whether `name` names a local file or directory rather than a Hub id."""
    return (
        Path(name).suffix.lower() in DATA_FILE_FORMATS
        or name.startswith(("/", ".", "~"))
        or name.count("/") > 1
        or "\\" in name
    )
