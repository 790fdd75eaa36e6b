"""Loading rows from files, normalising every accepted shape, bad rows, sampling and splitting."""

from __future__ import annotations

import json
import re

import datasets
import pytest

from dpo_core.data import pairs as data
from dpo_core.data.pairs import PreferencePair, load_pairs, split_pairs, to_pair
from dpo_core.data.sources import load_rows
from dpo_core.errors import DataError


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def standard_rows(n: int) -> list[dict]:
    """Rows whose index can be read back from the text."""
    return [
        {"prompt": f"prompt {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(n)
    ]


# -- accepted shapes ------------------------------------------------------------------------


def test_ultrafeedback_row_takes_prompt_from_the_message_lists():
    row = {
        "source": "evol",
        "prompt": "What is two plus two?",
        "chosen": [user("What is two plus two?"), assistant("Four.")],
        "rejected": [user("What is two plus two?"), assistant("Five.")],
        "chosen-rating": 5.0,
    }
    assert to_pair(row, "uf") == PreferencePair(
        [user("What is two plus two?")], "Four.", "Five."
    )


def test_standard_row_keeps_a_plain_text_prompt():
    row = {"prompt": "Q: sky colour?\nA:", "chosen": " blue", "rejected": " green"}
    assert to_pair(row, "std") == PreferencePair("Q: sky colour?\nA:", " blue", " green")


def test_conversational_row_with_system_and_several_turns():
    prompt = [system("Be brief."), user("hi"), assistant("hello"), user("name a fruit")]
    row = {"prompt": prompt, "chosen": [assistant("apple")], "rejected": [assistant("rock")]}
    assert to_pair(row, "conv") == PreferencePair(prompt, "apple", "rock")


def test_hh_row_extracts_the_shared_prompt_as_messages_and_keeps_the_raw_text():
    dialogue = "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: name a fruit\n\nAssistant:"
    row = {"chosen": dialogue + " an apple", "rejected": dialogue + " a rock\nor two"}
    assert to_pair(row, "hh") == PreferencePair(
        [user("hi there"), assistant("hello"), user("name a fruit")],
        "an apple",
        "a rock\nor two",
        raw_text=(dialogue, " an apple", " a rock\nor two"),
    )


def test_hh_row_strips_only_one_leading_space():
    row = {"chosen": "\n\nHuman: q\n\nAssistant:  two", "rejected": "\n\nHuman: q\n\nAssistant:x"}
    pair = to_pair(row, "hh")
    assert (pair.chosen, pair.rejected) == (" two", "x")


# -- bad rows -------------------------------------------------------------------------------

HH_PROMPT = "\n\nHuman: q\n\nAssistant:"

BAD_ROWS = [
    # (row, field named in the error, words of the problem)
    ({"prompt": "p", "rejected": "r"}, "chosen", "is missing"),
    ({"prompt": "p", "chosen": "c"}, "rejected", "is missing"),
    ({"prompt": None, "chosen": "c", "rejected": "r"}, "prompt", "is None"),
    ({"prompt": "p", "chosen": None, "rejected": "r"}, "chosen", "is None"),
    ({"prompt": "  \n", "chosen": "c", "rejected": "r"}, "prompt", "is empty"),
    ({"prompt": "p", "chosen": "c", "rejected": ""}, "rejected", "is empty"),
    ({"prompt": "p", "chosen": 3, "rejected": "r"}, "chosen", "must be a string, got int"),
    ({"prompt": [], "chosen": "c", "rejected": "r"}, "prompt", "non-empty list"),
    (
        {"prompt": [{"role": "robot", "content": "x"}], "chosen": "c", "rejected": "r"},
        "prompt[0].role",
        "'robot'",
    ),
    ({"prompt": [{"role": "user"}], "chosen": "c", "rejected": "r"}, "prompt[0].content", "None"),
    (
        {"prompt": [user("a"), user("b")], "chosen": "c", "rejected": "r"},
        "prompt[1].role",
        "expected 'assistant'",
    ),
    (
        {"prompt": [user("a"), system("b")], "chosen": "c", "rejected": "r"},
        "prompt[1].role",
        "expected 'assistant'",
    ),
    (
        {"prompt": [user("a"), assistant("b")], "chosen": "c", "rejected": "r"},
        "prompt[1].role",
        "end with a user turn",
    ),
    (
        {"prompt": [user("a")], "chosen": [user("c")], "rejected": [assistant("r")]},
        "chosen[0].role",
        "expected 'assistant'",
    ),
    (
        {
            "prompt": [user("a")],
            "chosen": [assistant("c")],
            "rejected": [user("x"), assistant("r")],
        },
        "rejected",
        "only the assistant reply",
    ),
    (
        {
            "prompt": "a",
            "chosen": [user("a"), assistant("c")],
            "rejected": [user("b"), assistant("r")],
        },
        "rejected",
        "differ from chosen",
    ),
    ({"chosen": "no dialogue here", "rejected": "r"}, "chosen", "HH format"),
    (
        {"chosen": HH_PROMPT + " c", "rejected": "\n\nHuman: other\n\nAssistant: r"},
        "rejected",
        "share",
    ),
    (
        {"chosen": HH_PROMPT + " c", "rejected": HH_PROMPT + " r\n\nAssistant: more"},
        "rejected",
        "share",
    ),
    ({"chosen": HH_PROMPT + " ", "rejected": HH_PROMPT + " r"}, "chosen", "is empty"),
    (
        {"chosen": "intro" + HH_PROMPT + " c", "rejected": "intro" + HH_PROMPT + " r"},
        "chosen",
        "before",
    ),
    (
        {"chosen": "\n\nHuman: \n\nAssistant: c", "rejected": "\n\nHuman: \n\nAssistant: r"},
        "chosen turns[0].content",
        "is empty",
    ),
    (
        {
            "chosen": "\n\nAssistant: a" + HH_PROMPT + " c",
            "rejected": "\n\nAssistant: a" + HH_PROMPT,
        },
        "chosen turns[0].role",
        "expected 'user'",
    ),
]


@pytest.mark.parametrize(("row", "field", "problem"), BAD_ROWS)
def test_bad_row_error_names_source_row_and_field(row, field, problem):
    with pytest.raises(DataError) as caught:
        to_pair(row, "rows.jsonl: line 7")
    message = str(caught.value)
    assert message.startswith(f"rows.jsonl: line 7, field '{field}': ")
    assert problem in message
    described = message.removeprefix(f"rows.jsonl: line 7, field '{field}': ")
    assert caught.value.reason == f"{field}: {described}"  # the count key for skip_bad_rows


# -- loading files --------------------------------------------------------------------------

CONVERSATIONAL = [
    {
        "prompt": [system("Be brief."), user(f"question {i}")],
        "chosen": [assistant(f"good {i}")],
        "rejected": [assistant(f"bad {i}")],
    }
    for i in range(3)
]


def write(kind: str, rows: list[dict], tmp_path) -> str:
    dataset = datasets.Dataset.from_list(rows)
    path = tmp_path / {"json": "rows.json", "saved": "saved"}.get(kind, f"rows.{kind}")
    if kind == "json":  # one JSON array, not JSON lines
        path.write_text(json.dumps(rows))
    elif kind == "jsonl":
        dataset.to_json(str(path))
    elif kind == "csv":
        dataset.to_csv(str(path))
    elif kind == "parquet":
        dataset.to_parquet(str(path))
    elif kind == "saved":
        dataset.save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("kind", ["json", "jsonl", "csv", "parquet", "saved"])
def test_load_rows_reads_each_local_format(kind, tmp_path):
    rows = standard_rows(3)
    source = load_rows(write(kind, rows, tmp_path))
    assert source.take(range(len(source))) == rows


@pytest.mark.parametrize("kind", ["json", "jsonl", "parquet", "saved"])
def test_message_lists_survive_each_format(kind, tmp_path):
    pairs, drops = load_pairs(
        write(kind, CONVERSATIONAL, tmp_path), num_samples=None, seed=0, skip_bad_rows=False
    )
    expected = [
        PreferencePair(r["prompt"], f"good {i}", f"bad {i}") for i, r in enumerate(CONVERSATIONAL)
    ]
    assert sorted(pairs, key=lambda p: p.chosen) == expected
    assert not drops


def test_load_rows_picks_the_split_of_a_saved_dataset_dict(tmp_path):
    splits = {"train": standard_rows(2), "test": standard_rows(3)[2:]}
    datasets.DatasetDict(
        {name: datasets.Dataset.from_list(rows) for name, rows in splits.items()}
    ).save_to_disk(str(tmp_path / "dict"))
    source = load_rows(str(tmp_path / "dict"), split="test")
    assert source.take(range(len(source))) == splits["test"]
    with pytest.raises(DataError, match="no split 'validation'"):
        load_rows(str(tmp_path / "dict"), split="validation")


@pytest.mark.parametrize("name", ["missing.jsonl", "./data/x", "/no/such/dir"])
def test_missing_local_path_is_named(name):
    with pytest.raises(DataError, match=f"^{re.escape(name)}: no such file or directory"):
        load_rows(name)


def test_unsupported_file_type_and_unparsable_file(tmp_path):
    (tmp_path / "rows.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_rows(str(tmp_path / "rows.txt"))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="broken.json: line 1: not valid JSON"):
        load_rows(str(tmp_path / "broken.json"))


def test_unreachable_hub_gives_a_short_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/prefs' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as caught:
        load_rows("org/prefs")
    message = str(caught.value)
    assert "'org/prefs'" in message and "local" in message and "--demo" in message
    assert "\n" not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


# -- sampling, bad-row policy, splitting ---------------------------------------------------


def sampled_indices(path: str, num_samples: int | None, seed: int) -> list[int]:
    pairs, _ = load_pairs(path, num_samples=num_samples, seed=seed, skip_bad_rows=False)
    indices = [int(p.prompt.split()[1]) for p in pairs]
    # each pair still comes from one row: its texts carry the same index
    assert all(
        p.chosen == f"good {i}" and p.rejected == f"bad {i}"
        for p, i in zip(pairs, indices, strict=True)
    )
    return indices


def test_num_samples_takes_a_seeded_shuffle_not_the_first_rows(tmp_path):
    path = write("jsonl", standard_rows(40), tmp_path)
    first = sampled_indices(path, 10, seed=42)
    assert len(first) == len(set(first)) == 10
    assert sorted(first) != list(range(10))
    assert sampled_indices(path, 10, seed=42) == first
    assert sampled_indices(path, 10, seed=7) != first
    # the same shuffle with more samples extends the smaller sample
    assert sampled_indices(path, 20, seed=42)[:10] == first
    for everything in (None, 0):
        assert sorted(sampled_indices(path, everything, seed=42)) == list(range(40))


def test_only_sampled_rows_are_converted(tmp_path, monkeypatch):
    path = write("jsonl", standard_rows(50), tmp_path)
    converted = []

    def counting_to_pair(row, location, **kwargs):
        converted.append(location)
        return to_pair(row, location, **kwargs)

    monkeypatch.setattr(data, "to_pair", counting_to_pair)
    load_pairs(path, num_samples=5, seed=0, skip_bad_rows=False)
    assert len(converted) == 5


def rows_with_bad_ones() -> tuple[list[dict], set[int]]:
    rows = standard_rows(12)
    rows[2]["chosen"] = None
    rows[5]["rejected"] = "   "
    rows[8]["chosen"] = ""
    rows[10]["rejected"] = rows[10]["chosen"]  # identical replies: dropped, never an error
    return rows, {2, 5, 8}


def test_bad_row_stops_loading_and_names_the_first_in_file_order(tmp_path):
    rows, bad = rows_with_bad_ones()
    path = write("parquet", rows, tmp_path)
    for seed in (3, 4, 5):  # whatever the shuffle, the first bad row of the file is named
        with pytest.raises(DataError) as caught:
            load_pairs(path, num_samples=None, seed=seed, skip_bad_rows=False)
        # 1-based: the third row (index 2) is the first bad one
        assert str(caught.value) == f"{path}: row 3, field 'chosen': is None"


def test_skip_bad_rows_drops_and_counts_reasons(tmp_path):
    rows, bad = rows_with_bad_ones()
    pairs, drops = load_pairs(
        write("parquet", rows, tmp_path), num_samples=None, seed=3, skip_bad_rows=True
    )
    kept = sorted(int(p.prompt.split()[1]) for p in pairs)
    assert kept == sorted(set(range(12)) - bad - {10})
    assert drops == {
        "chosen: is None": 1,
        "chosen: is empty": 1,
        "rejected: is empty": 1,
        data.IDENTICAL_REPLIES: 1,
    }


def test_missing_column_is_reported_up_front(tmp_path):
    path = write("jsonl", [{"prompt": "p", "answer": "a"}], tmp_path)
    with pytest.raises(
        DataError, match="no column 'chosen', 'rejected' \\(columns: prompt, answer;"
    ):
        load_pairs(path, num_samples=None, seed=0, skip_bad_rows=True)


def test_split_pairs_is_seeded_disjoint_and_complete():
    pairs = list(range(50))
    train, evaluation = split_pairs(pairs, 0.1, seed=42)
    assert len(evaluation) == 5 and len(train) == 45
    assert sorted(train + evaluation) == pairs
    assert train == sorted(train) and evaluation == sorted(evaluation)  # input order kept
    assert split_pairs(pairs, 0.1, seed=42) == (train, evaluation)
    assert split_pairs(pairs, 0.1, seed=1)[1] != evaluation
    assert evaluation != pairs[-5:] and evaluation != pairs[:5]


def test_split_pairs_edge_fractions():
    assert split_pairs([1, 2, 3], 0.0, seed=0) == ([1, 2, 3], [])
    assert [len(part) for part in split_pairs([1, 2, 3], 0.01, seed=0)] == [2, 1]  # at least one
    assert split_pairs([1], 0.5, seed=0) == ([1], [])  # training keeps at least one
    with pytest.raises(ValueError, match="eval_fraction"):
        split_pairs([1, 2], 1.0, seed=0)
