"""Chat templates: whether one applies, how a prompt is rendered, and where a reply ends.

Shared by training (`dpo_core.data.tokenization`), generation and chat, so the model is
prompted exactly as it was trained: `render_prompt` / `encode_prompt` give a prompt's text and
ids ending where the assistant's reply begins, `end_of_turn_ids` finds the token the template
writes after a reply (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, ...) and `stop_token_ids`
is where generation stops.
"""

from __future__ import annotations

from jinja2.exceptions import TemplateError
from transformers import PreTrainedTokenizerBase

from dpo_core.config.fields import CHAT_TEMPLATE_MODES
from dpo_core.data.pairs import PreferencePair

Messages = list[dict[str, str]]

Prompt = Messages | str

# An assistant reply no template rewrites (no whitespace to trim, no think tags).
_PROBE_REPLY = "dpo-probe-reply"


def resolve_chat_template(tokenizer: PreTrainedTokenizerBase, mode: str) -> bool:
    """Whether to apply the chat template: mode "auto" (if the tokenizer has one) or "none"."""
    if mode not in CHAT_TEMPLATE_MODES:
        raise ValueError(f"chat template mode must be one of {CHAT_TEMPLATE_MODES}, got {mode!r}")
    return mode == "auto" and bool(getattr(tokenizer, "chat_template", None))


def as_messages(prompt: Prompt) -> Messages:
    """A plain-text prompt becomes one user message; messages stay as they are."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def pair_view(pair: PreferencePair, use_chat_template: bool) -> tuple[Prompt, str, str]:
    """(prompt, chosen, rejected) as the model sees them: an HH row without a template keeps
    the dataset's raw text, with a template its dialogue parsed into messages."""
    if pair.raw_text is not None and not use_chat_template:
        return pair.raw_text
    return pair.prompt, pair.chosen, pair.rejected


def render_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: Prompt, use_chat_template: bool,
    tools: list[dict] | None = None,
) -> str:
    """The prompt as text, ending where the assistant's reply begins.

    With the chat template: the messages (`as_messages`) with the generation prompt, and the
    `tools` schemas passed to the template as trl passes them. Without it, a plain text prompt
    is used as is and messages become "role: content" lines then "assistant: " (no tools).
    Raises jinja2's `TemplateError` if the template rejects the messages.
    """
    if use_chat_template:
        return tokenizer.apply_chat_template(
            as_messages(prompt), tools=tools, tokenize=False, add_generation_prompt=True
        )
    if isinstance(prompt, str):
        return prompt
    return "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant: "


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: Prompt, use_chat_template: bool
) -> list[int]:
    """Token ids of the rendered prompt, as generation sees them (a template's text gets no
    added special tokens; plain text gets the tokenizer's usual ones)."""
    text = render_prompt(tokenizer, prompt, use_chat_template)
    return tokenizer(text, add_special_tokens=not use_chat_template)["input_ids"]


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The token the chat template writes to close an assistant reply, as a 0- or 1-element list.

    Found by rendering a probe conversation and taking the first special token after the reply
    (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `<|end|>`, `</s>`). Empty when the tokenizer
    has no template, the template writes no special token there, or it rejects the probe.
    """
    if not getattr(tokenizer, "chat_template", None):
        return []
    probe = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": _PROBE_REPLY}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False)
    except TemplateError:
        return []
    end = text.rfind(_PROBE_REPLY)
    if end < 0:
        return []
    after = tokenizer(text[end + len(_PROBE_REPLY):], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {
        token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special
    }
    return next(([token_id] for token_id in after if token_id in special), [])


def stop_token_ids(
    tokenizer: PreTrainedTokenizerBase, use_chat_template: bool, generation_eos: object = None
) -> list[int]:
    """Ids at which generation stops: `generation_eos` (a generation config's `eos_token_id`,
    int or list), the tokenizer's EOS, and with the template its end-of-turn token."""
    if isinstance(generation_eos, int):
        generation_eos = [generation_eos]
    candidates = list(generation_eos or []) + [tokenizer.eos_token_id]
    if use_chat_template:
        candidates += end_of_turn_ids(tokenizer)
    return list(dict.fromkeys(i for i in candidates if i is not None))
