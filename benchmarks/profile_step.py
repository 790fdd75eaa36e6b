"""Where a training step's time goes: the standard path's step, timed and profiled.

Builds the same model and data as synthetic.py (same presets, same cache), takes the first
`--batch_size` pairs, and runs policy + reference log-probs, the sigmoid loss, backward and an
AdamW step, as `dpo_core.training.trainer` does. Prints the step time, then torch.profiler's
self time split into matrix multiplies (with their achieved FLOP/s), attention kernels and
everything else, against this machine's measured matmul peak.

    python -m benchmarks.profile_step --preset cpu-medium
    python -m benchmarks.profile_step --preset cpu-medium --compile_layers   # torch.compile
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import synthetic
from benchmarks.flops import matmul_peak_flops

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(synthetic.MODEL_PRESETS), default="cpu-medium")
    parser.add_argument("--data", choices=list(synthetic.DATA_PRESETS), default="short")
    parser.add_argument("--batch_size", type=int, help="pairs per step (preset default)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps after 2 warm-up steps")
    parser.add_argument("--attn_implementation", default="sdpa")
    parser.add_argument("--compile_layers", action="store_true",
                        help="torch.compile each decoder layer first (regional compilation)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "dpo-bench"))
    args = parser.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from dpo_core.config.train import TrainConfig
    from dpo_core.data.batches import PreferenceCollator
    from dpo_core.data.pairs import load_pairs
    from dpo_core.data.tokenization import tokenize_pairs
    from dpo_core.modeling.adapters import build_policy
    from dpo_core.modeling.loading import load_tokenizer
    from dpo_core.training.objective import PreferenceObjective

    num_pairs, max_length, batch_size = synthetic.RUN_DEFAULTS[args.preset]
    batch_size = args.batch_size or batch_size
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    assets = synthetic.build_assets(args.preset, args.data, num_pairs, max_length, workdir)
    config = TrainConfig(model_name=assets["model_dir"], dataset_name=assets["data_path"],
                         quantization="none", dtype="float32", lora_r=synthetic.LORA_R,
                         lora_alpha=synthetic.LORA_ALPHA, lora_target_modules="all-linear",
                         attn_implementation=args.attn_implementation)
    model = build_policy(config, torch.float32, quantize=False, gradient_checkpointing=False)
    if args.compile_layers:
        for layer in model.base_model.model.model.layers:
            layer.compile()
    tokenizer = load_tokenizer(config.model_name, trust_remote_code=False)
    pairs, _ = load_pairs(config.dataset_name, split="train", num_samples=batch_size, seed=0,
                          skip_bad_rows=False)
    tokenized, _ = tokenize_pairs(tokenizer, pairs, max_length=max_length,
                                  max_prompt_length=max_length - 1, use_chat_template=False,
                                  disable=True)
    batch = PreferenceCollator(tokenizer.pad_token_id)(tokenized)
    objective = PreferenceObjective(beta=synthetic.BETA)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=synthetic.LEARNING_RATE)

    def step() -> None:
        objective(model, batch)["losses"].mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    started = time.perf_counter()
    step(), step()
    warmup_s = time.perf_counter() - started
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()

    real = int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
    padded = 2 * batch["chosen_attention_mask"].numel()
    compiled = ", compiled layers" if args.compile_layers else ""
    print(f"{args.preset} / {args.data}, batch {batch_size}, {args.attn_implementation}"
          f"{compiled}: step {statistics.median(times):.3f} s (median of {args.steps}; the 2 "
          f"warm-up steps took {warmup_s:.1f} s); "
          f"{real} tokens in rows of {padded} ({100 * (1 - real / padded):.1f}% padding)")

    peak = matmul_peak_flops("float32", "cpu")
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events)
    matmul_us = matmul_flops = 0.0
    attention_us = 0.0
    for event in events:
        if event.key in MATMUL_OPS and event.input_shapes:
            matmul_us += event.self_cpu_time_total
            matmul_flops += event.count * _matmul_flops(event.key, event.input_shapes)
        elif "attention" in event.key or "softmax" in event.key:
            attention_us += event.self_cpu_time_total
    other_us = total - matmul_us - attention_us
    print(f"measured matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"matrix multiplies: {100 * matmul_us / total:.1f}% of the step's self time, "
          f"{matmul_flops / matmul_us / 1e3:.1f} GFLOP/s "
          f"({100 * matmul_flops / matmul_us * 1e6 / peak:.0f}% of peak)")
    print(f"attention kernels: {100 * attention_us / total:.1f}%")
    print(f"everything else:   {100 * other_us / total:.1f}%")
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))
    return 0


def _matmul_flops(op: str, shapes: list) -> float:
    """2 * M * N * K (times the batch for bmm) from the operands' shapes."""
    a, b = (shapes[1], shapes[2]) if op == "aten::addmm" else (shapes[0], shapes[1])
    batch = a[0] if op == "aten::bmm" else 1
    return 2.0 * batch * a[-2] * a[-1] * b[-1]


if __name__ == "__main__":
    raise SystemExit(main())
