"""FLOP model of LoRA-DPO training, and this machine's measured matmul peak (for MFU).

`pair_train_flops` counts what the implementation performs; tests/test_speed_features.py
checks it against torch's FlopCounterMode.
"""

from __future__ import annotations

import time

from benchmarks.synthetic import LORA_R, ModelShape


def matmul_peak_flops(dtype_name: str, device: str) -> float:
    """Best FLOP/s of large square matmuls in `dtype` on `device` (what MFU is relative to)."""
    import torch

    dtype = getattr(torch, dtype_name)
    sizes = (8192,) if device == "cuda" else (1024, 2048)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        timings = []
        while len(timings) < 4 or (len(timings) < 20 and sum(timings) < 1.0):
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            a @ b
            if device == "cuda":
                torch.cuda.synchronize()
            timings.append(time.perf_counter() - started)
        best = max(best, 2 * n**3 / min(timings[1:]))  # the first call warms up
    return best


def attention_flops(shape: ModelShape, segments: list[int], prefix_shared: bool) -> float:
    """Forward attention FLOPs (QK^T and PV, causal: only the visible half) of one pair.

    segments = (P, C, R). Standard: two rows of P + C and P + R tokens. Prefix-shared: one row,
    where chosen and rejected tokens each see the prompt and their own response only.
    """
    p, c, r = segments
    if prefix_shared:
        visible = p * p / 2 + c * p + c * c / 2 + r * p + r * r / 2
    else:
        visible = (p + c) ** 2 / 2 + (p + r) ** 2 / 2
    return 4 * shape.layers * shape.hidden * visible


def forward_rows(segments: list[int], *, prefix_shared: bool,
                 full_logits: bool) -> tuple[int, int]:
    """(tokens fed to the model, positions whose logits are computed) for one pair."""
    p, c, r = segments
    tokens = p + c + r if prefix_shared else 2 * p + c + r
    return tokens, tokens if full_logits else c + r


def reference_flops(shape: ModelShape, segments: list[int], *, prefix_shared: bool,
                    full_logits: bool) -> float:
    """FLOPs of one pair's reference forward (adapter off, so no LoRA): 2 per block weight per
    token, 2 per LM-head weight per position whose logits are computed, causal attention."""
    tokens, logit_rows = forward_rows(segments, prefix_shared=prefix_shared,
                                      full_logits=full_logits)
    return (2 * shape.body_params * tokens + 2 * shape.head_params * logit_rows
            + attention_flops(shape, segments, prefix_shared))


def pair_train_flops(shape: ModelShape, segments: list[int], *, prefix_shared: bool,
                     checkpointing: bool, full_logits: bool, reference: bool = True) -> float:
    """FLOPs one pair costs in LoRA-DPO training, counted as the implementation performs them.

    Per token of the forward rows: policy forward 2N, backward to the inputs 2N (frozen base
    weights need no weight gradient), reference forward 2N (`reference_flops`; left out with
    reference=False, for a precomputed reference) -> 6N for N block weights; LoRA adds 2
    (forward) + 4 (backward: input and weight gradients) per adapter weight; the LM head
    counts at the positions whose logits are computed (label positions here, every position
    in trl); attention is counted causally, forward + 2x backward + reference forward.
    Gradient checkpointing recomputes the policy forward of the blocks once more (all but its
    last matmul). Nothing before the first block needs a gradient, so its q, k and v
    projections (base and LoRA A) skip the backward to their input, unless checkpointing
    (peft then makes the embeddings' output require grad). tests/test_speed_features.py
    checks this count against torch's FlopCounterMode.
    """
    tokens, logit_rows = forward_rows(segments, prefix_shared=prefix_shared,
                                      full_logits=full_logits)
    body, lora = shape.body_params, shape.lora_params(LORA_R)
    attention = attention_flops(shape, segments, prefix_shared)
    flops = 4 * body * tokens + 6 * lora * tokens + 4 * shape.head_params * logit_rows
    flops += 3 * attention
    if checkpointing:
        # torch's non-reentrant recompute stops once it has every tensor backward needs,
        # which comes just before each block's last LoRA B matmul (down_proj's).
        flops += 2 * (body + lora - shape.layers * LORA_R * shape.hidden) * tokens + attention
    else:
        qkv = shape.linears[:3]
        flops -= 2 * tokens * sum(a * b + LORA_R * a for a, b in qkv)
    if reference:
        flops += reference_flops(shape, segments, prefix_shared=prefix_shared,
                                 full_logits=full_logits)
    return flops


