"""The DPO training loop on Accelerate.

Setup runs in dependency order (model -> tokenizer -> optimizer -> loss -> data -> schedule),
then each optimizer step takes `gradient_accumulation_steps` micro-batches from a seeded,
epoch-by-epoch shuffled stream, so the step number alone says where in the data a run is:
that is what makes resuming exact.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dpo_core.checkpoint import (
    TrainState,
    checkpoint_dirs,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from dpo_core.config import ConfigError, TrainConfig
from dpo_core.data import load_pairs, split_pairs
from dpo_core.loss import preference_metrics
from dpo_core.model import (
    add_lora,
    disable_dropout,
    load_base_model,
    load_tokenizer,
    resolve_dtype,
    resolve_quantization,
)
from dpo_core.objective import PreferenceObjective
from dpo_core.report import (
    LOG_FILE,
    SAMPLES_FILE,
    start_trackers,
    tracker_options,
    tracker_values,
    write_samples,
    write_training_curves,
)
from dpo_core.schedule import get_lr
from dpo_core.tokenization import (
    PreferenceCollator,
    TokenizedPair,
    resolve_chat_template,
    tokenize_pairs,
)

METRICS_FILE, CONFIG_FILE = "metrics.json", "training_config.json"
STAT_KEYS = ("losses", "chosen_rewards", "rejected_rewards", "policy_chosen_logps",
             "policy_rejected_logps")

# An extra evaluation run after training on the base model (adapter off) and on the trained
# model: hook(model, tokenizer) -> {"metric": value}. The demo's before/after table uses it.
EvaluationHook = Callable[[torch.nn.Module, object], dict]


class NonFiniteError(RuntimeError):
    """The loss or the gradient stopped being finite; the message names the step."""


@dataclass
class MetricWindow:
    """Per-pair statistics gathered from every process since the last log line."""

    stats: list[dict[str, torch.Tensor]] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)

    def metrics(self) -> dict[str, float]:
        merged = {k: torch.cat([s[k] for s in self.stats]) for k in STAT_KEYS}
        values = {k: v.item() for k, v in preference_metrics(
            merged["losses"], merged["chosen_rewards"], merged["rejected_rewards"],
            merged["policy_chosen_logps"], merged["policy_rejected_logps"]).items()}
        if self.grad_norms:
            values["grad_norm"] = sum(self.grad_norms) / len(self.grad_norms)
        values["tokens_per_second"] = self.tokens / max(time.perf_counter() - self.started, 1e-9)
        return values


def prepare_data(
    config: TrainConfig, tokenizer, show_progress: bool = True
) -> tuple[list[TokenizedPair], list[TokenizedPair], list]:
    """Load, validate, sample, split and tokenize; print what was dropped and why.

    Returns the train and eval pairs, tokenized, and the first `num_sample_prompts` eval
    prompts as they were (messages or text) for samples.md.
    """
    pairs, drops = load_pairs(config.dataset_name, split=config.dataset_split,
                              num_samples=config.num_samples or None, seed=config.seed,
                              skip_bad_rows=config.skip_bad_rows)
    _report_drops(config.dataset_name, drops, show_progress)
    if config.eval_dataset:
        train_pairs = pairs
        eval_pairs, eval_drops = load_pairs(config.eval_dataset, split="train", num_samples=None,
                                            seed=config.seed, skip_bad_rows=config.skip_bad_rows)
        _report_drops(config.eval_dataset, eval_drops, show_progress)
    else:
        train_pairs, eval_pairs = split_pairs(pairs, config.eval_fraction, config.seed)
    use_template = resolve_chat_template(tokenizer, config.chat_template)
    lengths = {"max_length": config.max_length, "max_prompt_length": config.max_prompt_length,
               "use_chat_template": use_template}
    train_tok, train_dropped = tokenize_pairs(tokenizer, train_pairs, desc="Tokenizing train",
                                              disable=not show_progress, **lengths)
    eval_tok, eval_dropped = tokenize_pairs(tokenizer, eval_pairs, desc="Tokenizing eval",
                                            disable=not show_progress, **lengths)
    if show_progress:
        for name, dropped in (("train", train_dropped), ("eval", eval_dropped)):
            if dropped:
                print(f"Dropped {dropped} {name} pairs whose response would not fit in "
                      f"--max_length {config.max_length} after the prompt.")
        print(f"Pairs: {len(train_tok)} train, {len(eval_tok)} eval "
              f"(chat template: {'on' if use_template else 'off'}).")
    if not train_tok:
        raise ConfigError("no training pairs left after loading and truncation")
    sample_prompts = [pair.prompt for pair in eval_pairs[:config.num_sample_prompts]]
    return train_tok, eval_tok, sample_prompts


def _report_drops(source: str, drops, show: bool) -> None:
    if show and drops:
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(drops.items()))
        print(f"Dropped {sum(drops.values())} rows of {source}: {reasons}.")


def check_output_dir(config: TrainConfig) -> None:
    """Refuse to overwrite a finished run unless asked; resuming into it is fine."""
    finished = os.path.isfile(os.path.join(config.output_dir, METRICS_FILE))
    if finished and not (config.overwrite_output_dir or config.resume_from_checkpoint):
        raise ConfigError(
            f"--output_dir {config.output_dir!r} already holds a finished run; pass "
            "--overwrite_output_dir to replace it or choose another directory"
        )


def mixed_precision_for(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


def build_policy(config: TrainConfig, dtype: torch.dtype, quantize: bool) -> torch.nn.Module:
    """Base model + fresh LoRA adapter; dropout off so both passes see one network."""
    base = load_base_model(config.model_name, dtype=dtype, quantize_4bit=quantize,
                           attn_implementation=config.attn_implementation,
                           trust_remote_code=config.trust_remote_code)
    model = add_lora(base, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                     target_modules=config.target_modules,
                     gradient_checkpointing=config.gradient_checkpointing, quantized=quantize)
    if config.disable_dropout:
        disable_dropout(model)
    return model


class MicroBatchStream:
    """Micro-batches over epochs; epoch e is shuffled with seed + e, so any position in the
    stream can be reproduced from the number of micro-batches already consumed."""

    def __init__(self, accelerator: Accelerator, pairs: list[TokenizedPair], batch_size: int,
                 collator: PreferenceCollator, seed: int):
        self.accelerator, self.pairs, self.batch_size = accelerator, pairs, batch_size
        self.collator, self.seed = collator, seed
        self.batches_per_epoch = len(self._epoch_loader(0))

    def _epoch_loader(self, epoch: int):
        order = torch.randperm(len(self.pairs),
                               generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        loader = DataLoader(self.pairs, batch_size=self.batch_size, sampler=order,
                            collate_fn=self.collator)
        return self.accelerator.prepare_data_loader(loader)

    def iterate(self, start: int) -> Iterator[dict[str, torch.Tensor]]:
        epoch, offset = divmod(start, self.batches_per_epoch)
        while True:
            loader = self._epoch_loader(epoch)
            if offset:
                loader = self.accelerator.skip_first_batches(loader, offset)
            yield from loader
            epoch, offset = epoch + 1, 0


@torch.no_grad()
def evaluate(model, loader, objective: PreferenceObjective, accelerator: Accelerator) -> dict:
    """Preference metrics over every eval pair exactly once (duplicates from padding to
    equal batches across processes are dropped by gather_for_metrics)."""
    model.eval()
    gathered = []
    for batch in loader:
        stats = objective(model, batch)
        gathered.append(accelerator.gather_for_metrics({k: stats[k].detach() for k in STAT_KEYS}))
    model.train()
    merged = {k: torch.cat([g[k] for g in gathered]) for k in STAT_KEYS}
    return {k: v.item() for k, v in preference_metrics(
        merged["losses"], merged["chosen_rewards"], merged["rejected_rewards"],
        merged["policy_chosen_logps"], merged["policy_rejected_logps"]).items()}


def _append_log(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _log_record(accelerator: Accelerator, log_path: str, record: dict) -> None:
    """One record to train_log.jsonl, the console and the trackers (main process only)."""
    _append_log(log_path, record)
    tqdm.write(_format_record(record))
    accelerator.log(tracker_values(record), step=record["step"])


def _truncate_log(path: str, last_step: int) -> None:
    """Drop records logged after the checkpoint a run resumes from: they are redone."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    with open(path, "w") as f:
        f.writelines(kept)


