"""Prompt/response boundary in token space, truncation, and the preference collator."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, processors
from transformers import PreTrainedTokenizerFast

from dpo_core.data import PreferencePair, to_pair
from dpo_core.tokenization import (
    PreferenceCollator,
    TokenizedPair,
    render_prompt,
    resolve_chat_template,
    tokenize_pair,
    tokenize_pairs,
)

ROOMY = {"max_length": 1000, "max_prompt_length": 500}


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def zephyr(*turns: tuple[str, str]) -> str:
    """The Zephyr template written out by hand, ending with the generation prompt."""
    return "".join(f"<|{role}|>\n{text}</s>\n" for role, text in turns) + "<|assistant|>\n"


@pytest.fixture()
def bos_eos_tokenizer(tiny_tokenizer):
    """The tiny tokenizer, but adding BOS and EOS around every text, like some LMs do."""
    backend = Tokenizer.from_str(tiny_tokenizer.backend_tokenizer.to_str())
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        special_tokens=[
            ("<s>", tiny_tokenizer.bos_token_id),
            ("</s>", tiny_tokenizer.eos_token_id),
        ],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


# -- rendering ------------------------------------------------------------------------------


def test_resolve_chat_template(tiny_tokenizer, monkeypatch):
    assert resolve_chat_template(tiny_tokenizer, "auto") is True
    assert resolve_chat_template(tiny_tokenizer, "none") is False
    with pytest.raises(ValueError, match="auto"):
        resolve_chat_template(tiny_tokenizer, "always")
    monkeypatch.setattr(tiny_tokenizer, "chat_template", None)
    assert resolve_chat_template(tiny_tokenizer, "auto") is False


def test_render_prompt(tiny_tokenizer):
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"}]
    assert render_prompt(tiny_tokenizer, messages, True) == zephyr(
        ("system", "Be kind."), ("user", "hi")
    )
    assert render_prompt(tiny_tokenizer, "hi", True) == zephyr(("user", "hi"))
    assert (
        render_prompt(tiny_tokenizer, messages, False) == "system: Be kind.\nuser: hi\nassistant: "
    )
    assert render_prompt(tiny_tokenizer, "Q: hi\nA:", False) == "Q: hi\nA:"


# -- each accepted shape, down to token ids -------------------------------------------------

HH_DIALOGUE = (
    "\n\nHuman: hello there\n\nAssistant: hi you\n\nHuman: why is the sky blue\n\nAssistant:"
)
SHAPES = {
    # name: (raw row, use_chat_template, prompt text as the model sees it, chosen, rejected)
    "ultrafeedback": (
        {
            "prompt": "what is one and one",
            "chosen": [
                {"role": "user", "content": "what is one and one"},
                {"role": "assistant", "content": "two"},
            ],
            "rejected": [
                {"role": "user", "content": "what is one and one"},
                {"role": "assistant", "content": "three"},
            ],
        },
        True,
        zephyr(("user", "what is one and one")),
        "two",
        "three",
    ),
    "standard, template": (
        {"prompt": "the quick brown fox", "chosen": "jumps over", "rejected": "runs under"},
        True,
        zephyr(("user", "the quick brown fox")),
        "jumps over",
        "runs under",
    ),
    "standard, no template": (
        {"prompt": "question: what is it?\nanswer:", "chosen": " a dog", "rejected": " a cat"},
        False,
        "question: what is it?\nanswer:",
        " a dog",
        " a cat",
    ),
    "conversational": (
        {
            "prompt": [
                {"role": "system", "content": "you are happy"},
                {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hello world"},
                {"role": "user", "content": "one two"},
            ],
            "chosen": [{"role": "assistant", "content": "three four"}],
            "rejected": [{"role": "assistant", "content": "sad"}],
        },
        True,
        zephyr(
            ("system", "you are happy"),
            ("user", "hello"),
            ("assistant", "hello world"),
            ("user", "one two"),
        ),
        "three four",
        "sad",
    ),
    "hh": (
        {"chosen": HH_DIALOGUE + " because of light", "rejected": HH_DIALOGUE + " no"},
        True,
        zephyr(("user", "hello there"), ("assistant", "hi you"), ("user", "why is the sky blue")),
        "because of light",
        "no",
    ),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_each_shape_gives_the_right_prompt_and_response_tokens(tiny_tokenizer, shape):
    row, use_template, prompt_text, chosen, rejected = SHAPES[shape]
    pair = to_pair(row, "test")
    tokenized = tokenize_pair(tiny_tokenizer, pair, use_chat_template=use_template, **ROOMY)
    eos = tiny_tokenizer.eos_token_id
    # These texts have clean boundaries: prompt and replies tokenize the same alone or joined.
    assert tokenized.prompt_ids == ids(tiny_tokenizer, prompt_text)
    assert tokenized.chosen_ids == ids(tiny_tokenizer, chosen) + [eos]
    assert tokenized.rejected_ids == ids(tiny_tokenizer, rejected) + [eos]
    assert tokenized.prompt_ids + tokenized.chosen_ids == ids(
        tiny_tokenizer, prompt_text + chosen
    ) + [eos]


def test_template_sequence_equals_the_templated_full_conversation(tiny_tokenizer):
    prompt = [
        {"role": "system", "content": "you are happy"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "one two"},
    ]
    pair = PreferencePair(prompt, "three four", "sad")
    tokenized = tokenize_pair(tiny_tokenizer, pair, use_chat_template=True, **ROOMY)
    for reply, response_ids in (
        (pair.chosen, tokenized.chosen_ids),
        (pair.rejected, tokenized.rejected_ids),
    ):
        conversation = prompt + [{"role": "assistant", "content": reply}]
        full = tiny_tokenizer.apply_chat_template(conversation, tokenize=False)
        # The template closes the reply with "</s>\n": our sequence ends at the EOS.
        assert tokenized.prompt_ids + response_ids == ids(tiny_tokenizer, full.removesuffix("\n"))


# -- the boundary where joint and separate tokenization differ ------------------------------


def test_boundary_when_the_prompt_end_merges_into_the_response(tiny_tokenizer):
    prompt, chosen, rejected = "Assistant: ", "the cat", "\nno"
    eos = tiny_tokenizer.eos_token_id
    naive = ids(tiny_tokenizer, prompt) + ids(tiny_tokenizer, chosen)
    joint = ids(tiny_tokenizer, prompt + chosen)
    assert naive != joint  # the byte-level BPE merges "Assistant: " + "the" into "... Ġthe"
    assert ids(tiny_tokenizer, prompt + rejected)[: len(ids(tiny_tokenizer, prompt))] == ids(
        tiny_tokenizer, prompt
    )  # ...but the rejected reply does not merge: the shared prompt must still be the same

    tokenized = tokenize_pair(
        tiny_tokenizer, PreferencePair(prompt, chosen, rejected), use_chat_template=False, **ROOMY
    )
    # The prompt ids stop before the merged space, for both replies.
    assert tokenized.prompt_ids == ids(tiny_tokenizer, "Assistant:")
    # Prompt + response is the real tokenization of the whole text, then EOS.
    assert tokenized.prompt_ids + tokenized.chosen_ids == joint + [eos]
    assert tokenized.prompt_ids + tokenized.rejected_ids == ids(
        tiny_tokenizer, prompt + rejected
    ) + [eos]
    # Response labels hold the whole reply (with the space it absorbed) and nothing else.
    assert tiny_tokenizer.decode(tokenized.chosen_ids) == " the cat</s>"
    assert tiny_tokenizer.decode(tokenized.rejected_ids) == " \nno</s>"


def test_tokenizer_special_tokens_only_at_the_ends(bos_eos_tokenizer):
    """Without a template, plain text gets the tokenizer's BOS once; EOS never ends a prompt."""
    tokenizer = bos_eos_tokenizer
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pair = PreferencePair("question: why?\nanswer:", " yes", " no no")
    tokenized = tokenize_pair(tokenizer, pair, use_chat_template=False, **ROOMY)
    assert tokenized.prompt_ids == [bos] + ids(tokenizer, pair.prompt)
    assert tokenized.chosen_ids == ids(tokenizer, " yes") + [eos]
    assert tokenized.rejected_ids == ids(tokenizer, " no no") + [eos]
    # With a template its text is tokenized as is: the tokenizer adds no BOS (nor EOS).
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with_template = tokenize_pair(tokenizer, pair, use_chat_template=True, **ROOMY)
    assert with_template.prompt_ids == ids(tokenizer, pair.prompt)


