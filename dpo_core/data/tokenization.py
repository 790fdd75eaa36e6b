"""Turn preference pairs into token ids and truncate them.

With a chat template (`--chat_template auto` and the tokenizer has one):
    The template's rendering is what is trained. The prompt messages (a plain-text prompt is one
    user message) are rendered with the generation prompt, and prompt + each reply (one
    assistant message) is rendered as a whole conversation, both with the pair's `tools`
    (trl's column; a tool-calling template writes their schemas into the prompt); both texts
    are tokenized as they are (no special tokens added: the template writes BOS itself if it
    wants one). The response ids are the conversation's ids after the prompt's ids, so they
    hold whatever the template writes around the reply: a think block (Qwen3), trimming
    (Llama-3, Gemma), the end-of-turn marker (`<|eot_id|>`, `<|im_end|>`, `<end_of_turn>`,
    `<|end|>`, `</s>`).
    - End of the response: the response stops right after the template's end-of-turn token
      (found once per tokenizer by `end_of_turn_ids`: the first special token the template writes
      after an assistant reply). What the template writes after that token (ChatML's and
      Gemma's newline, Phi-3's closing `<|endoftext|>`) is not trained: generation stops at the
      end-of-turn token, so the model never emits those tokens, and in a longer conversation the
      newline belongs to the next prompt. (trl 1.16 trains them; its response ids are one or two
      tokens longer for those families.) EOS is appended only when the template writes no
      end-of-turn token after the reply, so every untruncated response ends with a stop token and
      never with one the template does not write there.
    - Hard check: the prompt's ids must be a prefix of the conversation's ids. If not (a template
      that renders earlier turns differently once a reply follows, or a reply whose first
      characters merge with the end of the generation prompt into one token) the row stops with a
      `DataError` naming the row and the mismatch, or is dropped and counted with
      `--skip_bad_rows`; prompt tokens are never labelled as response (trl 1.16 instead starts the
      response where the two diverge and leaves the prompt's tail out of the sequence, with a
      warning).
    - A template that raises on the messages (e.g. a system message for a template without a
      system role) is the same kind of bad row, reported with the template's own message.

Without a template (`--chat_template none`, or the tokenizer has none), plain text:
    The prompt is rendered to text P (a plain-text prompt as is, HH dialogues exactly as the
    dataset writes them, messages as "role: content" lines then "assistant: "); P, P + chosen and
    P + rejected are tokenized with the tokenizer's usual special tokens. The prompt ids are the
    longest common prefix of the three, each response is the rest of its joint tokenization, plus
    EOS unless it already ends with EOS. Byte-level BPE can merge the end of P into the first
    response token (P ending with a space, then "the" -> " the"); that token then belongs to the
    response, in both responses alike.

Truncation, only when prompt + longest response exceeds `max_length` (0 < max_prompt_length <
max_length):
    1. the prompt keeps its last max(max_prompt_length, max_length - longest response) tokens:
       it loses only the leading tokens that must go, and keeps at least `max_prompt_length`;
    2. both responses keep their first `max_length - len(prompt)` tokens (a cut response loses
       its end-of-turn token).
    Chosen and rejected keep the same prompt ids. No pair is ever dropped by truncation.
    trl 1.16 (`truncation_mode="keep_start"`, its default; it has no prompt limit) cuts each
    prompt + response to its first `max_length` tokens and drops pairs whose prompt alone fills
    `max_length`. The two agree whenever the prompt has at most `max_prompt_length` tokens;
    for a longer prompt trl keeps all of it and cuts (or loses) the replies, this project cuts
    the prompt's start first.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from jinja2.exceptions import TemplateError
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from dpo_core.data.pairs import PreferencePair
from dpo_core.data.sources import DropCounts
from dpo_core.data.templates import Messages, as_messages, end_of_turn_ids, pair_view, render_prompt
from dpo_core.errors import DataError

IGNORE_INDEX = -100

# Pairs per tokenizer call in `tokenize_pairs`: a fast tokenizer encodes a call's texts in
# parallel, and the per-call overhead is paid once per batch.
ENCODE_BATCH = 64


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one pair; `chosen_ids` / `rejected_ids` are the response tokens, ending
    with the template's end-of-turn token (or EOS), unless truncation cut it."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def tokenize_pair(
    tokenizer: PreTrainedTokenizerBase,
    pair: PreferencePair,
    *,
    max_length: int,
    max_prompt_length: int,
    use_chat_template: bool,
    end_of_turn: Sequence[int] | None = None,
) -> TokenizedPair:
    """Tokenize and truncate one pair (rules in the module docstring).

    `end_of_turn` is `end_of_turn_ids(tokenizer)`, computed here when not given. Raises
    `DataError` (naming `pair.origin`) when the template rejects the messages or its prompt is
    not a token prefix of the conversation.
    """
    _check_lengths(max_length, max_prompt_length)
    if use_chat_template and end_of_turn is None:
        end_of_turn = end_of_turn_ids(tokenizer)
    (result,) = tokenize_batch(tokenizer, [pair], max_length=max_length,
                               max_prompt_length=max_prompt_length,
                               use_chat_template=use_chat_template, end_of_turn=end_of_turn or [])
    if isinstance(result, DataError):
        raise result
    return result


def _check_lengths(max_length: int, max_prompt_length: int) -> None:
    if not 0 < max_prompt_length < max_length:
        raise ValueError(
            f"need 0 < max_prompt_length < max_length, got {max_prompt_length} and {max_length}"
        )


def truncate(
    prompt_ids: list[int],
    chosen_ids: list[int],
    rejected_ids: list[int],
    max_length: int,
    max_prompt_length: int,
) -> TokenizedPair:
    """Fit prompt + longest response into `max_length` (policy in the module docstring)."""
    longest = max(len(chosen_ids), len(rejected_ids))
    if len(prompt_ids) + longest <= max_length:
        return TokenizedPair(prompt_ids, chosen_ids, rejected_ids)
    keep = min(len(prompt_ids), max(max_prompt_length, max_length - longest))
    prompt_ids = prompt_ids[len(prompt_ids) - keep:]
    budget = max_length - keep
    return TokenizedPair(prompt_ids, chosen_ids[:budget], rejected_ids[:budget])


def tokenize_pairs(
    tokenizer: PreTrainedTokenizerBase,
    pairs: Iterable[PreferencePair],
    *,
    max_length: int,
    max_prompt_length: int,
    use_chat_template: bool,
    skip_bad_rows: bool = False,
    desc: str = "Tokenizing",
    disable: bool | None = None,
) -> tuple[list[TokenizedPair], DropCounts]:
    """Tokenize every pair; returns the kept pairs and the dropped ones counted by reason.

    A pair the template cannot render faithfully (see `tokenize_pair`) raises `DataError`, or
    is dropped and counted when `skip_bad_rows`. `disable` hides the progress bar (None: hidden
    when stderr is not a terminal).
    """
    _check_lengths(max_length, max_prompt_length)
    end_of_turn = end_of_turn_ids(tokenizer) if use_chat_template else []
    kept: list[TokenizedPair] = []
    drops: DropCounts = Counter()
    progress = tqdm(pairs, desc=desc, unit="pair", disable=disable)
    for batch in _batches(progress, ENCODE_BATCH):
        for result in tokenize_batch(tokenizer, batch, max_length=max_length,
                                     max_prompt_length=max_prompt_length,
                                     use_chat_template=use_chat_template,
                                     end_of_turn=end_of_turn):
            if isinstance(result, DataError):
                if not skip_bad_rows:
                    raise result
                drops[result.reason] += 1
            else:
                kept.append(result)
    return kept, drops


def tokenize_batch(
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PreferencePair],
    *,
    max_length: int,
    max_prompt_length: int,
    use_chat_template: bool,
    end_of_turn: Sequence[int],
) -> list[TokenizedPair | DataError]:
    """Each pair tokenized and truncated, or the DataError that rejects it, in order, with
    one tokenizer call (`end_of_turn`: `end_of_turn_ids(tokenizer)`, or [] without the
    template)."""
    return [result if isinstance(result, DataError)
            else truncate(*result, max_length, max_prompt_length)
            for result in _tokenize_batch(tokenizer, pairs, use_chat_template, end_of_turn)]


Ids = tuple[list[int], list[int], list[int]]  # prompt, chosen response, rejected response


def _batches(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last may be shorter); itertools.batched is 3.12+."""
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _tokenize_batch(
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PreferencePair],
    use_chat_template: bool,
    end_of_turn: Sequence[int],
) -> list[Ids | DataError]:
    """Each pair's untruncated ids, or the DataError that rejects it, in order. The texts of
    all pairs are encoded in one tokenizer call, which a fast tokenizer runs in parallel."""
    rendered: list[tuple[str, str, str] | DataError] = []
    for pair in pairs:
        try:
            rendered.append(_render_texts(tokenizer, pair, use_chat_template))
        except DataError as error:
            rendered.append(error)
    texts = [text for r in rendered if not isinstance(r, DataError) for text in r]
    # A template writes its own special tokens; plain text gets the tokenizer's usual ones.
    encoded = iter(encode(tokenizer, texts, add_special_tokens=not use_chat_template)
                   if texts else [])
    results: list[Ids | DataError] = []
    for pair, texts_of_pair in zip(pairs, rendered, strict=True):
        if isinstance(texts_of_pair, DataError):
            results.append(texts_of_pair)
            continue
        ids = (next(encoded), next(encoded), next(encoded))
        try:
            results.append(_template_ids(tokenizer, pair.origin or "pair", texts_of_pair, ids,
                                         end_of_turn) if use_chat_template
                           else _text_ids(tokenizer, ids))
        except DataError as error:
            results.append(error)
    return results


