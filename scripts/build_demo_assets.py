"""Regenerate the offline demo's assets from scratch: preference data and a tiny base model.

    python scripts/build_demo_assets.py            # rewrites dpo_core/demo/assets/

What it does, every random choice seeded:
1. Data. Two-digit addition (`dpo_core.demo.task`): 200 unordered operand pairs are held
   out for eval.jsonl; train.jsonl holds every other ordered pair (7,703 rows). A held-out
   prompt's commuted twin is held out too.
2. Tokenizer. Byte-level BPE (`dpo_core.testing.train_tokenizer`, Zephyr chat template) trained
   on the data's text with the digits removed: no merge can join digits, so every digit is
   its own token and the model can add column by column.
3. Base model. A tiny Llama fine-tuned on train.jsonl's prompts, the loss on the reply
   tokens + EOS, each time with the right reply or the one cut short at random, half and
   half. It learns to add, and learns both answers about equally well: greedy decoding gives
   the right sum on roughly half of the prompts, the state DPO is meant to fix. The held-out
   prompts are never trained on; the half-and-half mix was fixed in advance, not tuned.
4. Report. Greedy rule-following on 200 training prompts and on the held-out prompts, the
   share of replies cut a digit short instead, sizes and timings.

Runtime: about 5 minutes on one CPU core (3,000 optimizer steps of 64 replies; measured
313 s on a shared 2-core machine). It runs single-threaded by default: with two threads,
while another process held the other core, the first 250 steps took 236 s instead of 26 s.
Two runs with the same torch build and thread count write byte-identical files (checked);
another thread count may change the last bits of the sums, and so the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from dpo_core.demo.paths import ASSETS_DIR
from dpo_core.demo.task import cut_short, make_pairs, make_reply, parse_prompt, split_operands
from dpo_core.modeling.generation import generate_replies
from dpo_core.testing import tiny_llama, train_tokenizer

SEED = 0
NUM_EVAL = 200
NUM_DEV = 200  # training prompts used to watch the base model (never the held-out ones)

# The base model: small enough to train in minutes on one core and to ship (about 1.6 MB).
HIDDEN_SIZE, NUM_LAYERS, NUM_HEADS, INTERMEDIATE_SIZE = 128, 2, 4, 256
STEPS, BATCH_SIZE, LEARNING_RATE, WARMUP_STEPS, WEIGHT_DECAY = 3000, 64, 3e-3, 100, 0.1
CHOSEN_FRACTION = 0.5  # share of fine-tuning replies that are right; the rest cut short

# (prompt ids, chosen reply ids + EOS, rejected reply ids + EOS)
Example = tuple[list[int], list[int], list[int]]


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def build_tokenizer(rows: list[dict[str, str]]) -> PreTrainedTokenizerBase:
    """BPE on digit-free text: merges join letters and spaces, never digits."""
    texts = [re.sub(r"\d", "", " ".join(row.values())) for row in rows]
    # The digit-free text has few distinct words; merges run out well below this size.
    return train_tokenizer(texts, vocab_size=320)


def reply_examples(
    tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, str]]
) -> list[Example]:
    """(prompt ids, chosen ids + EOS, rejected ids + EOS) per row, as the trainer renders them:
    chat template on the prompt, each reply's ids cut from the tokenization of the whole text."""
    eos = tokenizer.eos_token_id
    examples = []
    for index, row in enumerate(rows):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}], add_generation_prompt=True, tokenize=False
        )
        prompt_ids, *whole = tokenizer(
            [prompt, prompt + row["chosen"], prompt + row["rejected"]], add_special_tokens=False
        )["input_ids"]
        if any(ids[: len(prompt_ids)] != prompt_ids for ids in whole):
            raise RuntimeError(f"row {index}: a reply's first token merges into the prompt")
        chosen_ids, rejected_ids = (ids[len(prompt_ids) :] + [eos] for ids in whole)
        examples.append((prompt_ids, chosen_ids, rejected_ids))
    return examples