# -- truncation -----------------------------------------------------------------------------


def long_pair() -> PreferencePair:
    words = "one two three four five six seven eight nine ten".split()
    return PreferencePair(
        " ".join(words * 3), " " + " ".join(words * 2), " " + " ".join(reversed(words * 2))
    )


def test_truncation_keeps_prompt_end_and_response_start(tiny_tokenizer):
    pair = long_pair()
    full = tokenize_pair(tiny_tokenizer, pair, use_chat_template=False, **ROOMY)
    assert len(full.prompt_ids) > 12 and min(len(full.chosen_ids), len(full.rejected_ids)) > 18

    cut = tokenize_pair(
        tiny_tokenizer, pair, max_length=30, max_prompt_length=12, use_chat_template=False
    )
    assert cut.prompt_ids == full.prompt_ids[-12:]
    assert cut.chosen_ids == full.chosen_ids[:18]
    assert cut.rejected_ids == full.rejected_ids[:18]
    assert cut.chosen_ids[-1] != tiny_tokenizer.eos_token_id  # the cut took the EOS


def test_no_truncation_when_everything_fits(tiny_tokenizer):
    pair = long_pair()
    full = tokenize_pair(tiny_tokenizer, pair, use_chat_template=False, **ROOMY)
    total = len(full.prompt_ids) + max(len(full.chosen_ids), len(full.rejected_ids))
    # The prompt is longer than max_prompt_length, but the pair fits in max_length: untouched.
    fits = tokenize_pair(
        tiny_tokenizer, pair, max_length=total, max_prompt_length=4, use_chat_template=False
    )
    assert fits == full


