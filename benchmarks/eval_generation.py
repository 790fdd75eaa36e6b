"""dpo-eval's generation: batched with left padding and the KV cache, against one prompt at a
time (what a chat loop does), on the same model and prompts.

A random Llama of a preset shape (`benchmarks/synthetic.py`) with a small locally trained
tokenizer; its replies never stop early, so every variant generates exactly
`--max_new_tokens` per prompt and the variants do the same work. Rounds are interleaved
(every variant once per round) and reported as medians of this process's CPU time (user +
system; steadier than wall time on a shared machine) and of wall time, with the 1-minute load
average. The replies of every variant are checked to be the same tokens (greedy).

    python -m benchmarks.eval_generation --preset cpu-small --prompts 32 --max_new_tokens 64
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch

from benchmarks.synthetic import MODEL_PRESETS
from dpo_core.modeling.generation import generate
from dpo_core.testing import tiny_llama, train_tokenizer

WORDS = ("the a cat dog runs over under happy quick brown fox lazy answer question what is why "
         "how one two three four five yes no good bad hello world please thanks").split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-small", choices=list(MODEL_PRESETS))
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = random.Random(0)
    tokenizer = train_tokenizer([" ".join(rng.choices(WORDS, k=12)) for _ in range(2000)],
                                vocab_size=400)
    shape = MODEL_PRESETS[args.preset]
    model = tiny_llama(vocab_size=len(tokenizer), hidden_size=shape.hidden,
                       num_layers=shape.layers, num_heads=shape.heads,
                       num_kv_heads=shape.kv_heads, intermediate_size=shape.intermediate).eval()
    prompts = [" ".join(rng.choices(WORDS, k=rng.randint(10, 60))) for _ in range(args.prompts)]
    variants = {f"batched ({args.batch_size} a batch, left padding, KV cache)": args.batch_size,
                "one prompt at a time (KV cache)": 1}
    times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
    replies = {}
    for _ in range(args.rounds):
        for name, batch_size in variants.items():
            load = os.getloadavg()[0]
            wall, cpu = time.perf_counter(), time.process_time()
            replies[name] = [r.reply_ids for r in generate(
                model, tokenizer, prompts, use_chat_template=False,
                max_new_tokens=args.max_new_tokens, batch_size=batch_size)]
            times[name].append((time.process_time() - cpu, time.perf_counter() - wall, load))
    tokens = sum(len(ids) for ids in next(iter(replies.values())))
    same = all(r == next(iter(replies.values())) for r in replies.values())
    print(f"{args.preset} (hidden {shape.hidden}, {shape.layers} layers), {args.prompts} prompts "
          f"of 10-60 words, {tokens} new tokens in all, torch threads "
          f"{torch.get_num_threads()}, {args.rounds} rounds; same replies in every variant: "
          f"{same}")
    print("| variant | CPU s (median) | wall s (median) | new tokens / CPU-s | load avg |")
    print("|---|---|---|---|---|")
    for name, runs in times.items():
        cpu = statistics.median(r[0] for r in runs)
        wall = statistics.median(r[1] for r in runs)
        loads = ", ".join(f"{r[2]:.1f}" for r in runs)
        print(f"| {name} | {cpu:.2f} | {wall:.2f} | {tokens / cpu:.0f} | {loads} |")


if __name__ == "__main__":
    main()
