"""--streaming: the seeded shuffle buffer, the same ids as the in-memory path, each process its
own rows, bad rows named, and every position a place to resume from exactly."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from conftest import preference_rows, write_jsonl

from dpo_core.config.train import TrainConfig
from dpo_core.data.pairs import load_pairs
from dpo_core.data.streaming import PairStream, shuffled
from dpo_core.data.tokenization import tokenize_pairs
from dpo_core.errors import ConfigError, DataError

LENGTHS = {"max_length": 48, "max_prompt_length": 24}  # some pairs are cut


def test_shuffle_buffer_is_seeded_and_gives_every_item_once():
    def order(seed: int, buffer: int) -> list[int]:
        return list(shuffled(range(100), buffer, random.Random(seed)))

    assert sorted(order(0, 10)) == list(range(100))
    assert order(0, 10) == order(0, 10) != order(1, 10)
    assert order(0, 10) != list(range(100))
    # A buffer of 10 moves an item at most ~10 places early: it mixes locally.
    assert all(position >= item - 10 for position, item in enumerate(order(0, 10)))
    assert sorted(order(0, 1000)) == list(range(100))  # larger than the data: one full shuffle


@pytest.fixture(scope="module")
def stream_file(tmp_path_factory) -> str:
    rows = preference_rows(90, seed=7)
    rows[20]["chosen"] = ""  # bad
    rows[40]["rejected"] = rows[40]["chosen"]  # identical replies
    return write_jsonl(tmp_path_factory.mktemp("stream") / "pairs.jsonl", rows)


def stream_of(path: str, tokenizer, **changes) -> PairStream:
    settings = dict(name=path, split="train", seed=3, buffer_size=16, num_rows=None,
                    skip_bad_rows=True, tokenizer=tokenizer, use_chat_template=True,
                    **LENGTHS)
    return PairStream(**{**settings, **changes})


def first(stream: PairStream, count: int, start=(0, 0), process: int = 0, processes: int = 1):
    pairs = stream.pairs(list(start), process, processes)
    return [next(pairs) for _ in range(count)]


def test_a_pass_holds_the_ids_of_the_in_memory_path_and_resumes_anywhere(tiny_tokenizer,
                                                                         stream_file, capsys):
    pairs, _ = load_pairs(stream_file, num_samples=None, seed=0, skip_bad_rows=True)
    expected, _ = tokenize_pairs(tiny_tokenizer, pairs, use_chat_template=True,
                                 skip_bad_rows=True, disable=True, **LENGTHS)
    stream = stream_of(stream_file, tiny_tokenizer)
    run = first(stream, 2 * len(expected) + 5)  # two passes and a bit
    epoch0, epoch1 = run[:len(expected)], run[len(expected):2 * len(expected)]
    assert Counter(map(repr, (p for p, _ in epoch0))) == Counter(map(repr, expected))
    assert Counter(map(repr, (p for p, _ in epoch1))) == Counter(map(repr, expected))
    assert [p for p, _ in epoch0] != [p for p, _ in epoch1]  # each pass its own order
    assert {position[0] for _, position in epoch0} == {0}
    assert {position[0] for _, position in epoch1} == {1}
    assert "Dropped 2 rows of" in capsys.readouterr().out  # said once, for the first pass
    # From the position after any pair, the same pairs follow.
    for index in (0, 17, len(expected) - 1, len(expected) + 3):
        resumed = first(stream, 4, start=run[index][1])
        assert resumed == run[index + 1:index + 5]


def test_each_process_streams_its_own_rows(tiny_tokenizer, stream_file):
    stream = stream_of(stream_file, tiny_tokenizer, num_rows=60)
    alone = [p for p, position in first(stream, 120) if position[0] == 0]
    shares = [[p for p, position in first(stream, 60, process=r, processes=2)
               if position[0] == 0] for r in (0, 1)]
    assert Counter(map(repr, shares[0] + shares[1])) == Counter(map(repr, alone))
    assert not set(map(repr, shares[0])) & set(map(repr, shares[1]))
    assert len(alone) == 58  # the first 60 rows less a bad one (line 21) and an identical one


def test_a_bad_row_stops_the_stream_naming_its_line(tiny_tokenizer, stream_file):
    stream = stream_of(stream_file, tiny_tokenizer, skip_bad_rows=False)
    with pytest.raises(DataError, match=r"pairs.jsonl: line 21, field 'chosen': is empty"):
        first(stream, 200)


@pytest.mark.parametrize(("extra", "message"), [
    ({}, "--streaming needs --max_steps"),
    ({"max_steps": 5, "precompute_ref_log_probs": True},
     "--precompute_ref_log_probs needs every pair before training"),
    ({"max_steps": 5, "group_by_length": True}, "--group_by_length sorts all pairs"),
])
def test_streaming_refuses_what_a_stream_cannot_do(extra, message, tmp_path):
    config = TrainConfig(streaming=True, dataset_name="org/data", output_dir=str(tmp_path),
                         **extra)
    with pytest.raises(ConfigError, match=message):
        config.validate()
