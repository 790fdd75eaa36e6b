"""Test machinery that ships with the package (as `numpy.testing` does): tiny tokenizers and
models built locally (Llama, and one of each family in `MODEL_FAMILIES`), for the tests, the
benchmarks and the demo asset builder.

Nothing here touches the Hugging Face Hub: the tokenizer is trained with `tokenizers`
on text the caller supplies, the model is built from a config with random weights.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import transformers
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


# A sliding window shorter than any test sequence, so that windowed attention is exercised.
TINY_WINDOW = 4

# Tiny random models of the families users fine-tune with DPO: family -> (config class, the
# family's quirks). Shared shape: 2 layers, hidden 32, 4 query heads, 2 key/value heads.
MODEL_FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": TINY_WINDOW}),
    # Bias on q/k/v; the second layer windowed (layer_types: full, sliding).
    "qwen2": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": TINY_WINDOW,
                              "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", {"head_dim": 8}),  # q/k norms
    "gemma": ("GemmaConfig", {"head_dim": 8}),  # embeddings scaled by sqrt(hidden), tied
    # Soft-capped attention and logits (SDPA refused: eager), sliding and full layers.
    "gemma2": ("Gemma2Config", {"head_dim": 8, "sliding_window": TINY_WINDOW,
                                "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0,
                                "query_pre_attn_scalar": 8}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 8, "sliding_window": TINY_WINDOW,
                                    "layer_types": ["sliding_attention", "full_attention"]}),
    "phi3": ("Phi3Config", {"sliding_window": TINY_WINDOW}),  # fused qkv_proj, gate_up_proj
    "phi": ("PhiConfig", {"partial_rotary_factor": 0.5}),  # Phi-2: partial rotary, dense
    "stablelm": ("StableLmConfig", {"partial_rotary_factor": 0.25, "use_qkv_bias": True,
                                    "qk_layernorm": True, "use_parallel_residual": True}),
    "olmo2": ("Olmo2Config", {}),  # norms after attention and MLP, q/k norms
    "granite": ("GraniteConfig", {"embedding_multiplier": 3.0, "residual_multiplier": 0.5,
                                  "attention_multiplier": 0.2, "logits_scaling": 4.0}),
    "cohere": ("CohereConfig", {"logit_scale": 0.5}),  # parallel block, scaled logits, tied
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 32,
                                     "shared_expert_intermediate_size": 32}),
    # Learned positions (n_positions), fused Conv1D c_attn, tied embeddings.
    "gpt2": ("GPT2Config", {"max_position_embeddings": 64}),
    # Pythia: fused query_key_value, partial rotary, parallel residual.
    "gpt_neox": ("GPTNeoXConfig", {"rotary_pct": 0.25}),
    "smollm3": ("SmolLM3Config", {"no_rope_layer_interval": 2}),  # no positions in layer 2
}


def tiny_family(family: str, vocab_size: int, seed: int = 0) -> transformers.PreTrainedModel:
    """A randomly initialised causal LM of `family` (a key of MODEL_FAMILIES), fp32, with the
    attention transformers picks for it (SDPA, or eager where the family refuses SDPA)."""
    config_class, quirks = MODEL_FAMILIES[family]
    shape = {"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 2,
             "pad_token_id": 0}
    config = getattr(transformers, config_class)(**{**shape, **quirks})
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config)
