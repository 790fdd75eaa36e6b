"""The tokenized cache: a run's token ids saved once and found again by everything that
changes them, so a rerun, a resume or another experiment on the same data starts without
tokenizing.

An entry is a directory `<cache_dir>/<key>/` holding each split's `TokenStore` files
(`train.tokens`, `train.lengths`, `eval.*`), the eval prompts as they were (`eval_prompts.jsonl`,
for samples.md) and `manifest.json`: the key's parts, what the tokenizing run said (dropped
rows, identical pairs) so a hit says it again, and each file's size and digest. The key covers
the data (a local file's bytes, or a Hub or save_to_disk dataset's fingerprint, with the split
and the name given), the tokenizer's files and chat template, the settings that change ids or
which pairs there are, and the versions of this format, `tokenizers` and `transformers`.

An entry is written into a hidden temporary directory and renamed into place, so it is whole
or absent: a run killed while writing leaves only a `.tmp-*` directory that nothing reads. When
an entry is opened, every file's size and digest is checked; a damaged entry is a miss, removed
and rebuilt. A cache directory that cannot be written is a notice, and the run tokenizes
without a cache.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import tokenizers
import transformers
import xxhash

from dpo_core.console import logger
from dpo_core.data.sources import load_rows
from dpo_core.data.token_store import TokenStore, open_store
from dpo_core.errors import first_line
from dpo_core.paths import looks_like_local_path

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
EVAL_PROMPTS = "eval_prompts.jsonl"
SPLITS = ("train", "eval")
_READ_BLOCK = 1 << 23

# tokenizer_config.json entries that say where a tokenizer was loaded from, not what it does.
_VOLATILE_TOKENIZER_KEYS = ("is_local", "local_files_only", "name_or_path", "_commit_hash")


def default_cache_dir() -> str:
    """`dpo_tokenized` under the Hugging Face datasets cache (HF_DATASETS_CACHE)."""
    return os.path.join(str(datasets.config.HF_DATASETS_CACHE), "dpo_tokenized")


def file_digest(path: Path) -> str:
    """xxh3-128 of a file's bytes, read in blocks (the file is never held whole)."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(_READ_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def source_fingerprint(name_or_path: str, split: str) -> dict[str, Any]:
    """What identifies a dataset's rows: a local file's bytes; a save_to_disk directory's or
    a Hub dataset's `datasets` fingerprint (which changes with its files or revision)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return {"name": name_or_path, "bytes": file_digest(path)}
    if not path.is_dir() and looks_like_local_path(name_or_path):
        return {"name": name_or_path, "missing": True}  # load_pairs names the problem
    rows = load_rows(name_or_path, split).rows
    return {"name": name_or_path, "split": split,
            "fingerprint": getattr(rows, "_fingerprint", None)}


def tokenizer_fingerprint(tokenizer) -> str:
    """xxh3-128 of the files `save_pretrained` writes (vocabulary, merges, added tokens,
    normalizer, chat template, special tokens), less where it was loaded from."""
    digest = xxhash.xxh3_128()
    with tempfile.TemporaryDirectory() as directory:
        tokenizer.save_pretrained(directory)
        for name in sorted(os.listdir(directory)):
            with open(os.path.join(directory, name), "rb") as f:
                content = f.read()
            if name == "tokenizer_config.json":
                settings = json.loads(content)
                for key in _VOLATILE_TOKENIZER_KEYS:
                    settings.pop(key, None)
                content = json.dumps(settings, sort_keys=True).encode()
            digest.update(f"{name}\0{len(content)}\0".encode())
            digest.update(content)
    return digest.hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    """The entry name for `parts` (JSON-able): a digest of them, with this format's and the
    tokenizer libraries' versions."""
    versioned = {**parts, "format": CACHE_FORMAT, "tokenizers": tokenizers.__version__,
                 "transformers": transformers.__version__}
    return xxhash.xxh3_128(json.dumps(versioned, sort_keys=True).encode()).hexdigest()


@dataclass
class CachedData:
    """An entry's content: the stores of each split, what the run that made it said
    (`notes`: [level, message]) and the eval prompts file."""

    stores: dict[str, TokenStore]
    notes: list[list[str]]
    directory: Path

    def eval_prompts(self, count: int) -> list:
        """The first `count` eval prompts (messages or text) as they were."""
        prompts = []
        with open(self.directory / EVAL_PROMPTS) as f:
            for line in f:
                if len(prompts) == count:
                    break
                prompts.append(json.loads(line))
        return prompts


class TokenizedCache:
    """The entry of one key under `root`."""

    def __init__(self, root: str, key: str):
        self.root, self.key = Path(root), key
        self.entry = self.root / key

    def load(self) -> CachedData | None:
        """The entry if it is there and whole; a damaged one is removed (None)."""
        if not self.entry.is_dir():
            return None
        try:
            manifest = json.loads((self.entry / MANIFEST).read_text())
            if manifest.get("key") != self.key:
                raise ValueError("written for another key")
            for name, (size, digest) in manifest["files"].items():
                path = self.entry / name
                if path.stat().st_size != size or file_digest(path) != digest:
                    raise ValueError(f"{name} does not match what was written")
            stores = {split: open_store(self.entry, split, manifest["digests"][split])
                      for split in SPLITS}
        except (OSError, ValueError, KeyError, TypeError) as error:
            logger.info(f"Tokenized cache entry {self.entry} is damaged ({first_line(error)}); "
                        "tokenizing again.")
            shutil.rmtree(self.entry, ignore_errors=True)
            return None
        return CachedData(stores, manifest["notes"], self.entry)

    @contextmanager
    def writing(self) -> Iterator[Path | None]:
        """A fresh hidden directory to write an entry's files into, or None (with a notice)
        where the cache directory cannot be written. Use `commit` inside the block; an
        exception leaves nothing behind."""
        directory = self._fresh_directory()
        if directory is None:
            yield None
            return
        try:
            yield directory
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def _fresh_directory(self) -> Path | None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(prefix=f".tmp-{self.key[:8]}-", dir=self.root))
        except OSError as error:
            logger.info(f"Tokenized cache: cannot write to {self.root} ({first_line(error)}); "
                        "tokenizing without a cache (--tokenized_cache_dir picks another "
                        "directory).")
            return None

    def commit(self, directory: Path, digests: dict[str, str], notes: list[list[str]],
               parts: dict[str, Any]) -> CachedData:
        """Write the manifest and rename `directory` into place (a concurrent run that got
        there first wins: its identical entry is used); the entry, opened."""
        files = {path.name: [path.stat().st_size, file_digest(path)]
                 for path in sorted(directory.iterdir())}
        manifest = {"key": self.key, "parts": parts, "digests": digests, "notes": notes,
                    "files": files}
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))
        try:
            os.rename(directory, self.entry)
        except OSError:
            if not self.entry.is_dir():
                raise
        return CachedData({split: open_store(self.entry, split, digests[split])
                           for split in SPLITS}, notes, self.entry)
