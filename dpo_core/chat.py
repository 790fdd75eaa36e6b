"""Multi-turn chat with a base model plus a trained adapter, streaming tokens as they come.

The conversation is rendered and tokenized by the same code as training (`encode_prompt`), with
the chat-template setting the adapter was trained with (`trained_chat_template`, overridden by
`--chat_template`), and generation stops at the template's end-of-turn token as well as at the
generation config's and tokenizer's EOS (`stop_token_ids`).
"""

from __future__ import annotations

import sys

import torch
from transformers import PreTrainedTokenizerBase, TextStreamer

from dpo_core.config.chat import ChatConfig
from dpo_core.config.fields import CHAT_TEMPLATE_MODES
from dpo_core.data.templates import encode_prompt, resolve_chat_template
from dpo_core.modeling.generation import model_stop_ids, until_stop
from dpo_core.run_files import CONFIG_FILE, RUN_PLAN_KEY, read_json


def trained_chat_template(adapter_dir: str) -> str | None:
    """The chat-template mode ("auto" / "none") a run was trained with, from the
    `training_config.json` in its output directory; None if that cannot be told.

    The run plan's `chat_template` (whether the template was really applied) wins over the
    flag value recorded beside it (an older run has only the flag).
    """
    try:
        recorded = read_json(adapter_dir, CONFIG_FILE)
    except (OSError, ValueError):
        return None
    if not isinstance(recorded, dict):
        return None
    plan = recorded.get(RUN_PLAN_KEY)
    applied = plan.get("chat_template") if isinstance(plan, dict) else None
    if isinstance(applied, bool):
        return "auto" if applied else "none"
    flag = recorded.get("chat_template")
    return flag if flag in CHAT_TEMPLATE_MODES else None


def chat_template_mode(config: ChatConfig) -> str:
    """The flag if given, else the adapter's training setting, else "auto"."""
    if config.chat_template is not None:
        return config.chat_template
    if config.no_adapter:
        return "auto"
    return trained_chat_template(config.adapter_path) or "auto"


class ChatSession:
    """Conversation history plus generation; the reply is cut from the output by token ids."""

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                 config: ChatConfig):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.use_chat_template = resolve_chat_template(tokenizer, chat_template_mode(config))
        self.stop_ids = model_stop_ids(model, tokenizer, self.use_chat_template)
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, str]] = []
        if self.config.system:
            self.messages.append({"role": "system", "content": self.config.system})

    @torch.no_grad()
    def reply(self, user_text: str, stream: bool = True) -> str:
        """Add the user's turn, generate (printing tokens as they come if `stream`), and add
        the assistant's turn to the history."""
        self.messages.append({"role": "user", "content": user_text})
        prompt_ids = encode_prompt(self.tokenizer, self.messages, self.use_chat_template)
        input_ids = torch.tensor([prompt_ids], device=next(self.model.parameters()).device)
        sampling = self.config.temperature > 0
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True) \
            if stream else None
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=self.config.max_new_tokens,
            do_sample=sampling,
            temperature=self.config.temperature if sampling else None,
            top_p=self.config.top_p if sampling else None,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.stop_ids,
            streamer=streamer,
        )
        reply_ids = until_stop(output[0, input_ids.shape[1]:].tolist(), self.stop_ids)
        reply = self.tokenizer.decode(reply_ids, skip_special_tokens=True).strip()
        self.messages.append({"role": "assistant", "content": reply})
        return reply


def interactive(session: ChatSession) -> None:
    """Read-eval-print loop: /reset clears the history, /exit, Ctrl-C or Ctrl-D leave."""
    print("Chat started. /reset clears the conversation, /exit (or Ctrl-D) quits.")
    while True:
        try:
            user_text = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not user_text:
            continue
        if user_text == "/exit":
            return
        if user_text == "/reset":
            session.reset()
            print("(conversation cleared)")
            continue
        print("assistant> ", end="", flush=True)
        try:
            session.reply(user_text, stream=True)
        except KeyboardInterrupt:
            # Stop this reply, keep the session; the unanswered turn is dropped.
            session.messages.pop()
            print("\n(interrupted)", file=sys.stderr)
