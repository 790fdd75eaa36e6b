"""Prompt/response boundary in token space, truncation, and the preference collator."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import FAMILIES, family_tokenizer, write_jsonl
from tokenizers import Tokenizer, processors
from transformers import PreTrainedTokenizerFast

from dpo_core.config.train import TrainConfig
from dpo_core.console import configure_console
from dpo_core.data.batches import PreferenceCollator
from dpo_core.data.pairs import PreferencePair, load_pairs, to_pair
from dpo_core.data.templates import (
    end_of_turn_ids,
    render_prompt,
    resolve_chat_template,
    stop_token_ids,
)
from dpo_core.data.tokenization import (
    ENCODE_BATCH,
    TokenizedPair,
    tokenize_pair,
    tokenize_pairs,
    truncate,
)
from dpo_core.data.training_data import build_training_data
from dpo_core.errors import DataError

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
    # Without a template HH keeps the dataset's text: the prompt up to the last "Assistant:",
    # the replies with their leading space.
    "hh, no template": (
        {"chosen": HH_DIALOGUE + " because of light", "rejected": HH_DIALOGUE + " no"},
        False,
        HH_DIALOGUE,
        " because of light",
        " no",
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


def test_long_prompt_loses_only_the_tokens_that_must_go():
    prompt, chosen, rejected = list(range(100, 120)), [1, 2, 3, 4], [5, 6, 7, 8, 9]
    # 20 + 5 > 22: three leading prompt tokens go, not the 12 that --max_prompt_length 8 would cut.
    cut = truncate(prompt, chosen, rejected, max_length=22, max_prompt_length=8)
    assert cut == TokenizedPair(prompt[3:], chosen, rejected)
    # Long responses: the prompt keeps max_prompt_length tokens, the responses their start.
    long_reply = list(range(50))
    cut = truncate(prompt, long_reply, rejected, max_length=22, max_prompt_length=8)
    assert cut == TokenizedPair(prompt[-8:], long_reply[:14], rejected)
    # A short prompt is never cut, whatever the responses.
    cut = truncate(prompt[:5], long_reply, rejected, max_length=22, max_prompt_length=8)
    assert cut == TokenizedPair(prompt[:5], long_reply[:17], rejected)


def trl_keep_start(prompt: list[int], response: list[int], max_length: int) -> list[int] | None:
    """trl 1.16's rule (DataCollatorForPreference, truncation_mode="keep_start", its default):
    prompt + response cut to its first max_length tokens; a pair whose prompt alone fills
    max_length is dropped (None)."""
    if len(prompt) >= max_length:
        return None
    return (prompt + response)[:max_length]


@pytest.mark.parametrize("prompt_length", [1, 5, 8, 9, 15, 30])
@pytest.mark.parametrize("response_lengths", [(1, 1), (3, 9), (14, 2), (40, 25)])
def test_truncation_against_trl_keep_start(prompt_length, response_lengths):
    max_length, max_prompt_length = 16, 8
    prompt = list(range(1000, 1000 + prompt_length))
    chosen, rejected = (list(range(n)) for n in response_lengths)
    ours = truncate(prompt, chosen, rejected, max_length, max_prompt_length)
    trl_chosen = trl_keep_start(prompt, chosen, max_length)
    trl_rejected = trl_keep_start(prompt, rejected, max_length)
    longest = max(response_lengths)
    if prompt_length <= max_prompt_length or prompt_length + longest <= max_length:
        # Short prompts (or nothing to cut): the same sequences as trl.
        assert ours.prompt_ids + ours.chosen_ids == trl_chosen
        assert ours.prompt_ids + ours.rejected_ids == trl_rejected
    else:
        # A long prompt loses its start down to max(max_prompt_length, room left by the
        # longest response); trl keeps it whole and cuts the replies, or drops the pair.
        kept = max(max_prompt_length, max_length - longest)
        assert ours.prompt_ids == prompt[-kept:]
        assert ours.chosen_ids == chosen[: max_length - kept]
        assert trl_chosen is None or trl_chosen[:prompt_length] == prompt
    assert len(ours.prompt_ids) + max(len(ours.chosen_ids), len(ours.rejected_ids)) <= max_length
    assert len(ours.prompt_ids) >= min(prompt_length, max_prompt_length)


def test_limits_must_leave_room_for_a_response(tiny_tokenizer):
    with pytest.raises(ValueError, match="max_prompt_length < max_length"):
        tokenize_pair(
            tiny_tokenizer, PreferencePair("hi", " yes", " no"),
            max_length=12, max_prompt_length=12, use_chat_template=False,
        )


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


# -- published chat templates ---------------------------------------------------------------

# What each template writes for an assistant reply, from its published source: the labels
# must be exactly this text (the reply, as the template writes it, and its end-of-turn token).
REPLY_AS_WRITTEN = {
    "zephyr": lambda reply: reply + "</s>",
    "llama3": lambda reply: reply.strip() + "<|eot_id|>",
    "chatml": lambda reply: reply + "<|im_end|>",
    "qwen3": lambda reply: "<think>\n\n</think>\n\n" + reply.lstrip("\n") + "<|im_end|>",
    "gemma": lambda reply: reply.strip() + "<end_of_turn>",
    "gemma3": lambda reply: reply.strip() + "<end_of_turn>",
    "phi3": lambda reply: reply + "<|end|>",
    "mistral": lambda reply: reply + "</s>",
    "qwen2.5": lambda reply: reply + "<|im_end|>",
    "llama3.1": lambda reply: reply.strip() + "<|eot_id|>",
}
# (family, eos): each family's own eos, and the base models' eos where it differs.
TOKENIZERS = [(name, f["eos_token"]) for name, f in FAMILIES.items()] + [
    (name, f["base_eos_token"]) for name, f in FAMILIES.items() if "base_eos_token" in f
]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def conversations(with_system: bool) -> list[tuple[list[dict], str, str]]:
    """(prompt messages, chosen, rejected): single- and multi-turn, replies with leading and
    trailing spaces and newlines (no reply starts with a newline: see the merge test)."""
    system = [{"role": "system", "content": "you are happy"}] if with_system else []
    return [
        ([user("what is the sky")], "the sky is blue", "  a dog runs \n"),
        (system + [user("hello")], " yes  good \n\n", "no"),
        (
            system + [user("hello there"), assistant(" hi you \n"), user("why is the sky blue")],
            "because of light\nand air",
            "\tno idea ",
        ),
    ]


def decode(tokenizer, token_ids) -> str:
    return tokenizer.decode(token_ids, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize(("family", "eos_token"), TOKENIZERS)
def test_published_templates_train_what_they_render(family_base_tokenizer, family, eos_token):
    tokenizer = family_tokenizer(family_base_tokenizer, family, eos_token)
    end_of_turn = FAMILIES[family]["end_of_turn"]
    assert end_of_turn_ids(tokenizer) == [tokenizer.convert_tokens_to_ids(end_of_turn)]
    for messages, chosen, rejected in conversations(FAMILIES[family]["system"]):
        pair = PreferencePair(messages, chosen, rejected)
        tokenized = tokenize_pair(tokenizer, pair, use_chat_template=True, **ROOMY)
        prompt_text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        assert tokenized.prompt_ids == ids(tokenizer, prompt_text)
        batch = PreferenceCollator(0)([tokenized])
        for name, reply in (("chosen", chosen), ("rejected", rejected)):
            response_ids = getattr(tokenized, f"{name}_ids")
            full_text = tokenizer.apply_chat_template(
                messages + [assistant(reply)], tokenize=False
            )
            # The template's own rendering, up to and including the reply's end-of-turn token
            # (what follows it, e.g. a newline or Phi-3's closing eos, is not trained).
            through_turn_end = full_text[: full_text.rindex(end_of_turn) + len(end_of_turn)]
            assert tokenized.prompt_ids + response_ids == ids(tokenizer, through_turn_end)
            labels = batch[f"{name}_labels"][0]
            labelled = decode(tokenizer, labels[labels != X].tolist())
            assert labelled == REPLY_AS_WRITTEN[family](reply)
            if eos_token != end_of_turn:  # Gemma, Phi-3, base eos: the turn does not end in eos
                assert tokenizer.eos_token_id not in response_ids


def test_template_without_an_end_of_turn_token_gets_eos(family_base_tokenizer):
    tokenizer = family_tokenizer(family_base_tokenizer, "chatml")
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    assert end_of_turn_ids(tokenizer) == []
    pair = PreferencePair("why is the sky blue", "light", "no")
    tokenized = tokenize_pair(tokenizer, pair, use_chat_template=True, **ROOMY)
    assert decode(tokenizer, tokenized.chosen_ids) == " light\n<|im_end|>"  # eos = <|im_end|>


def test_stop_token_ids(family_base_tokenizer):
    gemma = family_tokenizer(family_base_tokenizer, "gemma")
    eos, end_of_turn = gemma.convert_tokens_to_ids(["<eos>", "<end_of_turn>"])
    assert stop_token_ids(gemma, True) == [eos, end_of_turn]
    assert stop_token_ids(gemma, False) == [eos]
    assert stop_token_ids(gemma, True, generation_eos=[7, eos]) == [7, eos, end_of_turn]
    assert stop_token_ids(gemma, True, generation_eos=7) == [7, eos, end_of_turn]


# -- rows a template cannot render faithfully -----------------------------------------------


def test_template_that_rejects_the_messages_names_the_row(family_base_tokenizer):
    gemma = family_tokenizer(family_base_tokenizer, "gemma")
    messages = [{"role": "system", "content": "be happy"}, user("hello")]
    bad = PreferencePair(messages, "yes", "no", origin="pairs.jsonl: row 7")
    good = PreferencePair([user("hello")], "yes", "no")
    with pytest.raises(DataError, match=r"pairs.jsonl: row 7: .*System role not supported"):
        tokenize_pair(gemma, bad, use_chat_template=True, **ROOMY)
    kept, drops = tokenize_pairs(
        gemma, [good, bad, good], use_chat_template=True, skip_bad_rows=True, disable=True, **ROOMY
    )
    assert kept == [tokenize_pair(gemma, good, use_chat_template=True, **ROOMY)] * 2
    assert drops == {"chat template error: System role not supported": 1}
    with pytest.raises(DataError, match="row 7"):
        tokenize_pairs(gemma, [good, bad], use_chat_template=True, disable=True, **ROOMY)


@pytest.mark.parametrize("use_template", [True, False])
def test_batched_tokenization_equals_one_pair_at_a_time(family_base_tokenizer, use_template):
    """`tokenize_pairs` encodes ENCODE_BATCH pairs per tokenizer call: across three batches,
    with rejected rows (a template error, a prompt that is not a prefix) inside them, it keeps
    exactly the pairs `tokenize_pair` accepts, in order, with the same ids, and a stop names
    the first bad row."""
    chatml = family_tokenizer(family_base_tokenizer, "chatml")
    rng = random.Random(3)
    words = ["sky", "blue", "the", "is", "why", "green", "a", "tree"]

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    pairs = [PreferencePair([user(text(rng.randint(1, 12)))], text(rng.randint(1, 20)),
                            text(rng.randint(1, 20)), origin=f"row {i}")
             for i in range(2 * ENCODE_BATCH + 7)]
    # In the second batch: a reply that merges into ChatML's generation prompt (not a token
    # prefix), then a message role the template raises on.
    merging, raising = ENCODE_BATCH + 6, ENCODE_BATCH + 7
    pairs[merging] = PreferencePair([user("hi")], "\n\nthe sky", "no", origin=f"row {merging}")
    chatml.chat_template = ("{% for m in messages %}{% if m['role'] == 'tool' %}"
                            "{{ raise_exception('no tools') }}{% endif %}{% endfor %}"
                            + chatml.chat_template)
    pairs[raising] = PreferencePair([{"role": "tool", "content": "x"}], "a", "b",
                                    origin=f"row {raising}")
    one_by_one, bad = [], []
    for pair in pairs:
        try:
            one_by_one.append(tokenize_pair(chatml, pair, use_chat_template=use_template,
                                            **ROOMY))
        except DataError:
            bad.append(pair.origin)
    kept, drops = tokenize_pairs(chatml, pairs, use_chat_template=use_template,
                                 skip_bad_rows=True, disable=True, **ROOMY)
    assert kept == one_by_one
    assert bad == ([f"row {merging}", f"row {raising}"] if use_template else [])
    assert sum(drops.values()) == len(bad)
    if use_template:
        with pytest.raises(DataError, match=f"row {merging}, field 'chosen'"):
            tokenize_pairs(chatml, pairs, use_chat_template=True, disable=True, **ROOMY)


def test_template_that_rewrites_the_prompt_is_refused(family_base_tokenizer):
    tokenizer = family_tokenizer(family_base_tokenizer, "chatml")
    # Marks the turn the model answers: rendered alone the prompt's last turn has the mark,
    # once a reply follows it does not, so the prompt is not a prefix of the conversation.
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}"
        "{% if loop.last and add_generation_prompt %} (answer this){% endif %}\n"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    pair = PreferencePair([user("hello")], "yes", "no", origin="d.jsonl: row 3")
    with pytest.raises(DataError, match=r"d.jsonl: row 3, field 'chosen': .*not a token prefix"
                                        r".*texts differ from character"):
        tokenize_pair(tokenizer, pair, use_chat_template=True, **ROOMY)
    kept, drops = tokenize_pairs(
        tokenizer, [pair], use_chat_template=True, skip_bad_rows=True, disable=True, **ROOMY
    )
    assert kept == [] and sum(drops.values()) == 1


def test_reply_merging_into_the_generation_prompt_is_refused(family_base_tokenizer):
    """ChatML's generation prompt ends with a newline; a reply starting with newlines makes
    one token of "\\n\\n\\n" across the boundary. Templates that trim the reply are fine."""
    reply = "\n\nthe sky"
    chatml = family_tokenizer(family_base_tokenizer, "chatml")
    prompt_ids = ids(chatml, chatml.apply_chat_template([user("hi")], tokenize=False,
                                                         add_generation_prompt=True))
    full_ids = ids(chatml, chatml.apply_chat_template([user("hi"), assistant(reply)],
                                                       tokenize=False))
    assert full_ids[: len(prompt_ids)] != prompt_ids  # the case itself
    pair = PreferencePair([user("hi")], reply, "no")
    with pytest.raises(DataError, match="tokenized together"):
        tokenize_pair(chatml, pair, use_chat_template=True, **ROOMY)
    llama3 = family_tokenizer(family_base_tokenizer, "llama3")
    tokenized = tokenize_pair(llama3, pair, use_chat_template=True, **ROOMY)
    assert decode(llama3, tokenized.chosen_ids) == "the sky<|eot_id|>"


def test_template_error_names_the_file_and_row_it_came_from(family_base_tokenizer, tmp_path):
    rows = [
        {"prompt": [user("hello")], "chosen": "yes", "rejected": "no"},
        {"prompt": [{"role": "system", "content": "be happy"}, user("hi")],
         "chosen": "yes", "rejected": "no"},
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    pairs, _ = load_pairs(path, num_samples=None, seed=0, skip_bad_rows=False)
    gemma = family_tokenizer(family_base_tokenizer, "gemma")
    with pytest.raises(DataError, match=rf"{path}: line 2: .*System role not supported"):
        tokenize_pairs(gemma, pairs, use_chat_template=True, disable=True, **ROOMY)


def test_training_data_with_a_rejecting_template_stops_or_counts_drops(
    family_base_tokenizer, tmp_path, capsys
):
    rows = [{"prompt": [user(f"hello {i}")], "chosen": "yes", "rejected": "no"} for i in range(6)]
    rows[4] = {"prompt": [{"role": "system", "content": "be happy"}, user("hi")],
               "chosen": "yes", "rejected": "no"}
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    gemma = family_tokenizer(family_base_tokenizer, "gemma")
    config = TrainConfig(dataset_name=path, num_samples=0, eval_fraction=0.0, max_length=64,
                         max_prompt_length=32, num_sample_prompts=0)
    with pytest.raises(DataError, match=rf"{path}: line 5: .*System role not supported"):
        build_training_data(config, gemma, use_chat_template=True, show_progress=False)
    config.skip_bad_rows = True
    configure_console()
    data = build_training_data(config, gemma, use_chat_template=True, show_progress=False)
    assert len(data.train) == 5
    assert "Dropped 1 rows of the train pairs: 1 chat template error: System role not supported" \
        in capsys.readouterr().out
