"""chat.py's session: multi-turn history, /reset, replies cut by token ids, the CLI loop."""

from __future__ import annotations

import builtins
import json
import os

import torch
from conftest import family_tokenizer

from dpo_core.chat import (
    ChatSession,
    chat_template_mode,
    interactive,
    trained_chat_template,
)
from dpo_core.config.chat import ChatConfig
from dpo_core.data.templates import encode_prompt
from dpo_core.modeling.generation import generate_replies
from dpo_core.run_files import RUN_PLAN_KEY
from dpo_core.testing import tiny_llama


def greedy_session(model, tokenizer, **overrides) -> ChatSession:
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    if "adapter_path" not in overrides:  # not the default path: a local run there would count
        overrides["no_adapter"] = True
    config = ChatConfig(temperature=0.0, max_new_tokens=6, **overrides)
    return ChatSession(model.eval(), tokenizer, config)


def test_reply_matches_batched_greedy_generation_and_keeps_history(tiny_model, tiny_tokenizer):
    torch.manual_seed(0)
    session = greedy_session(tiny_model, tiny_tokenizer, system="be brief")
    first = session.reply("what is a cat", stream=False)
    # The reply is the generated ids after the prompt, up to EOS: the same text as the
    # batched greedy path used for evaluation, which renders the same conversation.
    expected = generate_replies(tiny_model, tiny_tokenizer,
                                [[{"role": "system", "content": "be brief"},
                                  {"role": "user", "content": "what is a cat"}]],
                                max_new_tokens=6)
    assert first == expected[0]
    session.reply("and a dog", stream=False)
    assert [m["role"] for m in session.messages] == [
        "system", "user", "assistant", "user", "assistant"]
    assert session.messages[2]["content"] == first
    session.reset()
    assert session.messages == [{"role": "system", "content": "be brief"}]


def test_second_turn_sees_the_first(tiny_model, tiny_tokenizer):
    session = greedy_session(tiny_model, tiny_tokenizer)
    session.reply("hello world", stream=False)
    history = list(session.messages)
    second = session.reply("what is a cat", stream=False)
    expected = generate_replies(tiny_model, tiny_tokenizer,
                                [history + [{"role": "user", "content": "what is a cat"}]],
                                max_new_tokens=6)
    assert second == expected[0]


def test_interactive_loop_handles_commands_and_ctrl_d(tiny_model, tiny_tokenizer,
                                                      monkeypatch, capsys):
    session = greedy_session(tiny_model, tiny_tokenizer)
    typed = iter(["hello world", "/reset", "", "what is a cat"])

    def fake_input(prompt: str = "") -> str:
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(builtins, "input", fake_input)
    interactive(session)  # returns on Ctrl-D (EOFError) instead of raising
    out = capsys.readouterr().out
    assert "(conversation cleared)" in out
    # After /reset only the last exchange is in the history.
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["what is a cat"]


def test_exit_command_and_ctrl_c_leave_cleanly(tiny_model, tiny_tokenizer, monkeypatch):
    session = greedy_session(tiny_model, tiny_tokenizer)
    monkeypatch.setattr(builtins, "input", lambda prompt="": "/exit")
    interactive(session)

    def interrupted(prompt: str = "") -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(builtins, "input", interrupted)
    interactive(session)
    assert session.messages == []


# -- chat as the adapter was trained ---------------------------------------------------------


def write_training_config(directory, record) -> str:
    with open(os.path.join(directory, "training_config.json"), "w") as f:
        json.dump(record, f)
    return str(directory)


def test_trained_chat_template_reads_the_run_record(tmp_path):
    assert trained_chat_template(str(tmp_path)) is None  # no record
    (tmp_path / "training_config.json").write_text("{not json")
    assert trained_chat_template(str(tmp_path)) is None
    run = write_training_config(tmp_path, {"chat_template": "none", "beta": 0.1})
    assert trained_chat_template(run) == "none"
    write_training_config(tmp_path, {"chat_template": "auto"})
    assert trained_chat_template(run) == "auto"
    # The run plan says what was really applied ("auto" with a tokenizer that had no
    # template: off), and wins over the flag's value.
    write_training_config(tmp_path, {"chat_template": "auto",
                                     RUN_PLAN_KEY: {"chat_template": False}})
    assert trained_chat_template(run) == "none"
    write_training_config(tmp_path, {"chat_template": "none",
                                     RUN_PLAN_KEY: {"chat_template": True}})
    assert trained_chat_template(run) == "auto"
    write_training_config(tmp_path, {"chat_template": "none", RUN_PLAN_KEY: {"other": 1}})
    assert trained_chat_template(run) == "none"


def test_chat_template_mode_flag_over_training_record(tmp_path):
    run = write_training_config(tmp_path, {"chat_template": "none"})
    assert chat_template_mode(ChatConfig(adapter_path=run)) == "none"
    assert chat_template_mode(ChatConfig(adapter_path=run, chat_template="auto")) == "auto"
    assert chat_template_mode(ChatConfig(adapter_path=run, no_adapter=True)) == "auto"
    assert chat_template_mode(ChatConfig(adapter_path=str(tmp_path / "nowhere"))) == "auto"


def test_adapter_trained_without_template_chats_in_plain_text(tiny_model, tiny_tokenizer,
                                                              tmp_path):
    run = write_training_config(tmp_path, {"chat_template": "none"})
    session = greedy_session(tiny_model, tiny_tokenizer, adapter_path=run)
    assert session.use_chat_template is False
    reply = session.reply("what is a cat", stream=False)
    # Rendered as training renders a message prompt without a template, not with the template.
    expected = generate_replies(tiny_model, tiny_tokenizer, [[{"role": "user",
                                                               "content": "what is a cat"}]],
                                use_chat_template=False, max_new_tokens=6)
    assert reply == expected[0]
    templated = greedy_session(tiny_model, tiny_tokenizer, adapter_path=run, chat_template="auto")
    assert templated.use_chat_template is True


def test_generation_stops_at_the_end_of_turn_token(tiny_tokenizer):
    chatml = family_tokenizer(tiny_tokenizer, "chatml", eos_token="<|endoftext|>")
    model = tiny_llama(vocab_size=len(chatml), hidden_size=64, num_layers=2, num_heads=4)
    session = greedy_session(model, chatml)
    im_end, endoftext = chatml.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    # The model's generation config eos (2), the tokenizer's eos and the template's turn end.
    assert session.stop_ids == [2, endoftext, im_end]
    prompt_ids = encode_prompt(chatml, [{"role": "user", "content": "what is a cat"}], True)
    generated = model.generate(torch.tensor([prompt_ids]), max_new_tokens=6, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt_ids):].tolist()
    # Pretend the third generated token ends the turn: the reply is the two before it.
    session.stop_ids = [generated[2]]
    assert session.reply("what is a cat", stream=False) == chatml.decode(
        generated[:2], skip_special_tokens=True).strip()
