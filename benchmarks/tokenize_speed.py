"""How long tokenization takes before training starts, with published chat templates.

UltraFeedback-shaped pairs (word counts drawn as `synthetic.py` draws UltraFeedback's token
lengths at max_length 1024; a pseudo-word is one to a few tokens) through
`tokenize_pairs` with each family's template (tests/fixtures/chat_templates.json) on a locally
trained tokenizer: `ENCODE_BATCH` pairs per tokenizer call (what the trainer does) against one
pair per call, in interleaved rounds, with identical ids checked. Reported as ms per pair and
the projected time for UltraFeedback's 61,135 training pairs.

    python -m benchmarks.tokenize_speed --pairs 500 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import dpo_core.data.tokenization as tokenization
from benchmarks.synthetic import WordSource, _target_lengths
from dpo_core.data.pairs import PreferencePair
from dpo_core.testing import templated_tokenizer, train_tokenizer

TEMPLATES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "chat_templates.json"
ULTRAFEEDBACK_PAIRS = 61_135


def ultrafeedback_pairs(num_pairs: int, seed: int = 0) -> list[PreferencePair]:
    """Pairs of pseudo-words, as many words as `synthetic.py` draws tokens for UltraFeedback."""
    source, rng = WordSource(seed, 5000), random.Random(seed)
    pairs = []
    for _ in range(num_pairs):
        prompt, chosen, rejected = _target_lengths("ultrafeedback", 1024, rng)
        pairs.append(PreferencePair([{"role": "user", "content": " ".join(source.sample(prompt))}],
                                    " ".join(source.sample(chosen)),
                                    " ".join(source.sample(rejected))))
    return pairs


def time_tokenization(tokenizer, pairs: list[PreferencePair], batch: int) -> tuple[float, list]:
    tokenization.ENCODE_BATCH = batch
    started = time.perf_counter()
    kept, _ = tokenization.tokenize_pairs(tokenizer, pairs, max_length=1024,
                                          max_prompt_length=512, use_chat_template=True,
                                          disable=True)
    return time.perf_counter() - started, kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--families", default="chatml,llama3,qwen3,gemma,phi3")
    args = parser.parse_args(argv)
    families = json.loads(TEMPLATES.read_text())["families"]
    source = WordSource(1, 5000)
    base = train_tokenizer([" ".join(source.sample(60)) for _ in range(4000)], vocab_size=8000)
    pairs = ultrafeedback_pairs(args.pairs)
    batched = tokenization.ENCODE_BATCH
    print(f"{args.pairs} UltraFeedback-shaped pairs, {args.rounds} interleaved rounds, medians")
    print(f"| template | ms/pair, {batched} pairs per call | ms/pair, 1 per call | speed-up "
          f"| {ULTRAFEEDBACK_PAIRS} pairs |")
    print("|---|---|---|---|---|")
    for family in args.families.split(","):
        tokenizer = templated_tokenizer(base, families[family])
        seconds: dict[int, list[float]] = {batched: [], 1: []}
        for _ in range(args.rounds):
            for batch in (batched, 1):
                elapsed, kept = time_tokenization(tokenizer, pairs, batch)
                seconds[batch].append(elapsed)
                if batch == batched:
                    reference = kept
                elif kept != reference:
                    raise AssertionError(f"{family}: batched ids differ from one pair per call")
        fast, slow = (statistics.median(seconds[b]) / len(pairs) for b in (batched, 1))
        print(f"| {family} | {1e3 * fast:.2f} | {1e3 * slow:.2f} | {slow / fast:.2f}x | "
              f"{fast * ULTRAFEEDBACK_PAIRS:.0f} s |")
    tokenization.ENCODE_BATCH = batched
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
