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
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dpo_core.batching import MicroBatchStream, length_sorted_order, pair_length
from dpo_core.checkpoint import (
    TrainState,
    checkpoint_dirs,
    load_checkpoint,
    resolve_checkpoint,
    save_adapter,
    save_checkpoint,
)
from dpo_core.config import ConfigError, TrainConfig
from dpo_core.data import load_pairs, split_pairs
from dpo_core.logps import (
    FOUR_D_MASK_ATTENTION,
    logps_fn_for_model,
    padding_free_prefix_shared_forward,
    prefix_shared_forward,
)
from dpo_core.loss import preference_metrics
from dpo_core.model import (
    add_lora,
    disable_dropout,
    load_base_model,
    load_tokenizer,
    resolve_dtype,
    resolve_gradient_checkpointing,
    resolve_quantization,
)
from dpo_core.objective import LogpsFn, PreferenceObjective
from dpo_core.reference_cache import ReferenceLogpsCollator, with_reference_logps
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


class DeviceMemoryError(RuntimeError):
    """The accelerator ran out of memory; the message names the step and what to change."""


def last_checkpoint_note(output_dir: str) -> str:
    saved = checkpoint_dirs(output_dir)
    newest = saved[-1] if saved else "none (lower --save_steps to keep one)"
    return f"Last good checkpoint: {newest}."


def out_of_memory_message(config: TrainConfig, step: int, checkpointing: bool) -> str:
    """What to change when step `step` did not fit: first what can resume from the last
    checkpoint, then what changes the data order and so means starting over."""
    parts = [f"step {step}: out of device memory. {last_checkpoint_note(config.output_dir)}"]
    if not checkpointing:
        parts.append("Add --gradient_checkpointing (much less activation memory, about 20% "
                     "slower) and continue with --resume_from_checkpoint latest.")
    restart = []
    if config.batch_size > 1:
        smaller = config.batch_size // 2 if config.batch_size % 2 == 0 else 1
        accumulation = config.gradient_accumulation_steps * config.batch_size // smaller
        restart.append(f"--batch_size {smaller} --gradient_accumulation_steps {accumulation} "
                       "(the same pairs per step)")
    restart.append(f"a shorter --max_length (now {config.max_length})")
    parts.append(("Or start" if not checkpointing else "Start") + " over (--overwrite_output_dir)"
                 " with " + " or ".join(restart) + ".")
    return " ".join(parts)


