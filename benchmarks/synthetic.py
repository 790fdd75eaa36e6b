"""Synthetic model and preference data for the benchmarks: Llama shapes, seeded pairs.

Data presets:
- `short`, `prompt-heavy`: uniform lengths (each pair within +-LENGTH_SPREAD of a mean that is
  a fraction of max_length), no truncation: a best case for padding.
- `ultrafeedback`: prompt, chosen and rejected lengths drawn from log-normal distributions
  shaped like UltraFeedback's (medians about 80 / 250 / 200 tokens at max_length 1024, heavy
  tails), scaled with max_length, then clipped to what truncation at max_length (prompt at
  half of it) leaves: the long tail piles up at the limit, as in truncated real data.
- `conversational`: `ultrafeedback` lengths as chat messages (a system message on every
  third row, the user prompt, the assistant replies), rendered by the tokenizer's template.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

SEED = 42
LEARNING_RATE = 5e-5
BETA = 0.1
LORA_R, LORA_ALPHA = 16, 32


@dataclass(frozen=True)
class ModelShape:
    """A Llama shape. The tokenizer may have fewer ids than `vocab` (spare rows are never
    used); the LM head still costs `vocab` columns, which is what matters for speed."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tokenizer_vocab: int

    @property
    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of every linear layer of one decoder block."""
        kv = self.hidden // self.heads * self.kv_heads
        h, i = self.hidden, self.intermediate
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]

    @property
    def body_params(self) -> int:
        """Matmul weights of the decoder blocks (no embeddings, no LM head)."""
        return self.layers * sum(a * b for a, b in self.linears)

    @property
    def head_params(self) -> int:
        return self.hidden * self.vocab

    def lora_params(self, r: int) -> int:
        """LoRA weights on every linear of the blocks ('all-linear' leaves the LM head out)."""
        return self.layers * sum(r * (a + b) for a, b in self.linears)

    @property
    def total_params(self) -> int:
        return self.body_params + 2 * self.head_params  # + embeddings, untied


MODEL_PRESETS = {
    "tiny": ModelShape(64, 2, 4, 4, 256, 512, tokenizer_vocab=512),
    "cpu-small": ModelShape(256, 4, 4, 4, 688, 8000, tokenizer_vocab=8000),
    "cpu-medium": ModelShape(512, 10, 8, 8, 1376, 16000, tokenizer_vocab=8000),
    "tinyllama": ModelShape(2048, 22, 32, 4, 5632, 32000, tokenizer_vocab=8000),
}
# pairs, max_length, batch size per preset (each can be overridden on the command line).
RUN_DEFAULTS = {
    "tiny": (8, 64, 2),
    "cpu-small": (32, 256, 4),
    "cpu-medium": (32, 256, 4),
    "tinyllama": (16, 1024, 4),
}
# Mean prompt and response lengths as fractions of max_length; each pair draws its lengths
# within +-LENGTH_SPREAD of the mean, so the longest pair still fits (no truncation).
UNIFORM_DATA = {"short": (0.1875, 0.6875), "prompt-heavy": (0.625, 0.25)}
LENGTH_SPREAD = 0.1
# UltraFeedback-shaped lengths at max_length 1024: (median tokens, sigma of the log) for the
# prompt, the chosen and the rejected reply; scaled by max_length / 1024.
ULTRAFEEDBACK_LENGTHS = {"prompt": (80, 1.1), "chosen": (250, 0.8), "rejected": (200, 0.9)}
REALISTIC_DATA = ("ultrafeedback", "conversational")
DATA_PRESETS = (*UNIFORM_DATA, *REALISTIC_DATA)
# Tokens kept free when clipping realistic lengths: a word may overshoot its target by a few
# tokens; a chat template adds role markers and an optional system message.
WORD_MARGIN, TEMPLATE_MARGIN = 8, 32
# Pairs in the realistic presets (enough for the length distribution to show).
REALISTIC_PAIRS = 64

ONSETS = "b c d f g h j k l m n p r s t v w z br ch cr dr fl gr kl pl pr sh st str th tr".split()
VOWELS = "a e i o u ai ea ie oo ou".split()
CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng"]


class WordSource:
    """Pseudo-words with Zipf-like frequencies: varied enough to train a BPE of 8000 ids."""

    def __init__(self, seed: int, lexicon_size: int):
        self.rng = random.Random(seed)
        words = {self._word() for _ in range(lexicon_size)}
        self.words = sorted(words)
        self.rng.shuffle(self.words)
        total, cumulative = 0.0, []
        for rank in range(len(self.words)):
            total += 1.0 / (rank + 10)
            cumulative.append(total)
        self.cumulative = cumulative

    def _word(self) -> str:
        syllables = self.rng.choice([1, 1, 2, 2, 2, 3, 3, 4])
        return "".join(self.rng.choice(ONSETS) + self.rng.choice(VOWELS) + self.rng.choice(CODAS)
                       for _ in range(syllables))

    def sample(self, count: int) -> list[str]:
        return self.rng.choices(self.words, cum_weights=self.cumulative, k=count)


def _text_of_tokens(source: WordSource, tokenizer, target: int) -> str:
    """Words joined by spaces, about `target` tokens long (a leading space: byte-level BPE
    then splits prompt and response at the word boundary, in every tokenizer alike)."""
    words, count = [], 0
    while count < target:
        word = source.sample(1)[0]
        words.append(word)
        count += len(tokenizer(" " + word, add_special_tokens=False)["input_ids"])
    return " " + " ".join(words)


def max_prompt_length_for(data: str, max_length: int) -> int:
    """Prompt budget: half the length on the realistic presets (the original project's 512 of
    1024), everything but one token on the uniform ones (which never truncate)."""
    return max_length // 2 if data in REALISTIC_DATA else max_length - 1


def _target_lengths(data: str, max_length: int, rng: random.Random) -> tuple[int, int, int]:
    """(prompt, chosen, rejected) token targets of one pair."""
    if data in UNIFORM_DATA:
        prompt_frac, response_frac = UNIFORM_DATA[data]

        def uniform(fraction: float) -> int:
            spread = 1 + rng.uniform(-LENGTH_SPREAD, LENGTH_SPREAD)
            return max(1, round(fraction * max_length * spread))

        return uniform(prompt_frac), uniform(response_frac), uniform(response_frac)
    scale = max_length / 1024

    def log_normal(part: str) -> int:
        median, sigma = ULTRAFEEDBACK_LENGTHS[part]
        return max(1, round(median * scale * math.exp(rng.gauss(0.0, sigma))))

    # Clipped to what truncation would leave (prompt within its budget, the pair within
    # max_length, a margin for template tokens and word boundaries), so this trainer and trl,
    # whose truncation rules differ, train on the same tokens.
    margin = min(TEMPLATE_MARGIN if data == "conversational" else WORD_MARGIN,
                 max_length // 8)
    prompt = max(1, min(log_normal("prompt"), max_prompt_length_for(data, max_length) - margin))
    budget = max(1, max_length - prompt - margin)
    return prompt, min(log_normal("chosen"), budget), min(log_normal("rejected"), budget)


def build_assets(preset: str, data: str, num_pairs: int, max_length: int, workdir: Path) -> dict:
    """Tokenizer + random model saved like a Hub checkpoint, and a JSONL of pairs (cached)."""
    from dpo_core.testing import tiny_llama, train_tokenizer

    shape = MODEL_PRESETS[preset]
    model_dir = workdir / f"model-{preset}"
    # Enough distinct words and text for the tokenizer to learn its whole vocabulary.
    lexicon_size = 10 * shape.tokenizer_vocab
    if not (model_dir / "config.json").is_file():
        source = WordSource(SEED, lexicon_size)
        texts = [" ".join(source.sample(40)) for _ in range(shape.tokenizer_vocab * 5 // 2)]
        tokenizer = train_tokenizer(texts, vocab_size=shape.tokenizer_vocab)
        model = tiny_llama(vocab_size=shape.vocab, hidden_size=shape.hidden,
                           num_layers=shape.layers, num_heads=shape.heads,
                           num_kv_heads=shape.kv_heads, intermediate_size=shape.intermediate,
                           max_position_embeddings=max(2048, max_length), seed=SEED)
        partial = Path(tempfile.mkdtemp(dir=workdir))
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        os.replace(partial, model_dir)
        del model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data_path = workdir / f"pairs-{preset}-{data}-{num_pairs}x{max_length}.jsonl"
    if not data_path.is_file():
        source = WordSource(SEED + 1, lexicon_size)
        rng = random.Random(SEED + 2)
        rows = []
        for index in range(num_pairs):
            prompt_len, chosen_len, rejected_len = _target_lengths(data, max_length, rng)
            # The response gets its EOS from the trainer; leave one token for it.
            prompt = _text_of_tokens(source, tokenizer, prompt_len).lstrip()
            chosen = _text_of_tokens(source, tokenizer, max(1, chosen_len - 1))
            rejected = _text_of_tokens(source, tokenizer, max(1, rejected_len - 1))
            if data == "conversational":
                messages = [{"role": "user", "content": prompt}]
                if index % 3 == 0:
                    messages.insert(0, {"role": "system",
                                        "content": " ".join(source.sample(8))})
                rows.append({"prompt": messages,
                             "chosen": [{"role": "assistant", "content": chosen.lstrip()}],
                             "rejected": [{"role": "assistant", "content": rejected.lstrip()}]})
            else:
                rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        with open(data_path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return {"model_dir": str(model_dir), "data_path": str(data_path)}
