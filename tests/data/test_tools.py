"""The `tools` column (trl's): tool schemas read from each row and passed to the chat template,
with the published Qwen2.5 and Llama 3.1 templates that render them; the same prompt ids as
trl 1.16's own tokenization; a 2-step run on such data."""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import pytest
from conftest import FAMILIES, family_tokenizer, read_log, train_args, write_jsonl

import train
from dpo_core.data.pairs import load_pairs, to_pair
from dpo_core.data.tokenization import tokenize_pair
from dpo_core.errors import DataError
from dpo_core.testing import tiny_llama

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
ROOMY = {"max_length": 1000, "max_prompt_length": 500, "use_chat_template": True}
# What each template writes into the prompt once it has tools.
TOOL_TEXT = {"qwen2.5": "You are provided with function signatures within <tools></tools>",
             "llama3.1": "Given the following functions, please respond with a JSON"}


def tool_row(tools) -> dict:
    return {"prompt": [{"role": "user", "content": "how is the weather in paris"}],
            "chosen": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "paris"}}\n'
                      "</tool_call>",
            "rejected": "it is sunny", "tools": tools}


@pytest.mark.parametrize("tools, expected", [
    ([WEATHER], [WEATHER]), (json.dumps([WEATHER]), [WEATHER]), (None, None), ([], None),
    ("[]", None),
])
def test_tools_column_is_read_as_trl_reads_it(tools, expected):
    assert to_pair(tool_row(tools), "row 1").tools == expected


@pytest.mark.parametrize("tools, problem", [
    ("[{", "field 'tools': is not valid JSON"),
    ({"name": "x"}, "field 'tools': must be a list of tool schemas"),
    (["get_weather"], "field 'tools': must be a list of tool schemas"),
])
def test_bad_tools_name_the_row_and_are_dropped_when_asked(tools, problem, tmp_path):
    with pytest.raises(DataError, match=f"row 1, {problem}"):
        to_pair(tool_row(tools), "row 1")
    path = write_jsonl(tmp_path / "rows.jsonl", [tool_row([WEATHER]), tool_row(tools)])
    pairs, drops = load_pairs(path, num_samples=None, seed=0, skip_bad_rows=True)
    assert [p.tools for p in pairs] == [[WEATHER]] and sum(drops.values()) == 1


@pytest.mark.parametrize("family", ["qwen2.5", "llama3.1"])
def test_published_tool_templates_render_the_schemas_into_the_prompt(tiny_tokenizer, family):
    """The prompt ids are the template's rendering with tools=...; the replies are the same
    ids as without tools (the schemas belong to the prompt)."""
    tokenizer = family_tokenizer(tiny_tokenizer, family)
    with_tools = to_pair(tool_row([WEATHER]), "row 1")
    without = to_pair(tool_row(None), "row 2")
    tokenized = tokenize_pair(tokenizer, with_tools, **ROOMY)
    plain = tokenize_pair(tokenizer, without, **ROOMY)
    rendered = tokenizer.apply_chat_template(with_tools.prompt, tools=[WEATHER], tokenize=False,
                                             add_generation_prompt=True)
    assert tokenized.prompt_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    prompt_text = tokenizer.decode(tokenized.prompt_ids)
    assert TOOL_TEXT[family] in prompt_text and '"get_weather"' in prompt_text
    assert TOOL_TEXT[family] not in tokenizer.decode(plain.prompt_ids)
    assert (tokenized.chosen_ids, tokenized.rejected_ids) == (plain.chosen_ids,
                                                              plain.rejected_ids)
    assert tokenizer.decode(tokenized.chosen_ids[-1:]) == FAMILIES[family]["end_of_turn"]


def test_same_ids_as_trl_tokenization(tiny_tokenizer):
    """trl 1.16's own `_prepare_dataset` on the same row (tools as a JSON string): the same
    prompt ids; each reply is trl's up to the template's end-of-turn token (trl also trains
    the newline ChatML writes after it: see dpo_core/data/tokenization.py)."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    tokenizer = family_tokenizer(tiny_tokenizer, "qwen2.5")
    row = tool_row(json.dumps([WEATHER]))
    for side in ("chosen", "rejected"):  # trl's conversational form of the replies
        row[side] = [{"role": "assistant", "content": row[side]}]
    prepared = trl.DPOTrainer._prepare_dataset(
        SimpleNamespace(_tokenizer=tokenizer), Dataset.from_list([row]), tokenizer,
        SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start"),
        "train")[0]
    ours = tokenize_pair(tokenizer, to_pair(row, "row 1"), **ROOMY)
    assert ours.prompt_ids == prepared["prompt_ids"]
    for mine, theirs in ((ours.chosen_ids, prepared["chosen_ids"]),
                         (ours.rejected_ids, prepared["rejected_ids"])):
        assert theirs[:len(mine)] == mine and tokenizer.decode(theirs[len(mine):]) == "\n"


def test_tools_without_a_chat_template_are_refused(tiny_tokenizer):
    pair = dataclasses.replace(to_pair(tool_row([WEATHER]), "row 1"), origin="rows.jsonl: line 1")
    with pytest.raises(DataError, match="rows.jsonl: line 1, field 'tools': tool schemas need "
                                        "a chat template"):
        tokenize_pair(tiny_tokenizer, pair, **{**ROOMY, "use_chat_template": False})


def test_two_steps_on_tool_calling_pairs(tiny_tokenizer, tmp_path):
    tokenizer = family_tokenizer(tiny_tokenizer, "qwen2.5")
    model_dir = tmp_path / "qwen-like"
    tiny_llama(vocab_size=len(tokenizer), hidden_size=32, num_layers=2,
               num_heads=2).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rows = [tool_row([WEATHER] if i % 2 else json.dumps([WEATHER])) for i in range(8)]
    for i, row in enumerate(rows):
        row["rejected"] = f"it is sunny {i}"
    data = write_jsonl(tmp_path / "tools.jsonl", rows)
    out = tmp_path / "run"
    assert train.main(train_args(str(model_dir), data, out, "--max_steps", "2",
                                 "--batch_size", "2", "--eval_fraction", "0",
                                 "--max_length", "400", "--max_prompt_length", "300")) == 0
    log = read_log(out)
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert log[1]["loss"] != log[0]["loss"]