def merged_metrics(stats: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Preference metrics over every pair in `stats` (per-batch dicts of per-pair tensors)."""
    merged = [torch.cat([s[k] for s in stats]) for k in STAT_KEYS]
    return {k: v.item() for k, v in preference_metrics(*merged).items()}


@dataclass
class MetricWindow:
    """Per-pair statistics gathered from every process since the last log line."""

    stats: list[dict[str, torch.Tensor]] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)

    def metrics(self) -> dict[str, float]:
        values = merged_metrics(self.stats)
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
    """Refuse to start afresh over a finished run, or over an unfinished run's checkpoints,
    unless asked; resuming into either is fine."""
    if config.overwrite_output_dir or config.resume_from_checkpoint:
        return
    if os.path.isfile(os.path.join(config.output_dir, METRICS_FILE)):
        raise ConfigError(
            f"--output_dir {config.output_dir!r} already holds a finished run; pass "
            "--overwrite_output_dir to replace it or choose another directory"
        )
    saved = checkpoint_dirs(config.output_dir)
    if saved:
        raise ConfigError(
            f"--output_dir {config.output_dir!r} holds checkpoints of an unfinished run (newest: "
            f"{os.path.basename(saved[-1])}); pass --resume_from_checkpoint latest to continue "
            "it, --overwrite_output_dir to start over, or choose another directory"
        )


def clear_previous_run(output_dir: str) -> None:
    """Starting afresh in a used output_dir: drop the old log, final metrics and checkpoints,
    so neither the log nor `--resume_from_checkpoint latest` can mix two runs."""
    for name in (LOG_FILE, METRICS_FILE):
        if os.path.isfile(os.path.join(output_dir, name)):
            os.remove(os.path.join(output_dir, name))
    for old in checkpoint_dirs(output_dir):
        shutil.rmtree(old)


def mixed_precision_for(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


def data_order(config: TrainConfig, num_processes: int, train_pairs: int) -> dict:
    """What decides which pairs make up step N; a checkpoint records it for its resume."""
    return {"--batch_size": config.batch_size,
            "--gradient_accumulation_steps": config.gradient_accumulation_steps,
            "--seed": config.seed, "--group_by_length": config.group_by_length,
            "processes": num_processes, "training pairs": train_pairs}


def check_backend(config: TrainConfig, state, quantize: bool) -> None:
    """Refuse, naming the fix, what this loop cannot do correctly under FSDP or DeepSpeed
    (`state`: the AcceleratorState). Untested on GPUs so far, so kept narrow:

    - resumable checkpoints hold one replicated optimizer state (exact under DDP), which FSDP
      and DeepSpeed shard; the final adapter is saved either way;
    - 4-bit weights are not set up for sharding (no bnb_4bit_quant_storage);
    - samples and the demo's evaluation run on the main process alone, which cannot work
      while the weights are sharded (FSDP, ZeRO-3);
    - DeepSpeed steps its optimizer inside backward: no accumulation across this loop's
      micro-batches, and a non-finite step is applied before the loop could skip it.
    """
    if state.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return
    fsdp = state.distributed_type == DistributedType.FSDP
    zero_stage = 0 if fsdp else state.deepspeed_plugin.zero_stage
    needs = []
    if quantize:
        needs.append("--quantization none (use the DDP config for 4-bit QLoRA)")
    if config.save_steps or config.resume_from_checkpoint:
        needs.append("--save_steps 0 and no --resume_from_checkpoint (checkpoints are for "
                     "single-process and DDP runs, and the final adapter is still saved)")
    if (fsdp or zero_stage == 3) and (config.num_sample_prompts or config.demo):
        needs.append("--num_sample_prompts 0 and no --demo (they generate on one process)")
    if fsdp and state.fsdp_plugin.fsdp_version == 1 and not state.fsdp_plugin.use_orig_params:
        needs.append("fsdp_use_orig_params: true in the Accelerate config (frozen and LoRA "
                     "weights share FSDP units)")
    if not fsdp and config.gradient_accumulation_steps > 1:
        needs.append("--gradient_accumulation_steps 1 (raise --batch_size or add processes)")
    if not fsdp and config.skip_nonfinite_steps:
        needs.append("--skip_nonfinite_steps 0")
    if needs:
        backend = "FSDP" if fsdp else f"DeepSpeed ZeRO-{zero_stage}"
        raise ConfigError(f"under {backend} this trainer needs " + "; ".join(needs))


def launched_without_accelerator() -> bool:
    """One of several processes (torchrun, `accelerate launch --multi_gpu`) on a machine with
    no GPU. Accelerate starts a CPU (gloo) process group only when told it runs on the CPU;
    otherwise every process would train alone, all writing into one output_dir."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if hasattr(torch, "accelerator"):  # torch >= 2.6: CUDA, XPU, NPU, MPS, ...
        return not torch.accelerator.is_available()
    return not torch.cuda.is_available()


def build_policy(config: TrainConfig, dtype: torch.dtype, quantize: bool,
                 gradient_checkpointing: bool) -> torch.nn.Module:
    """Base model + fresh LoRA adapter; dropout off so both passes see one network."""
    base = load_base_model(config.model_name, dtype=dtype, quantize_4bit=quantize,
                           attn_implementation=config.attn_implementation,
                           trust_remote_code=config.trust_remote_code)
    model = add_lora(base, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                     target_modules=config.target_modules,
                     gradient_checkpointing=gradient_checkpointing, quantized=quantize)
    if config.disable_dropout:
        disable_dropout(model)
    return model


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
    return merged_metrics(gathered)


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


def covers_every_pair(config: TrainConfig, num_pairs: int, num_processes: int) -> bool:
    """Whether the run trains on every pair at least once: only then is a reference pass over
    all pairs free (each pair's reference log-probs are needed anyway)."""
    if config.max_steps:
        pairs_per_step = config.batch_size * config.gradient_accumulation_steps * num_processes
        return config.max_steps * pairs_per_step >= num_pairs
    return config.epochs >= 1


@dataclass
class TrainingRun:
    """What setup builds, in the order it builds it; the step loop and finish read it."""

    config: TrainConfig
    accelerator: Accelerator
    dtype: torch.dtype
    gradient_checkpointing: bool
    model: torch.nn.Module
    tokenizer: object
    optimizer: torch.optim.Optimizer
    objective: PreferenceObjective
    train_pairs: list[TokenizedPair]
    eval_pairs: list[TokenizedPair]
    sample_prompts: list
    stream: MicroBatchStream
    eval_loader: DataLoader | None
    total_steps: int
    warmup: int
    state: TrainState
    log_path: str
    reference_pass_s: float

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def train(config: TrainConfig, evaluation_hook: EvaluationHook | None = None) -> dict:
    """Train a LoRA adapter with DPO as `config` says; return the final metrics."""
    run = setup_run(config)
    config, state = run.config, run.state
    window = MetricWindow()
    batches = run.stream.iterate(state.micro_batches_seen)
    progress = tqdm(total=run.total_steps, initial=state.step, desc="DPO",
                    disable=not run.is_main, dynamic_ncols=True)
    last_train, last_eval = {}, {}
    started = time.perf_counter()
    while state.step < run.total_steps:
        lr = get_lr(state.step, peak_lr=config.learning_rate, warmup_steps=run.warmup,
                    total_steps=run.total_steps, kind=config.lr_scheduler)
        try:
            step_loss = optimizer_step(run, batches, lr, window)
        except torch.OutOfMemoryError as error:
            raise DeviceMemoryError(out_of_memory_message(
                config, state.step + 1, run.gradient_checkpointing)) from error
        progress.update(1)
        progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")

        last_step = state.step == run.total_steps
        if (state.step % config.logging_steps == 0 or last_step) and window.stats:
            last_train = {"step": state.step,
                          "epoch": state.micro_batches_seen / run.stream.batches_per_epoch,
                          "split": "train", **window.metrics(), "learning_rate": lr}
            if run.is_main:
                _log_record(run.accelerator, run.log_path, last_train)
            window = MetricWindow()
        if run.eval_loader is not None and (
            (config.eval_steps and state.step % config.eval_steps == 0) or last_step
        ):
            last_eval = {"step": state.step, "split": "eval",
                         **evaluate(run.model, run.eval_loader, run.objective, run.accelerator)}
            if run.is_main:
                _log_record(run.accelerator, run.log_path, last_eval)
        if config.save_steps and state.step % config.save_steps == 0:
            save_checkpoint(config.output_dir, run.accelerator, run.model, run.optimizer, state,
                            config.save_total_limit)
    progress.close()
    metrics = {
        "train": {k: v for k, v in last_train.items() if k != "split"},
        "eval": {k: v for k, v in last_eval.items() if k != "split"},
        "steps": state.step,
        "num_processes": run.accelerator.num_processes,
        "train_pairs": len(run.train_pairs),
        "eval_pairs": len(run.eval_pairs),
        "train_runtime_s": time.perf_counter() - started,
        "reference_pass_s": run.reference_pass_s,
    }
    return finish_run(run, metrics, evaluation_hook)


def setup_run(config: TrainConfig) -> TrainingRun:
    """Validate, then build model -> tokenizer -> optimizer -> loss -> data -> schedule, and
    load the checkpoint to resume from. Nothing saved in output_dir is touched before all of
    that has succeeded: a failed start (bad model, data or checkpoint) loses nothing."""
    config.validate()
    check_output_dir(config)
    resume_path = (resolve_checkpoint(config.resume_from_checkpoint, config.output_dir)
                   if config.resume_from_checkpoint else None)
    dtype = resolve_dtype(config.dtype)
    quantize = resolve_quantization(config.quantization)
    accelerator = Accelerator(mixed_precision=mixed_precision_for(dtype),
                              cpu=launched_without_accelerator(),
                              **tracker_options(config.report_to, config.output_dir))
    check_backend(config, accelerator.state, quantize)
    is_main = accelerator.is_main_process
    set_seed(config.seed)
    if is_main:
        os.makedirs(config.output_dir, exist_ok=True)

    checkpointing = resolve_gradient_checkpointing(config.gradient_checkpointing)
    if is_main and checkpointing and config.gradient_checkpointing is None:
        print("Gradient checkpointing is on (CUDA is present); --no-gradient_checkpointing is "
              "about 25% faster where the batch fits without it.")
    model = build_policy(config, dtype, quantize, checkpointing)
    tokenizer = load_tokenizer(config.model_name, config.trust_remote_code)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=config.learning_rate, weight_decay=config.weight_decay)
    objective = PreferenceObjective(
        loss_type=config.loss_type, beta=config.beta, label_smoothing=config.label_smoothing,
        rpo_alpha=config.rpo_alpha, simpo_gamma=config.simpo_gamma,
        reference_free=config.reference_free,
        logps_fn=_logps_fn(config, model, announce=is_main))
    with accelerator.main_process_first():
        train_pairs, eval_pairs, sample_prompts = prepare_data(config, tokenizer,
                                                               show_progress=is_main)
    collator = PreferenceCollator(tokenizer.pad_token_id)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # Accelerate reads DeepSpeed's micro-batch size off the dataloaders given to prepare();
        # this loop prepares its own.
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = config.batch_size
    model, optimizer = accelerator.prepare(model, optimizer)
    reference_pass_s = 0.0
    if wants_precomputed_reference(config, objective, len(train_pairs), accelerator):
        reference_pass = {"model": model, "objective": objective, "collator": collator,
                          "accelerator": accelerator,
                          "batch_size": config.ref_batch_size or 4 * config.batch_size,
                          "cache_dir": config.ref_cache_dir or os.path.join(config.output_dir,
                                                                            "reference_logps"),
                          "settings": {"logps_fn": objective.logps_fn.__name__,
                                       "attn_implementation": config.attn_implementation,
                                       "dtype": str(dtype), "quantize": quantize},
                          "show_progress": is_main}
        train_reference = with_reference_logps(train_pairs, **reference_pass)
        eval_reference = with_reference_logps(eval_pairs, **reference_pass)
        train_pairs, eval_pairs = train_reference.pairs, eval_reference.pairs
        reference_pass_s = train_reference.seconds + eval_reference.seconds
        collator = ReferenceLogpsCollator(collator)
    prefix_shared = objective.logps_fn in (prefix_shared_forward,
                                           padding_free_prefix_shared_forward)
    train_lengths = ([pair_length(p, prefix_shared) for p in train_pairs]
                     if config.group_by_length else None)
    stream = MicroBatchStream(accelerator, train_pairs, config.batch_size, collator, config.seed,
                              lengths=train_lengths)
    eval_loader = None
    if eval_pairs:
        # Evaluation order does not change its metrics; sorted by length it pads least.
        eval_order = (length_sorted_order([pair_length(p, prefix_shared) for p in eval_pairs])
                      if config.group_by_length else None)
        eval_loader = accelerator.prepare_data_loader(DataLoader(
            eval_pairs, batch_size=config.eval_batch_size or config.batch_size,
            sampler=eval_order, collate_fn=collator))
    total_steps = config.max_steps or math.ceil(
        config.epochs * stream.batches_per_epoch / config.gradient_accumulation_steps)
    warmup = config.warmup_for(total_steps)
    if is_main and config.warmup_ratio is None and warmup < config.warmup_steps:
        print(f"--warmup_steps {config.warmup_steps} is longer than this {total_steps}-step run; "
              f"warming up for {warmup} steps instead.")

    order = data_order(config, accelerator.num_processes, len(train_pairs))
    state = TrainState(data_order=order)
    log_path = os.path.join(config.output_dir, LOG_FILE)
    if resume_path:
        state = load_checkpoint(resume_path, accelerator, model, optimizer, order)
        if is_main:
            _truncate_log(log_path, state.step)
            print(f"Resumed from {resume_path} at step {state.step}.")
    elif is_main:
        clear_previous_run(config.output_dir)
    if is_main:
        config.to_json(os.path.join(config.output_dir, CONFIG_FILE))
    # Started once setup has succeeded, so a bad model or data path leaves no empty run.
    start_trackers(accelerator, config)
    model.train()
    return TrainingRun(
        config=config, accelerator=accelerator, dtype=dtype, gradient_checkpointing=checkpointing,
        model=model, tokenizer=tokenizer, optimizer=optimizer, objective=objective,
        train_pairs=train_pairs, eval_pairs=eval_pairs, sample_prompts=sample_prompts,
        stream=stream, eval_loader=eval_loader, total_steps=total_steps, warmup=warmup,
        state=state, log_path=log_path, reference_pass_s=reference_pass_s)


