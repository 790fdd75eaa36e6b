"""A training run built in dependency order, one plain step per function.

device -> model -> model fit -> tokenizer -> forward -> objective -> data -> backend ->
reference -> batches -> schedule -> state. Each step takes what the earlier ones made and
returns what it makes; none changes another's result (the one change to the model a forward
path needs is `Forward.prepare`, inside the forward step). Every "auto" setting is resolved
by the step that first can, and `run_plan` collects what they resolved to.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from dpo_core.config.train import TrainConfig
from dpo_core.console import logger
from dpo_core.data.batches import MicroBatchStream, eval_loader
from dpo_core.data.streaming import PairStream, StreamingBatches
from dpo_core.data.templates import resolve_chat_template
from dpo_core.data.tokenization import TokenizedPair
from dpo_core.data.training_data import TrainingData, build_training_data
from dpo_core.forward.offloading import STAYS
from dpo_core.forward.strategy import Forward, choose_forward
from dpo_core.modeling import backends
from dpo_core.modeling.adapters import adapted_modules, build_policy, expert_note
from dpo_core.modeling.architecture import (
    attention_note,
    fit_lengths,
    router_aux_loss_coef,
    router_shape,
)
from dpo_core.modeling.loading import (
    base_model_of,
    load_tokenizer,
    resolve_dtype,
    resolve_gradient_checkpointing,
    resolve_quantization,
)
from dpo_core.modeling.reference import (
    ReferenceContext,
    ReferenceSync,
    reference_for,
    reference_sync,
    starting_model_for,
)
from dpo_core.reporting import trackers
from dpo_core.run_files import clear_previous_run, truncate_log
from dpo_core.training import checkpoint, host_memory
from dpo_core.training.objective import PreferenceObjective
from dpo_core.training.plan import RunPlan, resolve_precompute
from dpo_core.training.reference_logps import (
    ReferenceLogpsCollator,
    ReferencePass,
    precompute_reference,
)


@dataclass(frozen=True)
class Device:
    """Where the run executes and in what precision."""

    accelerator: Accelerator
    dtype: torch.dtype
    quantize: bool  # 4-bit NF4 base weights
    gradient_checkpointing: bool
    reuse_host_memory: bool  # glibc keeps freed memory for reuse (CPU training only)


@dataclass(frozen=True)
class Reference:
    """The reference of the run: the network its pass runs (`context`), the model training
    started from (`start`, for samples.md and a before/after evaluation: the reference itself
    unless it moves), how it moves (`sync`, --sync_ref_model) and, when precomputed, the train
    and eval pairs with their reference log-probs."""

    context: ReferenceContext
    start: ReferenceContext
    sync: ReferenceSync | None = None
    precomputed: tuple[ReferencePass, ReferencePass] | None = None
    batch_size: int | None = None  # pairs per batch of the precomputing pass

    @property
    def seconds(self) -> float:
        return sum(p.seconds for p in self.precomputed) if self.precomputed else 0.0


@dataclass(frozen=True)
class Batches:
    """The training stream and the eval loader (None without eval pairs)."""

    stream: MicroBatchStream | StreamingBatches
    eval_loader: DataLoader | None
    eval_batch_size: int


@dataclass(frozen=True)
class Schedule:
    total_steps: int
    warmup_steps: int


def setup_device(config: TrainConfig) -> Device:
    """The accelerator (with the --report_to tracker; its backend checked against what this
    loop can run), dtype, 4-bit and gradient checkpointing resolved, the seed set."""
    dtype = resolve_dtype(config.dtype)
    quantize = resolve_quantization(config.quantization, config.finetuning_type == "full")
    accelerator = backends.make_accelerator(
        dtype, trackers.tracker_options(config.report_to, config.output_dir))
    backends.check_backend(config, accelerator.state, quantize)
    set_seed(config.seed)
    reuse = (config.reuse_host_memory and accelerator.device.type == "cpu"
             and host_memory.reuse_freed_host_memory())
    return Device(accelerator, dtype, quantize,
                  resolve_gradient_checkpointing(config.gradient_checkpointing), reuse)


def setup_model(config: TrainConfig, device: Device) -> torch.nn.Module:
    """The policy: base model plus a fresh or starting adapter, or every weight trainable."""
    return build_policy(config, device.dtype, device.quantize, device.gradient_checkpointing)


@dataclass(frozen=True)
class ModelFit:
    """What the loaded policy decides: the run's settings with --max_length (and
    --max_prompt_length) fitted to its positions and --router_aux_loss_coef resolved, what its
    adapter adapts, and a sentence for each thing the user may not expect."""

    config: TrainConfig
    lora_target_modules: str | None
    notes: tuple[str, ...]


def setup_model_fit(config: TrainConfig, model: torch.nn.Module) -> ModelFit:
    """The settings that depend on the model, resolved (`ModelFit`); `config` is unchanged."""
    max_length, max_prompt_length, length_note = fit_lengths(model, config.max_length,
                                                             config.max_prompt_length)
    coef, router_note = router_aux_loss_coef(model, config.router_aux_loss_coef)
    experts = router_shape(base_model_of(model).config)
    notes = (attention_note(model, config.attn_implementation),
             expert_note(model, experts[0] if experts else None), length_note, router_note)
    fitted = dataclasses.replace(config, max_length=max_length,
                                 max_prompt_length=max_prompt_length, router_aux_loss_coef=coef)
    return ModelFit(fitted, adapted_modules(model), tuple(note for note in notes if note))


def setup_tokenizer(config: TrainConfig):
    """(tokenizer, whether its chat template applies)."""
    tokenizer = load_tokenizer(config.model_name, config.trust_remote_code)
    return tokenizer, resolve_chat_template(tokenizer, config.chat_template)


def setup_forward(config: TrainConfig, model: torch.nn.Module) -> Forward:
    """The forward path for this model and the speed settings, with the model prepared."""
    forward = choose_forward(model, config.padding_free, config.prefix_sharing)
    forward.prepare(model)
    return forward


def setup_data(config: TrainConfig, device: Device, tokenizer,
               use_chat_template: bool) -> TrainingData:
    """Tokenized train and eval pairs. The main process of each machine goes first: it
    tokenizes (or finds the tokenized cache entry), and the other processes then map the
    entry it wrote instead of tokenizing again."""
    accelerator = device.accelerator
    with accelerator.local_main_process_first():
        return build_training_data(config, tokenizer, use_chat_template,
                                   show_progress=accelerator.is_local_main_process)


def setup_backend(config: TrainConfig, device: Device, model: torch.nn.Module):
    """(model, optimizer) prepared for the backend: AdamW over the trainable weights, wrapped
    (DDP), sharded (FSDP2) or run by a DeepSpeed engine with the model."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=config.learning_rate, weight_decay=config.weight_decay)
    backends.configure_deepspeed(device.accelerator, config)
    # Together: FSDP2 points the optimizer at the sharded parameters, DeepSpeed wraps both in
    # its engine.
    model, optimizer = device.accelerator.prepare(model, optimizer)
    logger.info(backends.describe_backend(device.accelerator, model))
    return model, optimizer


