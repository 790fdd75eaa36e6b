"""chat.py's session: multi-turn history, /reset, replies cut by token ids, the CLI loop."""

from __future__ import annotations

import builtins

import torch

from dpo_core.chat import ChatConfig, ChatSession, interactive
from dpo_core.generation import generate_replies


def greedy_session(model, tokenizer, **overrides) -> ChatSession:
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
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
