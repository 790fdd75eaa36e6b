"""Multi-turn chat with a base model plus a trained adapter, streaming tokens as they come."""

from __future__ import annotations

import sys

import torch
from transformers import PreTrainedTokenizerBase, TextStreamer

from dpo_core.chat_config import ChatConfig
from dpo_core.tokenization import render_prompt

__all__ = ["ChatConfig", "ChatSession", "interactive"]


class ChatSession:
    """Conversation history plus generation; the reply is cut from the output by token ids."""

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                 config: ChatConfig):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.use_chat_template = tokenizer.chat_template is not None
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
        text = render_prompt(self.tokenizer, self.messages, self.use_chat_template)
        input_ids = self.tokenizer(text, add_special_tokens=not self.use_chat_template,
                                   return_tensors="pt").input_ids
        input_ids = input_ids.to(next(self.model.parameters()).device)
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
            eos_token_id=self.tokenizer.eos_token_id,
            streamer=streamer,
        )
        reply_ids = output[0, input_ids.shape[1]:].tolist()
        if self.tokenizer.eos_token_id in reply_ids:
            reply_ids = reply_ids[: reply_ids.index(self.tokenizer.eos_token_id)]
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