def _logps_fn(config: TrainConfig, model: torch.nn.Module, announce: bool) -> LogpsFn:
    attn_implementation = getattr(model.config, "_attn_implementation", None)
    if announce and config.prefix_sharing and attn_implementation not in FOUR_D_MASK_ATTENTION:
        print(f"--prefix_sharing needs attn_implementation sdpa or eager, and this model "
              f"uses {attn_implementation!r}: using the standard two-row forward instead.")
    logps_fn, padding_free = logps_fn_for_model(model, config.prefix_sharing,
                                                config.padding_free)
    if announce and config.padding_free and not padding_free:
        print(f"--padding_free needs attn_implementation sdpa or eager (or flex_attention on "
              f"CUDA), and this model uses {attn_implementation!r}: padding as before.")
    return logps_fn


def wants_precomputed_reference(config: TrainConfig, objective: PreferenceObjective,
                                num_pairs: int, accelerator: Accelerator) -> bool:
    """Asked for explicitly: always. Unset: when every pair's reference is needed anyway."""
    if config.precompute_ref_log_probs is not None:
        return config.precompute_ref_log_probs
    return objective.uses_reference and covers_every_pair(config, num_pairs,
                                                          accelerator.num_processes)


def optimizer_step(run: TrainingRun, batches: Iterator[dict[str, torch.Tensor]], lr: float,
                   window: MetricWindow) -> float:
    """One optimizer step at `lr` over the next `gradient_accumulation_steps` micro-batches;
    their per-pair stats go into `window`. A non-finite loss or gradient skips the update
    while --skip_nonfinite_steps allows, else raises NonFiniteError. Returns the step's mean
    loss over every process's pairs."""
    config, state, accelerator = run.config, run.state, run.accelerator
    accumulation = config.gradient_accumulation_steps
    micro_batches = [next(batches) for _ in range(accumulation)]
    state.micro_batches_seen += accumulation
    # Sum of per-pair losses over the step's pairs: the gradient equals that of one batch
    # holding all of them, even when the last micro-batch is smaller.
    pairs_in_step = sum(len(b["chosen_input_ids"]) for b in micro_batches)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    step_losses = []
    for i, batch in enumerate(micro_batches):
        last_micro = i == accumulation - 1
        with nullcontext() if last_micro else accelerator.no_sync(run.model):
            stats = run.objective(run.model, batch)
            accelerator.backward(stats["losses"].sum() / pairs_in_step)
        gathered = accelerator.gather({k: stats[k].detach() for k in STAT_KEYS})
        window.stats.append(gathered)
        step_losses.append(gathered["losses"])
        tokens = batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum()
        window.tokens += int(accelerator.reduce(tokens, "sum").item())
    grad_norm = float(accelerator.clip_grad_norm_(run.model.parameters(),
                                                  config.max_grad_norm or float("inf")))
    step_loss = torch.cat(step_losses).mean().item()
    # Under fp16 loss scaling an inf gradient is the scaler's business: it skips the step.
    finite = math.isfinite(step_loss) and (math.isfinite(grad_norm)
                                           or accelerator.scaler is not None)
    if finite:
        run.optimizer.step()
        window.grad_norms.append(grad_norm)
    else:
        if state.nonfinite_steps_skipped >= config.skip_nonfinite_steps:
            raise NonFiniteError(
                f"step {state.step + 1}: loss {step_loss} / grad norm {grad_norm} is not "
                f"finite; stopping. {last_checkpoint_note(config.output_dir)} "
                "Try a lower --learning_rate, or --skip_nonfinite_steps N to skip such "
                "steps, and --resume_from_checkpoint latest.")
        state.nonfinite_steps_skipped += 1
        del window.stats[-accumulation:]
        if run.is_main:
            tqdm.write(f"step {state.step + 1}: non-finite loss or gradient, update skipped "
                       f"({state.nonfinite_steps_skipped}/{config.skip_nonfinite_steps}).")
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    return step_loss