def _format_record(record: dict) -> str:
    prefix = "eval/" if record["split"] == "eval" else ""
    parts = [f"step {record['step']}"]
    for key, value in record.items():
        if key not in ("step", "split", "epoch"):
            parts.append(f"{prefix}{key} {value:.4g}")
    return " | ".join(parts)


def train(config: TrainConfig, evaluation_hook: EvaluationHook | None = None) -> dict:
    """Train a LoRA adapter with DPO as `config` says; return the final metrics."""
    config.validate()
    check_output_dir(config)
    dtype = resolve_dtype(config.dtype)
    quantize = resolve_quantization(config.quantization)
    accelerator = Accelerator(mixed_precision=mixed_precision_for(dtype),
                              **tracker_options(config.report_to, config.output_dir))
    is_main = accelerator.is_main_process
    set_seed(config.seed)
    if is_main:
        os.makedirs(config.output_dir, exist_ok=True)
        config.to_json(os.path.join(config.output_dir, CONFIG_FILE))

    # model -> tokenizer -> optimizer -> loss -> data -> schedule
    model = build_policy(config, dtype, quantize)
    tokenizer = load_tokenizer(config.model_name, config.trust_remote_code)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=config.learning_rate, weight_decay=config.weight_decay)
    objective = PreferenceObjective(
        loss_type=config.loss_type, beta=config.beta, label_smoothing=config.label_smoothing,
        rpo_alpha=config.rpo_alpha, simpo_gamma=config.simpo_gamma,
        reference_free=config.reference_free)
    with accelerator.main_process_first():
        train_pairs, eval_pairs, sample_prompts = prepare_data(config, tokenizer,
                                                               show_progress=is_main)
    collator = PreferenceCollator(tokenizer.pad_token_id)
    model, optimizer = accelerator.prepare(model, optimizer)
    stream = MicroBatchStream(accelerator, train_pairs, config.batch_size, collator, config.seed)
    eval_loader = None
    if eval_pairs:
        eval_loader = accelerator.prepare_data_loader(DataLoader(
            eval_pairs, batch_size=config.eval_batch_size or config.batch_size,
            collate_fn=collator))
    accumulation = config.gradient_accumulation_steps
    total_steps = config.max_steps or math.ceil(
        config.epochs * stream.batches_per_epoch / accumulation)
    warmup = config.warmup_for(total_steps)
    if is_main and config.warmup_ratio is None and warmup < config.warmup_steps:
        print(f"--warmup_steps {config.warmup_steps} is longer than this {total_steps}-step run; "
              f"warming up for {warmup} steps instead.")

    state = TrainState()
    log_path = os.path.join(config.output_dir, LOG_FILE)
    if config.resume_from_checkpoint:
        path = resolve_checkpoint(config.resume_from_checkpoint, config.output_dir)
        state = load_checkpoint(path, accelerator, model, optimizer)
        if is_main:
            _truncate_log(log_path, state.step)
            print(f"Resumed from {path} at step {state.step}.")
    elif is_main and os.path.exists(log_path):
        os.remove(log_path)

    # Started once setup has succeeded, so a bad model or data path leaves no empty run.
    start_trackers(accelerator, config)
    model.train()
    batches = stream.iterate(state.micro_batches_seen)
    window = MetricWindow()
    progress = tqdm(total=total_steps, initial=state.step, desc="DPO", disable=not is_main,
                    dynamic_ncols=True)
    last_train, last_eval = {}, {}
    started = time.perf_counter()
    while state.step < total_steps:
        micro_batches = [next(batches) for _ in range(accumulation)]
        state.micro_batches_seen += accumulation
        # Sum of per-pair losses over the step's pairs: the gradient equals that of one
        # batch holding all of them, even when the last micro-batch is smaller.
        pairs_in_step = sum(len(b["chosen_input_ids"]) for b in micro_batches)
        lr = get_lr(state.step, peak_lr=config.learning_rate, warmup_steps=warmup,
                    total_steps=total_steps, kind=config.lr_scheduler)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_losses = []
        for i, batch in enumerate(micro_batches):
            last_micro = i == accumulation - 1
            with nullcontext() if last_micro else accelerator.no_sync(model):
                stats = objective(model, batch)
                accelerator.backward(stats["losses"].sum() / pairs_in_step)
            gathered = accelerator.gather({k: stats[k].detach() for k in STAT_KEYS})
            window.stats.append(gathered)
            step_losses.append(gathered["losses"])
            tokens = batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum()
            window.tokens += int(accelerator.reduce(tokens, "sum").item())
        grad_norm = accelerator.clip_grad_norm_(model.parameters(),
                                                config.max_grad_norm or float("inf"))
        grad_norm = float(grad_norm)
        step_loss = torch.cat(step_losses).mean().item()
        finite = math.isfinite(step_loss) and (math.isfinite(grad_norm)
                                               or accelerator.scaler is not None)
        if not finite:
            if state.nonfinite_steps_skipped >= config.skip_nonfinite_steps:
                saved = checkpoint_dirs(config.output_dir)
                raise NonFiniteError(
                    f"step {state.step + 1}: loss {step_loss} / grad norm {grad_norm} is not "
                    f"finite; stopping. Last good checkpoint: "
                    f"{saved[-1] if saved else 'none (lower --save_steps to keep one)'}.")
            state.nonfinite_steps_skipped += 1
            optimizer.zero_grad(set_to_none=True)
            window.stats = window.stats[:-accumulation]
            if is_main:
                tqdm.write(f"step {state.step + 1}: non-finite loss or gradient, update skipped "
                           f"({state.nonfinite_steps_skipped}/{config.skip_nonfinite_steps}).")
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            window.grad_norms.append(grad_norm)
        state.step += 1
        progress.update(1)
        progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")

        if (state.step % config.logging_steps == 0 or state.step == total_steps) and window.stats:
            last_train = {"step": state.step,
                          "epoch": state.micro_batches_seen / stream.batches_per_epoch,
                          "split": "train", **window.metrics(), "learning_rate": lr}
            if is_main:
                _log_record(accelerator, log_path, last_train)
            window = MetricWindow()
        if eval_loader is not None and (
            (config.eval_steps and state.step % config.eval_steps == 0)
            or state.step == total_steps
        ):
            last_eval = {"step": state.step, "split": "eval",
                         **evaluate(model, eval_loader, objective, accelerator)}
            if is_main:
                _log_record(accelerator, log_path, last_eval)
        if config.save_steps and state.step % config.save_steps == 0:
            save_checkpoint(config.output_dir, accelerator, model, optimizer, state,
                            config.save_total_limit)
    progress.close()
    runtime = time.perf_counter() - started

    metrics = {
        "train": {k: v for k, v in last_train.items() if k not in ("split",)},
        "eval": {k: v for k, v in last_eval.items() if k not in ("split",)},
        "steps": state.step,
        "train_pairs": len(train_pairs),
        "eval_pairs": len(eval_pairs),
        "train_runtime_s": runtime,
    }
    unwrapped = accelerator.unwrap_model(model)
    if evaluation_hook is not None and is_main:
        with unwrapped.disable_adapter():
            metrics["before"] = evaluation_hook(unwrapped, tokenizer)
        metrics["after"] = evaluation_hook(unwrapped, tokenizer)
    accelerator.wait_for_everyone()
    if is_main:
        unwrapped.save_pretrained(config.output_dir)
        tokenizer.save_pretrained(config.output_dir)
        if config.merge_adapter:
            merged_dir = save_merged_model(config, dtype)
            metrics["merged_model"] = merged_dir
        with open(os.path.join(config.output_dir, METRICS_FILE), "w") as f:
            json.dump(metrics, f, indent=2)
        write_training_curves(config.output_dir)
        if sample_prompts:
            write_samples(unwrapped, tokenizer, sample_prompts,
                          os.path.join(config.output_dir, SAMPLES_FILE),
                          use_chat_template=resolve_chat_template(tokenizer, config.chat_template))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def save_merged_model(config: TrainConfig, dtype: torch.dtype) -> str:
    """Base weights (reloaded unquantized: a 4-bit base cannot absorb the adapter exactly)
    plus the saved adapter, merged, written to output_dir/merged."""
    from peft import PeftModel

    base = load_base_model(config.model_name, dtype=dtype, quantize_4bit=False,
                           attn_implementation=config.attn_implementation,
                           trust_remote_code=config.trust_remote_code)
    merged = PeftModel.from_pretrained(base, config.output_dir).merge_and_unload()
    merged_dir = os.path.join(config.output_dir, "merged")
    merged.save_pretrained(merged_dir)
    load_tokenizer(config.model_name, config.trust_remote_code).save_pretrained(merged_dir)
    return merged_dir