def setup_reference(config: TrainConfig, device: Device, model: torch.nn.Module,
                    objective: PreferenceObjective, forward: Forward,
                    data: TrainingData, collator) -> Reference:
    """Which network is the reference and, where the plan says so, the reference log-probs of
    every pair in one no-grad pass, cached on disk."""
    accelerator = device.accelerator
    precompute = resolve_precompute(config, objective.uses_reference, data.num_train,
                                    accelerator.num_processes)
    context = reference_for(config, model, accelerator, precomputed=precompute)
    start = starting_model_for(config, model, accelerator, context)
    sync = reference_sync(config, model, context)
    if not precompute:
        return Reference(context, start, sync)
    batch_size = config.ref_batch_size or 4 * config.batch_size
    train, evaluation = precompute_reference(
        config, (data.train, data.eval), model=model, objective=objective, reference=context,
        forward=forward.record(), collator=collator, accelerator=accelerator,
        batch_size=batch_size, dtype=device.dtype, quantize=device.quantize)
    return Reference(context, start, sync, (train, evaluation), batch_size)


def setup_batches(config: TrainConfig, device: Device, forward: Forward, data: TrainingData,
                  reference: Reference, collator) -> Batches:
    """The seeded micro-batch stream over the training pairs (or, --streaming, over the
    stream), and the eval loader; with precomputed reference log-probs, the batches carry
    them."""
    def lengths(pairs) -> list[int] | None:  # None: no length grouping
        return forward.pair_lengths(pairs) if config.group_by_length else None

    # Measured on the plain pairs: the pairs with reference values are the same, in order.
    train_lengths, eval_lengths = lengths(data.train), lengths(data.eval)
    train_pairs: Sequence[TokenizedPair] = data.train
    eval_pairs: Sequence[TokenizedPair] = data.eval
    if reference.precomputed:
        train_pairs, eval_pairs = (p.pairs for p in reference.precomputed)
        collator = ReferenceLogpsCollator(collator)

    accelerator = device.accelerator
    if isinstance(data.train, PairStream):
        stream = StreamingBatches(accelerator, data.train, config.batch_size, collator)
    else:
        stream = MicroBatchStream(accelerator, train_pairs, config.batch_size, collator,
                                  config.seed, train_lengths)
    eval_batch_size = config.eval_batch_size or config.batch_size
    loader = (eval_loader(accelerator, eval_pairs, eval_batch_size, collator, eval_lengths)
              if len(eval_pairs) else None)
    return Batches(stream, loader, eval_batch_size)


