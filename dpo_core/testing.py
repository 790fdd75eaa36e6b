"""Test machinery that ships with the package (as `numpy.testing` does): tiny tokenizers and
Llama models built locally, for the tests, the benchmarks and the demo asset builder.

Nothing here touches the Hugging Face Hub: the tokenizer is trained with `tokenizers`
on text the caller supplies, the model is built from a config with random weights.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# Zephyr-style template, the format TinyLlama-1.1B-Chat uses: every turn ends with EOS,
# the generation prompt is the assistant header.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Llama-3's pre-tokenizer regex (Qwen2's differs only in splitting digits one by one).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 512,
    chat_template: str | None = CHAT_TEMPLATE,
    pad_token: str | None = None,
    split_pattern: str | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` (seconds for a few thousand lines).

    Byte-level BPE merges across word boundaries, so tokenizing a prompt and its
    response separately can give other ids than tokenizing them together: the case
    the prompt/response boundary code must handle. No pad token unless `pad_token`.
    Text is split into words by GPT-2's pattern, or by the regex `split_pattern` (e.g.
    `LLAMA3_SPLIT_PATTERN`, which keeps a run of newlines together as Llama-3 and Qwen do).
    """
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.NFC()
    if split_pattern is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split_pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tokenizer.decoder = decoders.ByteLevel()
    specials = SPECIAL_TOKENS + ([pad_token] if pad_token else [])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token=pad_token,
    )
    if chat_template is not None:
        wrapped.chat_template = chat_template
    return wrapped


def tiny_llama(
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    **config_overrides,
) -> LlamaForCausalLM:
    """A randomly initialised Llama of the given shape, fp32, deterministic for `seed`."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        **config_overrides,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def random_lora_adapter(model_dir: str, path, seed: int) -> str:
    """A LoRA adapter for the model saved in `model_dir`, with random, non-zero A and B (as
    after SFT: base + adapter != base), saved to `path`; returns `path`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = LlamaForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(base, config).save_pretrained(path)
    return str(path)


def templated_tokenizer(base: PreTrainedTokenizerFast, spec: dict,
                        eos_token: str | None = None) -> PreTrainedTokenizerFast:
    """A copy of `base` with a model family's special tokens, BOS/EOS and published chat
    template; `spec` is one family of tests/fixtures/chat_templates.json."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(base.backend_tokenizer.to_str()), unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": spec["special_tokens"]})
    tokenizer.add_tokens(spec["added_tokens"])
    if spec["bos_token"]:
        tokenizer.bos_token = spec["bos_token"]
    tokenizer.eos_token = eos_token or spec["eos_token"]
    tokenizer.chat_template = spec["chat_template"]
    return tokenizer
