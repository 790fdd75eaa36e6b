"""Token ids held compactly and cached: the same ids and batches as the list path, a hit
for a rerun, a miss for every change that changes ids, damaged entries rebuilt, an unwritable
directory survived."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from accelerate import Accelerator
from conftest import FAMILIES, family_tokenizer, preference_rows, write_jsonl

import dpo_core.data.token_store as token_store
import dpo_core.data.training_data as training_data
from dpo_core.config.train import TrainConfig
from dpo_core.data.batches import MicroBatchStream, PreferenceCollator, pair_lengths
from dpo_core.data.pairs import load_pairs, split_pairs
from dpo_core.data.token_store import StoreWriter, TokenStore, tokenize_to_store
from dpo_core.data.tokenization import encode, tokenize_pairs
from dpo_core.data.training_data import (
    CACHE_HIT,
    CACHE_MISS,
    CACHE_OFF,
    CACHE_UNWRITABLE,
    build_training_data,
)
from dpo_core.errors import DataError

LENGTHS = {"max_length": 48, "max_prompt_length": 24}  # some pairs are cut


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory) -> str:
    return write_jsonl(tmp_path_factory.mktemp("rows") / "pairs.jsonl", preference_rows(300))


def run_config(data: str, cache_dir, **changes) -> TrainConfig:
    return TrainConfig(dataset_name=data, num_samples=0, eval_fraction=0.1, seed=3,
                       num_sample_prompts=2, tokenized_cache_dir=str(cache_dir),
                       **LENGTHS, **changes)


def expected_splits(config: TrainConfig, tokenizer, use_chat_template: bool = True):
    """Today's list path: load, split, `tokenize_pairs`."""
    pairs, _ = load_pairs(config.dataset_name, num_samples=config.num_samples or None,
                          seed=config.seed, skip_bad_rows=config.skip_bad_rows)
    train, evaluation = split_pairs(pairs, config.eval_fraction, config.seed)
    return [tokenize_pairs(tokenizer, split, use_chat_template=use_chat_template,
                           skip_bad_rows=config.skip_bad_rows, disable=True, **LENGTHS)[0]
            for split in (train, evaluation)]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cached_ids_are_tokenize_pairs_ids_on_published_templates(
        family, family_base_tokenizer, rows_file, tmp_path):
    tokenizer = family_tokenizer(family_base_tokenizer, family)
    config = run_config(rows_file, tmp_path, skip_bad_rows=True)
    train, evaluation = expected_splits(config, tokenizer)
    for status in (CACHE_MISS, CACHE_HIT):  # written, then read back from the files
        data = build_training_data(config, tokenizer, use_chat_template=True,
                                   show_progress=False)
        assert data.tokenized_cache == status
        assert isinstance(data.train, TokenStore)
        assert list(data.train) == train and list(data.eval) == evaluation
        assert data.train.tokens.dtype == "int32"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fast_encoding_gives_the_tokenizer_calls_ids(family, family_base_tokenizer):
    tokenizer = family_tokenizer(family_base_tokenizer, family)
    conversation = [{"role": "user", "content": " why is the sky\n\nblue "},
                    {"role": "assistant", "content": "the sky\n is blue  "}]
    texts = [tokenizer.apply_chat_template(conversation, tokenize=False),
             tokenizer.apply_chat_template(conversation[:1], tokenize=False,
                                           add_generation_prompt=True),
             "plain text, with  spaces\tand\n\n\nnewlines", "", " ", "é ü 日本"]
    for add_special_tokens in (True, False):
        expected = tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
        assert encode(tokenizer, texts, add_special_tokens) == expected
    # What the plain call would change first (truncation set on the backend, special tokens
    # split): the call itself is used.
    tokenizer.backend_tokenizer.enable_truncation(3)
    (ids,) = encode(tokenizer, texts[:1], False)
    assert ids == expected[0] and len(ids) > 3
    tokenizer.split_special_tokens = True
    assert encode(tokenizer, texts[:1], False) == tokenizer(texts[:1],
                                                            add_special_tokens=False)["input_ids"]
    assert encode(tokenizer, texts[:1], False) != expected[:1]  # special tokens split