def encode(tokenizer: PreTrainedTokenizerBase, texts: list[str],
           add_special_tokens: bool) -> list[list[int]]:
    """`tokenizer(texts, add_special_tokens=...)["input_ids"]`, faster where that call is the
    plain one: a fast tokenizer of a class that keeps transformers' own encoding, no
    truncation or padding set on its backend, special tokens not split. The backend then
    encodes without computing character offsets (`encode_batch_fast`), which is what that
    call does, less the offsets and the conversion. Anything else takes the call itself."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if (type(tokenizer)._encode_plus is not TokenizersBackend._encode_plus
            or type(tokenizer).__call__ is not PreTrainedTokenizerBase.__call__
            or backend is None or not hasattr(backend, "encode_batch_fast")
            or backend.truncation is not None or backend.padding is not None
            or backend.encode_special_tokens != tokenizer.split_special_tokens):
        return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    return [encoding.ids for encoding in
            backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]


def _render_texts(
    tokenizer: PreTrainedTokenizerBase, pair: PreferencePair, use_chat_template: bool
) -> tuple[str, str, str]:
    """(prompt, prompt + chosen, prompt + rejected) as text: with the template, the prompt
    messages with the generation prompt and each whole conversation; else plain text."""
    prompt, chosen, rejected = pair_view(pair, use_chat_template)
    if not use_chat_template:
        if pair.tools:
            raise DataError(
                f"{pair.origin or 'pair'}, field 'tools': tool schemas need a chat template to "
                "render them, and this run uses plain text (--chat_template none, or the "
                "tokenizer has no template); --skip_bad_rows drops such rows",
                reason="tools: no chat template to render them")
        prompt_text = render_prompt(tokenizer, prompt, use_chat_template=False)
        return prompt_text, prompt_text + chosen, prompt_text + rejected
    messages = as_messages(prompt)

    def render(conversation: Messages, generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(
                conversation, tools=pair.tools, tokenize=False,
                add_generation_prompt=generation_prompt
            )
        except TemplateError as error:
            raise DataError(
                f"{pair.origin or 'pair'}: the chat template rejects these messages: {error} "
                "(--skip_bad_rows drops such rows)",
                reason=f"chat template error: {error}",
            ) from None

    return (render(messages, True),
            *(render(messages + [{"role": "assistant", "content": reply}], False)
              for reply in (chosen, rejected)))


def _text_ids(tokenizer: PreTrainedTokenizerBase, ids: Ids) -> Ids:
    """Plain text: the prompt is the longest common prefix of the three encodings."""
    prompt_ids, chosen_full, rejected_full = ids
    boundary = min(
        _common_prefix_length(prompt_ids, chosen_full),
        _common_prefix_length(prompt_ids, rejected_full),
    )
    eos = tokenizer.eos_token_id
    return (
        prompt_ids[:boundary],
        _with_eos(chosen_full[boundary:], eos),
        _with_eos(rejected_full[boundary:], eos),
    )


def _template_ids(
    tokenizer: PreTrainedTokenizerBase,
    origin: str,
    texts: tuple[str, str, str],
    ids: Ids,
    end_of_turn: Sequence[int],
) -> Ids:
    """Chat template: each response is its conversation's ids after the prompt's, which must
    be a prefix of them, cut after the end-of-turn token (module docstring)."""
    prompt_text, prompt_ids = texts[0], ids[0]
    responses = []
    for field, full_text, full_ids in zip(("chosen", "rejected"), texts[1:], ids[1:],
                                          strict=True):
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise DataError(
                f"{origin}, field '{field}': the prompt rendered by the chat template is not a "
                f"token prefix of the conversation rendered with this reply: "
                f"{_prefix_mismatch(tokenizer, prompt_text, full_text, prompt_ids, full_ids)}. "
                "Training on it would label prompt tokens as response (--skip_bad_rows drops "
                "such rows; --chat_template none trains on plain text).",
                reason="chat template: the prompt is not a token prefix of the conversation",
            )
        response = full_ids[len(prompt_ids):]
        ends = [i for i, token in enumerate(response) if token in end_of_turn]
        if ends:  # stop after the template's end-of-turn token (module docstring)
            responses.append(response[: ends[-1] + 1])
        else:
            responses.append(_with_eos(response, tokenizer.eos_token_id))
    return prompt_ids, responses[0], responses[1]


def _prefix_mismatch(
    tokenizer: PreTrainedTokenizerBase,
    prompt_text: str,
    full_text: str,
    prompt_ids: list[int],
    full_ids: list[int],
) -> str:
    """Where and why the prompt's rendering and the conversation's part ways."""
    if not full_text.startswith(prompt_text):
        at = _common_prefix_length(prompt_text, full_text)
        return (
            f"the texts differ from character {at}: the prompt has "
            f"{prompt_text[max(0, at - 20): at + 20]!r}, the conversation "
            f"{full_text[max(0, at - 20): at + 20]!r} (the template renders the earlier turns "
            "differently once a reply follows)"
        )
    at = _common_prefix_length(prompt_ids, full_ids)
    return (
        f"the texts agree, but the prompt's last tokens {tokenizer.decode(prompt_ids[at:])!r} "
        f"and the reply's first characters are tokenized together as "
        f"{tokenizer.decode(full_ids[at: at + 1])!r} (often a reply that "
        "starts with whitespace)"
    )


def _common_prefix_length(a: Sequence, b: Sequence) -> int:
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length


def _with_eos(ids: list[int], eos_token_id: int | None) -> list[int]:
    if eos_token_id is None or (ids and ids[-1] == eos_token_id):
        return ids
    return ids + [eos_token_id]
