"""The run plan: what every setting left on "auto" (or unset) resolved to, decided once.

Each value is resolved where the thing it depends on first exists (the device before the
model, the tokenizer's template, the model's attention, the number of pairs), by the setup
step that needs it, and never again: the trainer, samples.md, `chat.py` and
`dpo-report` all read this object (or its copy under "run_plan" in
training_config.json) instead of deciding a second time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dpo_core.config.train import TrainConfig


@dataclass
class RunPlan:
    """Resolved settings; None until the setup step that resolves it has run."""

    quantization: str | None = None  # "4bit" or "none"
    dtype: str | None = None  # "float32", "bfloat16" or "float16"
    gradient_checkpointing: bool | None = None
    distributed_type: str | None = None  # as Accelerate names it: NO, MULTI_CPU, MULTI_GPU, ...
    fsdp_version: int | None = None  # 1 or 2 under FSDP
    zero_stage: int | None = None  # DeepSpeed's ZeRO stage under DEEPSPEED
    num_processes: int | None = None
    reuse_host_memory: bool | None = None  # glibc's thresholds raised (CPU training only)
    lora_target_modules: str | None = None  # what the adapter adapts (last names; parameters)
    max_length: int | None = None  # fitted to the model's positions
    max_prompt_length: int | None = None
    router_aux_loss_coef: float | None = None  # None for a dense model
    chat_template: bool | None = None  # whether prompts are rendered with the tokenizer's
    streaming: bool | None = None  # training pairs read and tokenized as they are used
    tokenized_cache: str | None = None  # "hit", "miss", "off", ... (data.training_data)
    attn_implementation: str | None = None  # the attention the model runs
    padding_free: bool | None = None  # one packed row per micro-batch
    prefix_sharing: str | None = None  # "always", "per batch" or "off"
    activation_offloading: bool | None = None  # saved activations moved to host memory
    precompute_ref_log_probs: bool | None = None
    ref_batch_size: int | None = None
    eval_batch_size: int | None = None
    total_steps: int | None = None
    warmup_steps: int | None = None
    # What the user may not expect (a path turned off, a length cut, an attention chosen),
    # each in a sentence that says why.
    notes: list[str] = dataclasses.field(default_factory=list)

    def record(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self, config: TrainConfig) -> str:
        """A short block for the console: each value, and what was asked where that differs
        (an "auto" or unset flag); then the notes."""
        lines = ["Run plan:"]
        values = self.record()
        notes = values.pop("notes")
        for name, value in values.items():
            asked = _asked(config, name)
            shown = ({True: "on", False: "off"}[value] if isinstance(value, bool)
                     else "-" if value is None else value)
            note = ("" if asked is None or value is None or _same(asked, value)
                    else f"  (asked: {asked})")
            lines.append(f"  {name:<26}{shown}{note}")
        lines.extend(f"  note: {note}" for note in notes)
        return "\n".join(lines)


def _same(asked, value) -> bool:
    """Whether a resolved value is what was asked; comma lists (LoRA targets) in any order."""
    if isinstance(asked, str) and isinstance(value, str) and "," in value:
        return set(asked.split(",")) == set(value.split(","))
    return asked == value


def _asked(config: TrainConfig, name: str):
    """The flag value behind plan entry `name`, as the user gave it (None: no such flag)."""
    if name == "total_steps":
        return f"--max_steps {config.max_steps}" if config.max_steps else \
            f"--epochs {config.epochs}"
    if name == "warmup_steps" and config.warmup_ratio is not None:
        return f"--warmup_ratio {config.warmup_ratio}"
    if name == "tokenized_cache":  # an outcome; the flag is on or off
        return None
    value = getattr(config, name, None)
    if name in ("ref_batch_size", "eval_batch_size") and value == 0:
        return "auto"
    if value is None and any(f.name == name for f in dataclasses.fields(config)):
        return "unset"
    return value


def covers_every_pair(config: TrainConfig, num_pairs: int, num_processes: int) -> bool:
    """Whether the run trains on every pair at least once: only then is a reference pass over
    all pairs free (each pair's reference log-probs are needed anyway)."""
    if config.max_steps:
        pairs_per_step = config.batch_size * config.gradient_accumulation_steps * num_processes
        return config.max_steps * pairs_per_step >= num_pairs
    return config.epochs >= 1


def resolve_precompute(config: TrainConfig, uses_reference: bool, num_pairs: int | None,
                       num_processes: int) -> bool:
    """--precompute_ref_log_probs given: as given. Unset: when the loss has a reference that
    stays as it is (no --sync_ref_model) and every pair's reference log-probs are needed anyway
    (never for a stream: `num_pairs` None)."""
    if config.precompute_ref_log_probs is not None:
        return config.precompute_ref_log_probs
    if num_pairs is None:  # streamed: the pairs are not all there before training
        return False
    return (uses_reference and not config.sync_ref_model
            and covers_every_pair(config, num_pairs, num_processes))