def test_worker_processes_give_the_same_ids_and_the_same_first_error(
        family_base_tokenizer, rows_file, monkeypatch):
    chatml = family_tokenizer(family_base_tokenizer, "chatml")
    pairs, _ = load_pairs(rows_file, num_samples=None, seed=0, skip_bad_rows=False)
    # A reply that merges into ChatML's generation prompt (not a token prefix): a bad row in
    # the third chunk of 40 and another in the fifth.
    for index in (95, 170):
        pairs[index] = dataclasses.replace(pairs[index], chosen="\n\nthe sky",
                                           origin=f"row {index}")
    options = {"use_chat_template": True, **LENGTHS}
    expected, drops = tokenize_pairs(chatml, pairs, skip_bad_rows=True, disable=True, **options)
    monkeypatch.setattr(token_store, "CHUNK_PAIRS", 40)
    store, store_drops, identical = tokenize_to_store(
        chatml, pairs, StoreWriter(), num_proc=2, disable=True, skip_bad_rows=True, **options)
    assert list(store) == expected and store_drops == drops and sum(drops.values()) == 2
    assert identical == sum(p.chosen_ids == p.rejected_ids for p in expected)
    with pytest.raises(DataError, match="row 95, field 'chosen'"):
        tokenize_to_store(chatml, pairs, StoreWriter(), num_proc=2, disable=True, **options)


def test_store_gives_the_same_batches_in_the_same_order(tiny_tokenizer, rows_file):
    pairs, _ = load_pairs(rows_file, num_samples=None, seed=0, skip_bad_rows=False)
    kept, _ = tokenize_pairs(tiny_tokenizer, pairs, use_chat_template=True, disable=True,
                             **LENGTHS)
    store = TokenStore.of(kept)
    assert pair_lengths(store, True) == pair_lengths(kept, True)
    collator = PreferenceCollator(tiny_tokenizer.eos_token_id)
    for grouped in (False, True):
        streams = [MicroBatchStream(Accelerator(), pairs, 8, collator, seed=1,
                                    lengths=pair_lengths(pairs, False) if grouped else None)
                   for pairs in (kept, store)]
        for a, b, _ in zip(*(s.iterate(30) for s in streams), range(50), strict=False):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_rerun_hits_and_says_again_what_the_first_run_said(tiny_tokenizer, tmp_path,
                                                              monkeypatch, capsys):
    rows = preference_rows(120, seed=5)
    rows[7]["chosen"] = ""  # a bad row: dropped and counted with --skip_bad_rows
    config = run_config(write_jsonl(tmp_path / "pairs.jsonl", rows), tmp_path / "cache",
                        skip_bad_rows=True)
    first = build_training_data(config, tiny_tokenizer, True, show_progress=False)
    assert first.tokenized_cache == CACHE_MISS
    told = capsys.readouterr().out
    assert "Dropped 1 rows of" in told and len(first.sample_prompts) == 2
    monkeypatch.setattr(training_data, "tokenize_to_store", None)  # calling it would fail
    again = build_training_data(config, tiny_tokenizer, True, show_progress=False)
    assert again.tokenized_cache == CACHE_HIT
    assert list(again.train) == list(first.train) and list(again.eval) == list(first.eval)
    assert again.sample_prompts == first.sample_prompts
    assert capsys.readouterr().out.startswith(told)


def test_every_change_of_what_makes_the_ids_misses(tiny_tokenizer, tmp_path):
    rows = preference_rows(120, seed=5)
    data_file = tmp_path / "pairs.jsonl"
    write_jsonl(data_file, rows)
    eval_file = write_jsonl(tmp_path / "eval.jsonl", preference_rows(20, seed=6))
    cache = tmp_path / "cache"
    base = run_config(str(data_file), cache)
    retemplated = family_tokenizer(tiny_tokenizer, "chatml")
    changes = {
        "--max_length": (dataclasses.replace(base, max_length=40), tiny_tokenizer, True),
        "--max_prompt_length": (dataclasses.replace(base, max_prompt_length=20),
                                tiny_tokenizer, True),
        "--skip_bad_rows": (dataclasses.replace(base, skip_bad_rows=True), tiny_tokenizer, True),
        "--seed": (dataclasses.replace(base, seed=4), tiny_tokenizer, True),
        "--num_samples": (dataclasses.replace(base, num_samples=100), tiny_tokenizer, True),
        "--eval_fraction": (dataclasses.replace(base, eval_fraction=0.2), tiny_tokenizer, True),
        "--eval_dataset": (dataclasses.replace(base, eval_dataset=eval_file), tiny_tokenizer,
                           True),
        "--chat_template none": (base, tiny_tokenizer, False),
        "another tokenizer and template": (base, retemplated, True),
    }

    def status(config, tokenizer=tiny_tokenizer, use_chat_template=True) -> str:
        return build_training_data(config, tokenizer, use_chat_template,
                                   show_progress=False).tokenized_cache

    assert (status(base), status(base)) == (CACHE_MISS, CACHE_HIT)
    for change, (config, tokenizer, use_chat_template) in changes.items():
        assert status(config, tokenizer, use_chat_template) == CACHE_MISS, change
    # Settings that change nothing of the ids still hit (here: a training setting).
    assert status(dataclasses.replace(base, learning_rate=1.0, beta=0.5)) == CACHE_HIT
    rows[8]["chosen"] = "something else entirely"  # the file changed in place
    write_jsonl(data_file, rows)
    assert status(base) == CACHE_MISS
    assert len(os.listdir(cache)) == len(changes) + 2  # entries only: no temporary left


