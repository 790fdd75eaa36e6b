"""The numbers a run logs: per-pair statistics gathered from every process, merged into the
trl-named metrics of `loss.preference_metrics`, plus grad norm and throughput."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from dpo_core.losses.preference import preference_metrics
from dpo_core.training.objective import PAIR_EXTRAS


def merged_metrics(stats: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Preference metrics over every pair in `stats` (per-batch dicts of per-pair tensors, as
    `PreferenceObjective` returns them, detached and possibly gathered; `PAIR_EXTRAS` beside
    them are left out)."""
    merged = {key: torch.cat([s[key] for s in stats]) for key in stats[0]
              if key not in PAIR_EXTRAS}
    return {k: v.item() for k, v in preference_metrics(**merged).items()}


@dataclass
class MetricWindow:
    """Per-pair statistics gathered from every process since the last log line."""

    stats: list[dict[str, torch.Tensor]] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    # (step, [loss, grad norm] on the device) of the steps not read by the host yet.
    pending: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    # Real tokens, on the device (no host sync per micro-batch): this process's until the
    # trainer sums them over every process for the log record.
    tokens: torch.Tensor | int = 0
    started: float = field(default_factory=time.perf_counter)

    def metrics(self) -> dict[str, float]:
        values = merged_metrics(self.stats)
        if self.grad_norms:
            values["grad_norm"] = sum(self.grad_norms) / len(self.grad_norms)
        values["tokens_per_second"] = float(self.tokens) / max(
            time.perf_counter() - self.started, 1e-9)
        return values


def format_record(record: dict) -> str:
    """One log record as a console line: "step 10 | loss 0.6931 | ..." (eval/ prefixed)."""
    prefix = "eval/" if record["split"] == "eval" else ""
    parts = [f"step {record['step']}"]
    for key, value in record.items():
        if key not in ("step", "split", "epoch"):
            parts.append(f"{prefix}{key} {value:.4g}")
    return " | ".join(parts)


class ZeroGradientWatch:
    """Notes each applied step's gradient norm; `warning()` is non-empty when all were 0."""

    def __init__(self) -> None:
        self.steps = 0
        self.nonzero = 0

    def observe(self, grad_norm: float) -> None:
        self.steps += 1
        self.nonzero += grad_norm != 0

    def warning(self) -> str:
        if not self.steps or self.nonzero:
            return ""
        return (f"WARNING: all {self.steps} optimizer steps had a zero gradient: the adapter "
                "did not change. Check that chosen and rejected replies differ within "
                "--max_length, that --lora_alpha and --learning_rate are not tiny, and that "
                "--lora_target_modules names layers the model uses.")
