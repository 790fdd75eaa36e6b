"""How to keep packed sequences apart on this device: the options, timed on one model.

For micro-batches of UltraFeedback-shaped pairs (`benchmarks/synthetic.py`; `--data short`
for the uniform preset), times the policy's
log-probs forward + backward (LoRA on all linear layers) under each layout and attention:

- `padded`: today's two padded rows per pair (`concatenated_forward`), SDPA with a 2D mask;
- `packed-blocks`: one padding-free row, SDPA run block by block (`packed_sdpa_attention`);
- `packed-dense`: one padding-free row, SDPA with a dense `[T, T]` block mask;
- each of the packed ones also prefix-shared.

Rounds are interleaved (every option once per round) and reported as medians of this process's
CPU time (user + system), which other processes on a shared machine disturb far less than wall
time, with the machine's 1-minute load average.

    python -m benchmarks.attention_options --preset cpu-small --batches 6 --rounds 5 --threads 1

`--sliding_window N` times a Mistral of the same shape whose attention is windowed (N tokens):
the per-block attention then runs SDPA with each block's window mask where the window is
shorter than the block.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import time
from collections.abc import Callable

import torch
from transformers import MistralConfig, MistralForCausalLM

from benchmarks.synthetic import LORA_ALPHA, LORA_R, MODEL_PRESETS, RUN_DEFAULTS, _target_lengths
from dpo_core.data.batches import PreferenceCollator
from dpo_core.data.tokenization import TokenizedPair
from dpo_core.forward.attention import use_packed_attention
from dpo_core.forward.logps import concatenated_forward
from dpo_core.forward.packing import padding_free_forward, padding_free_prefix_shared_forward
from dpo_core.modeling.adapters import add_lora
from dpo_core.testing import tiny_llama


def realistic_batches(vocab: int, max_length: int, batch_size: int, count: int,
                      seed: int = 0, data: str = "ultrafeedback", collate=None) -> list[dict]:
    """`count` micro-batches of `data`-shaped random pairs, laid out by `collate` (default:
    padded rows)."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    collate = collate or PreferenceCollator(pad_token_id=0)
    batches = []
    for _ in range(count):
        pairs = [TokenizedPair(*(torch.randint(3, vocab, (n,), generator=generator).tolist()
                                 for n in _target_lengths(data, max_length, rng)))
                 for _ in range(batch_size)]
        batches.append(collate(pairs))
    return batches


def interleaved_rounds(step: Callable[[str], float], names: list[str],
                       rounds: int) -> tuple[dict[str, list[float]], list[float]]:
    """`step(name)` (returning CPU seconds) for every name once as a warm-up, then `rounds`
    rounds of every name in turn: (name -> the rounds' times, the 1-minute load average after
    each round)."""
    times: dict[str, list[float]] = {name: [] for name in names}
    loads = []
    for name in names:
        step(name)
    for _ in range(rounds):
        for name in names:
            times[name].append(step(name))
        loads.append(os.getloadavg()[0])
    return times, loads


def timing_parser(description: str, batches: int) -> argparse.ArgumentParser:
    """The options of a CPU-time benchmark: model preset, micro-batches per round, rounds,
    torch threads."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", choices=list(MODEL_PRESETS), default="cpu-small")
    parser.add_argument("--batches", type=int, default=batches, help="micro-batches per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    return parser


def preset_model(preset: str) -> tuple[torch.nn.Module, int, int]:
    """(a random SDPA Llama of the preset's shape, its max_length, its batch size)."""
    shape = MODEL_PRESETS[preset]
    _, max_length, batch_size = RUN_DEFAULTS[preset]
    model = tiny_llama(vocab_size=shape.vocab, hidden_size=shape.hidden,
                       num_layers=shape.layers, num_heads=shape.heads,
                       num_kv_heads=shape.kv_heads, intermediate_size=shape.intermediate,
                       attn_implementation="sdpa")
    return model, max_length, batch_size


def main(argv: list[str] | None = None) -> int:
    parser = timing_parser(__doc__.split("\n\n")[0], batches=6)
    parser.add_argument("--data", choices=["ultrafeedback", "short", "prompt-heavy"],
                        default="ultrafeedback")
    parser.add_argument("--sliding_window", type=int, default=0,
                        help="a Mistral with this attention window instead of a Llama")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    shape = MODEL_PRESETS[args.preset]
    base, max_length, batch_size = preset_model(args.preset)
    if args.sliding_window:
        config = MistralConfig(**base.config.to_dict())
        config.sliding_window = args.sliding_window
        base = MistralForCausalLM(config)
    sdpa = add_lora(copy.deepcopy(base), r=LORA_R, alpha=LORA_ALPHA, dropout=0.0,
                    target_modules="all-linear", gradient_checkpointing=False, quantized=False)
    blocks = add_lora(base, r=LORA_R, alpha=LORA_ALPHA, dropout=0.0,
                      target_modules="all-linear", gradient_checkpointing=False, quantized=False)
    assert use_packed_attention(blocks.get_base_model())
    options = {
        "padded": (sdpa, concatenated_forward),
        "packed-blocks": (blocks, padding_free_forward),
        "packed-dense": (sdpa, padding_free_forward),
        "packed-blocks+prefix": (blocks, padding_free_prefix_shared_forward),
        "packed-dense+prefix": (sdpa, padding_free_prefix_shared_forward),
    }
    batches = realistic_batches(shape.vocab, max_length, batch_size, args.batches,
                                data=args.data)
    real = sum(int(b["chosen_attention_mask"].sum() + b["rejected_attention_mask"].sum())
               for b in batches)
    padded = sum(2 * b["chosen_input_ids"].numel() for b in batches)
    print(f"{args.preset} / {args.data}: {args.batches} micro-batches of {batch_size} pairs, "
          f"{real} real tokens, {100 * (1 - real / padded):.0f}% of the padded positions "
          "are padding")

    def step(option: str) -> float:
        model, forward = options[option]
        started = time.process_time()
        for batch in batches:
            chosen, rejected = forward(model, batch)
            (chosen.sum() - rejected.sum()).backward()
        model.zero_grad(set_to_none=True)
        return time.process_time() - started

    times, loads = interleaved_rounds(step, list(options), args.rounds)
    base_time = statistics.median(times["padded"])
    for name, runs in times.items():
        median = statistics.median(runs)
        print(f"{name:22s} median {median:.3f} CPU s  ({real / median:.0f} tokens/CPU-s, "
              f"x{base_time / median:.2f} vs padded)  runs {', '.join(f'{t:.3f}' for t in runs)}")
    print(f"1-minute load average after each round: {', '.join(f'{x:.1f}' for x in loads)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