def collate(sequences: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 on prompt and padding)."""
    width = max(len(prompt) + len(reply) for prompt, reply in sequences)
    input_ids, attention_mask, labels = [], [], []
    for prompt, reply in sequences:
        padding = width - len(prompt) - len(reply)
        input_ids.append(prompt + reply + [pad_id] * padding)
        attention_mask.append([1] * (len(prompt) + len(reply)) + [0] * padding)
        labels.append([-100] * len(prompt) + reply + [-100] * padding)
    return {
        "input_ids": torch.tensor(input_ids),
        "attention_mask": torch.tensor(attention_mask),
        "labels": torch.tensor(labels),
    }


def fine_tune(
    model: torch.nn.Module, examples: list[Example], pad_id: int, rng: random.Random
) -> None:
    """SFT on a seeded half-and-half mix of right and cut-short replies; AdamW, cosine."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY, betas=(0.9, 0.98)
    )

    def lr_factor(step: int) -> float:
        warmup = min(1.0, (step + 1) / WARMUP_STEPS)
        return warmup * 0.5 * (1.0 + math.cos(math.pi * step / STEPS))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    started = time.perf_counter()
    for step in range(1, STEPS + 1):
        batch = []
        for prompt, chosen, rejected in rng.sample(examples, BATCH_SIZE):
            batch.append((prompt, chosen if rng.random() < CHOSEN_FRACTION else rejected))
        loss = model(**collate(batch, pad_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 250 == 0 or step == STEPS:
            elapsed = time.perf_counter() - started
            print(f"  step {step:5d}/{STEPS}  loss {loss.item():.4f}  {elapsed:6.0f} s", flush=True)
    model.eval()


def reply_shares(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str]
) -> tuple[float, float]:
    """(share of greedy replies with the right sum, share with the sum cut short)."""
    replies = generate_replies(model, tokenizer, prompts, max_new_tokens=16, batch_size=100)
    right = short = 0
    for prompt, reply in zip(prompts, replies, strict=True):
        a, b = parse_prompt(prompt)
        right += reply == make_reply(a, b, a + b)
        short += reply == make_reply(a, b, cut_short(a + b))
    return right / len(prompts), short / len(prompts)


def directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets_dir", type=Path, default=ASSETS_DIR,
                        help=f"where to write data/ and model/ (default: {ASSETS_DIR})")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default: 1; the weights' last bits depend on it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    started = time.perf_counter()

    train_operands, eval_operands = split_operands(NUM_EVAL, seed=SEED)
    train_rows, eval_rows = make_pairs(train_operands), make_pairs(eval_operands)
    write_jsonl(args.assets_dir / "data" / "train.jsonl", train_rows)
    write_jsonl(args.assets_dir / "data" / "eval.jsonl", eval_rows)
    print(f"data: {len(train_rows)} train pairs, {len(eval_rows)} held-out pairs")

    tokenizer = build_tokenizer(train_rows)
    examples = reply_examples(tokenizer, train_rows)
    model = tiny_llama(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN_SIZE,
        num_layers=NUM_LAYERS,
        num_heads=NUM_HEADS,
        intermediate_size=INTERMEDIATE_SIZE,
        seed=SEED,
    )
    num_params = sum(p.numel() for p in model.parameters())
    print(f"model: vocab {len(tokenizer)}, {num_params / 1e6:.2f}M parameters; "
          f"fine-tuning {STEPS} steps of {BATCH_SIZE} replies")
    fine_tune(model, examples, tokenizer.eos_token_id, random.Random(SEED))
    tuned = time.perf_counter()

    dev_prompts = [row["prompt"] for row in train_rows[:NUM_DEV]]
    eval_prompts = [row["prompt"] for row in eval_rows]
    for name, prompts in (("training prompts", dev_prompts), ("held-out prompts", eval_prompts)):
        right, short = reply_shares(model, tokenizer, prompts)
        print(f"greedy on {len(prompts)} {name}: right sum {right:.1%}, "
              f"cut short {short:.1%}, other {max(0.0, 1 - right - short):.1%}")

    model_dir = args.assets_dir / "model"
    model.save_pretrained(model_dir)  # safetensors
    tokenizer.save_pretrained(model_dir)
    total = time.perf_counter() - started
    print(f"wrote {args.assets_dir} ({directory_size(args.assets_dir) / 1e6:.2f} MB: model "
          f"{directory_size(model_dir) / 1e6:.2f} MB); {tuned - started:.0f} s to fine-tuned, "
          f"total {total:.0f} s")


if __name__ == "__main__":
    main()