def setup_schedule(config: TrainConfig, batches: Batches) -> Schedule:
    """Total optimizer steps (from --max_steps or --epochs) and warmup, never the whole run."""
    total = config.max_steps or math.ceil(
        config.epochs * batches.stream.batches_per_epoch / config.gradient_accumulation_steps)
    warmup = config.warmup_for(total)
    if config.warmup_ratio is None and warmup < config.warmup_steps:
        logger.info(f"--warmup_steps {config.warmup_steps} is longer than this {total}-step "
                    f"run; warming up for {warmup} steps instead.")
    return Schedule(total, warmup)


def setup_state(config: TrainConfig, device: Device, model: torch.nn.Module,
                optimizer: torch.optim.Optimizer, reference: Reference,
                num_train_pairs: int | None,
                resume_path: str | None) -> checkpoint.TrainState:
    """A fresh TrainState (an earlier run's files cleared), or the checkpoint's: weights,
    optimizer, moving reference, RNG and data position restored, after checking that its data
    order and starting point are this run's."""
    accelerator = device.accelerator
    order = checkpoint.data_order(config, accelerator.num_processes, num_train_pairs)
    start = checkpoint.started_from(config)
    if not resume_path:
        if accelerator.is_main_process:
            clear_previous_run(config.output_dir)
        return checkpoint.TrainState(data_order=order, started_from=start)
    state = checkpoint.load_checkpoint(resume_path, accelerator, model, optimizer, order, start,
                                       reference.sync)
    if accelerator.is_main_process:
        truncate_log(config.output_dir, state.step)
    logger.info(f"Resumed from {resume_path} at step {state.step}.")
    return state


def run_plan(device: Device, fit: ModelFit, use_chat_template: bool, forward: Forward,
             data: TrainingData, reference: Reference, batches: Batches,
             schedule: Schedule) -> RunPlan:
    """What each "auto" setting resolved to, from the steps that resolved them."""
    accelerator = device.accelerator
    return RunPlan(
        quantization="4bit" if device.quantize else "none",
        dtype=str(device.dtype).removeprefix("torch."),
        gradient_checkpointing=device.gradient_checkpointing,
        distributed_type=accelerator.distributed_type.value,
        fsdp_version=backends.fsdp_version(accelerator),
        zero_stage=backends.zero_stage(accelerator),
        num_processes=accelerator.num_processes,
        reuse_host_memory=device.reuse_host_memory,
        lora_target_modules=fit.lora_target_modules,
        max_length=fit.config.max_length,
        max_prompt_length=fit.config.max_prompt_length,
        router_aux_loss_coef=fit.config.router_aux_loss_coef,
        chat_template=use_chat_template,
        streaming=isinstance(data.train, PairStream),
        tokenized_cache=data.tokenized_cache,
        **forward.record(),
        # Tensors in host memory already stay where they are (dpo_core.forward.offloading).
        activation_offloading=(fit.config.activation_offloading
                               and accelerator.device.type not in STAYS),
        precompute_ref_log_probs=reference.precomputed is not None,
        ref_batch_size=reference.batch_size,
        eval_batch_size=batches.eval_batch_size,
        total_steps=schedule.total_steps,
        warmup_steps=schedule.warmup_steps,
        notes=[*fit.notes, *forward.notes],
    )