@pytest.mark.parametrize("damage", ["cut short", "one token changed", "no manifest",
                                    "manifest garbled"])
def test_a_damaged_entry_is_rebuilt(damage, tiny_tokenizer, rows_file, tmp_path, capsys):
    config = run_config(rows_file, tmp_path)
    first = build_training_data(config, tiny_tokenizer, True, show_progress=False)
    expected = list(first.train)
    entry = next(p for p in tmp_path.iterdir() if not p.name.startswith("."))
    tokens = entry / "train.tokens"
    del first
    if damage == "cut short":
        os.truncate(tokens, tokens.stat().st_size - 4)
    elif damage == "one token changed":
        with open(tokens, "r+b") as f:
            f.seek(40)
            value = f.read(1)
            f.seek(40)
            f.write(bytes([value[0] ^ 1]))
    elif damage == "no manifest":
        (entry / "manifest.json").unlink()
    else:
        (entry / "manifest.json").write_text('{"key": ')
    capsys.readouterr()
    rebuilt = build_training_data(config, tiny_tokenizer, True, show_progress=False)
    assert rebuilt.tokenized_cache == CACHE_MISS
    assert f"Tokenized cache entry {entry} is damaged" in capsys.readouterr().out
    assert list(rebuilt.train) == expected
    assert build_training_data(config, tiny_tokenizer, True,
                               show_progress=False).tokenized_cache == CACHE_HIT


def test_a_failed_or_killed_write_leaves_no_entry(tiny_tokenizer, tmp_path):
    rows = preference_rows(60)
    rows[50]["rejected"] = None
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="line 51, field 'rejected'"):
        build_training_data(run_config(bad, cache), tiny_tokenizer, True, show_progress=False)
    assert os.listdir(cache) == []  # nothing half-written kept
    # A run killed while writing leaves its hidden temporary directory: never read.
    good = write_jsonl(tmp_path / "good.jsonl", preference_rows(60))
    config = run_config(good, cache)
    key = training_data.cache_key(training_data.cache_parts(config, tiny_tokenizer, True))
    killed = cache / f".tmp-{key[:8]}-killed"
    killed.mkdir()
    (killed / "train.tokens").write_bytes(b"\x00" * 6)
    data = build_training_data(config, tiny_tokenizer, True, show_progress=False)
    assert data.tokenized_cache == CACHE_MISS and (cache / key / "manifest.json").is_file()
    assert list(data.train) == expected_splits(config, tiny_tokenizer)[0]


def test_an_unwritable_cache_dir_and_no_cache_tokenize_in_memory(tiny_tokenizer, rows_file,
                                                                tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    expected = expected_splits(run_config(rows_file, tmp_path), tiny_tokenizer)
    for config, status in ((run_config(rows_file, a_file / "cache"), CACHE_UNWRITABLE),
                           (run_config(rows_file, tmp_path / "off", tokenized_cache=False),
                            CACHE_OFF)):
        data = build_training_data(config, tiny_tokenizer, True, show_progress=False)
        assert data.tokenized_cache == status
        assert [list(data.train), list(data.eval)] == expected
    assert f"Tokenized cache: cannot write to {a_file / 'cache'}" in capsys.readouterr().out
    assert not (tmp_path / "off").exists()


def test_manifest_records_what_the_key_covers(tiny_tokenizer, rows_file, tmp_path):
    config = run_config(rows_file, tmp_path)
    build_training_data(config, tiny_tokenizer, True, show_progress=False)
    (entry,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    parts = json.loads((entry / "manifest.json").read_text())["parts"]
    assert parts["train_data"]["name"] == rows_file and parts["max_length"] == 48
    assert parts["use_chat_template"] is True and parts["eval_fraction"] == 0.1