def finish_run(run: TrainingRun, metrics: dict, evaluation_hook: EvaluationHook | None) -> dict:
    """Before/after evaluation, then the adapter, tokenizer, metrics.json, curves and
    samples (and the merged model if asked) into output_dir; returns `metrics`."""
    config, accelerator = run.config, run.accelerator
    unwrapped = accelerator.unwrap_model(run.model)
    if evaluation_hook is not None and run.is_main:
        with unwrapped.disable_adapter():
            metrics["before"] = evaluation_hook(unwrapped, run.tokenizer)
        metrics["after"] = evaluation_hook(unwrapped, run.tokenizer)
    accelerator.wait_for_everyone()
    save_adapter(accelerator, run.model, config.output_dir)
    if run.is_main:
        run.tokenizer.save_pretrained(config.output_dir)
        if config.merge_adapter:
            metrics["merged_model"] = save_merged_model(config, run.dtype)
        with open(os.path.join(config.output_dir, METRICS_FILE), "w") as f:
            json.dump(metrics, f, indent=2)
        write_training_curves(config.output_dir)
        if run.sample_prompts:
            write_samples(unwrapped, run.tokenizer, run.sample_prompts,
                          os.path.join(config.output_dir, SAMPLES_FILE),
                          use_chat_template=resolve_chat_template(run.tokenizer,
                                                                  config.chat_template),
                          max_new_tokens=config.sample_max_new_tokens)
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