def test_short_prompt_long_responses_cut_only_responses(tiny_tokenizer):
    pair = PreferencePair("hello", " " + " ".join(["yes"] * 30), " no")
    full = tokenize_pair(tiny_tokenizer, pair, use_chat_template=False, **ROOMY)
    cut = tokenize_pair(
        tiny_tokenizer, pair, max_length=10, max_prompt_length=5, use_chat_template=False
    )
    assert cut.prompt_ids == full.prompt_ids
    assert cut.chosen_ids == full.chosen_ids[: 10 - len(full.prompt_ids)]
    assert cut.rejected_ids == full.rejected_ids  # short enough: keeps its EOS


def test_pair_whose_response_would_vanish_is_dropped_and_counted(tiny_tokenizer):
    limits = {"max_length": 12, "max_prompt_length": 12, "use_chat_template": False}
    short = PreferencePair("hi", " yes", " no")
    assert tokenize_pair(tiny_tokenizer, long_pair(), **limits) is None
    kept, dropped = tokenize_pairs(
        tiny_tokenizer, [short, long_pair(), short], disable=True, **limits
    )
    assert dropped == 1
    assert kept == [tokenize_pair(tiny_tokenizer, short, **limits)] * 2


# -- collation ------------------------------------------------------------------------------

PAD = 99
PAIRS = [TokenizedPair([1, 2, 3], [4, 5], [6]), TokenizedPair([7], [8, 9, 10, 11], [12, 13])]
X = -100


def test_collator_right_padding():
    batch = PreferenceCollator(PAD)(PAIRS)
    expected = {
        "chosen_input_ids": [[1, 2, 3, 4, 5], [7, 8, 9, 10, 11]],
        "chosen_attention_mask": [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]],
        "chosen_labels": [[X, X, X, 4, 5], [X, 8, 9, 10, 11]],
        "rejected_input_ids": [[1, 2, 3, 6, PAD], [7, 12, 13, PAD, PAD]],
        "rejected_attention_mask": [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]],
        "rejected_labels": [[X, X, X, 6, X], [X, 12, 13, X, X]],
        "prompt_lengths": [3, 1],
    }
    assert {k: v.tolist() for k, v in batch.items()} == expected
    assert all(v.dtype == torch.long for v in batch.values())


def test_collator_left_padding_to_a_multiple():
    batch = PreferenceCollator(PAD, padding_side="left", pad_to_multiple_of=4)(PAIRS)
    P = PAD
    expected = {
        "chosen_input_ids": [[P, P, P, 1, 2, 3, 4, 5], [P, P, P, 7, 8, 9, 10, 11]],
        "chosen_attention_mask": [[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1]],
        "chosen_labels": [[X, X, X, X, X, X, 4, 5], [X, X, X, X, 8, 9, 10, 11]],
        "rejected_input_ids": [[P, P, P, P, 1, 2, 3, 6], [P, P, P, P, P, 7, 12, 13]],
        "rejected_attention_mask": [[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1, 1]],
        "rejected_labels": [[X, X, X, X, X, X, X, 6], [X, X, X, X, X, X, 12, 13]],
        "prompt_lengths": [3, 1],
    }
    assert {k: v.tolist() for k, v in batch.items()} == expected


def test_collator_keeps_eos_label_when_pad_is_eos():
    eos = 2
    batch = PreferenceCollator(pad_token_id=eos)([TokenizedPair([5], [6, eos], [eos])])
    assert batch["rejected_input_ids"].tolist() == [[5, eos, eos]]
    assert batch["rejected_labels"].tolist() == [[X, eos, X]]  # the reply's EOS, not the pad


def test_collated_tokenized_pairs_round_trip(tiny_tokenizer):
    pairs = [long_pair(), PreferencePair("hi", " yes", " no")]
    tokenized, _ = tokenize_pairs(
        tiny_tokenizer, pairs, use_chat_template=True, disable=True, **ROOMY
    )
    batch = PreferenceCollator(tiny_tokenizer.eos_token_id)(tokenized)
    for name in ("chosen", "rejected"):
        for row, pair in enumerate(tokenized):
            mask = batch[f"{name}_attention_mask"][row].bool()
            response = getattr(pair, f"{name}_ids")
            assert batch[f"{name}_input_ids"][row][mask].tolist() == pair.prompt_ids + response
            labels = batch[f"{name}_labels"][row]
            assert labels[labels != X].tolist() == response
