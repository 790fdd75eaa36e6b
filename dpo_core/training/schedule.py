"""Learning-rate schedule: linear warmup, then cosine (or linear, or constant) decay to 0."""

from __future__ import annotations

import math


def get_lr(step: int, *, peak_lr: float, warmup_steps: int, total_steps: int, kind: str) -> float:
    """Learning rate for optimizer step `step` (0-based) of a `total_steps` run.

    Warmup ramps 1/warmup, 2/warmup, ... up to the peak, so the first step already moves.
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if kind == "constant":
        return peak_lr
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if kind == "linear":
        return peak_lr * (1.0 - progress)
    if kind == "cosine":
        return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown learning-rate schedule {kind!r}")
