"""The DPO training loop on Accelerate.

`Trainer.setup` builds the run in dependency order (accelerator -> model -> tokenizer ->
optimizer -> loss -> data -> reference pass -> batches -> schedule -> resume state) and
resolves every "auto" setting once, into the run plan. `Trainer.train` then takes optimizer
steps, each over `gradient_accumulation_steps` micro-batches from a seeded, epoch-by-epoch
shuffled stream, so the step number alone says where in the data a run is: that is what makes
resuming exact.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from dpo_core import checkpoint, distributed, failures, host_memory, report, run_files
from dpo_core.batching import MicroBatchStream, eval_loader, pair_length
from dpo_core.config import TrainConfig
from dpo_core.console import configure_console, logger
from dpo_core.generation import generate_replies
from dpo_core.interrupt import StopOnInterrupt, checkpoint_and_stop
from dpo_core.logps import PaddingFreeCollator, resolve_forward
from dpo_core.metrics import MetricWindow, format_record, merged_metrics
from dpo_core.model import (
    build_policy,
    eval_mode,
    load_tokenizer,
    resolve_dtype,
    resolve_gradient_checkpointing,
    resolve_quantization,
    save_merged_model,
)
from dpo_core.objective import PreferenceObjective
from dpo_core.plan import RunPlan, resolve_precompute
from dpo_core.reference import reference_for
from dpo_core.reference_cache import ReferenceLogpsCollator, precompute_reference
from dpo_core.schedule import get_lr
from dpo_core.tokenization import PreferenceCollator, resolve_chat_template
from dpo_core.training_data import build_training_data
from dpo_core.training_signal import ZeroGradientWatch

# An extra evaluation run after training on the reference (the model training started from)
# and on the trained model: hook(model, tokenizer) -> {"metric": value}. The demo's
# before/after table uses it.
EvaluationHook = Callable[[torch.nn.Module, object], dict]


def train(config: TrainConfig, evaluation_hook: EvaluationHook | None = None) -> dict:
    """Train a LoRA adapter (or every weight) with DPO as `config` says; return the final
    metrics."""
    trainer = Trainer(config, evaluation_hook)
    with run_files.removed_if_left_empty(config.output_dir):
        trainer.setup()
    with trainer.interrupt:  # Ctrl-C stops at the next step boundary
        return trainer.train()


class Trainer:
    """One run: `setup()` then `train()`. Attributes are set by the setup steps, in order."""

    def __init__(self, config: TrainConfig, evaluation_hook: EvaluationHook | None = None):
        self.config, self.evaluation_hook = config, evaluation_hook
        self.plan = RunPlan()
        self.interrupt = StopOnInterrupt()
        self.gradients = ZeroGradientWatch()

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    # -- setup, in dependency order ---------------------------------------------------------
    def setup(self) -> None:
        """Validate, build everything, load the checkpoint to resume from. Nothing saved in
        output_dir is touched before all of that has succeeded: a failed start (bad model,
        data or checkpoint) loses nothing."""
        config = self.config
        configure_console()
        config.validate()
        run_files.check_output_dir(config.output_dir, overwrite=config.overwrite_output_dir,
                                   resuming=bool(config.resume_from_checkpoint))
        resume_path = (checkpoint.resolve_checkpoint(config.resume_from_checkpoint,
                                                     config.output_dir)
                       if config.resume_from_checkpoint else None)
        self._setup_accelerator()
        self._setup_model()
        self._setup_tokenizer()
        self._setup_optimizer()
        self._setup_objective()
        self._setup_data()
        self._setup_reference()
        self._setup_batches()
        self._setup_schedule()
        self._setup_state(resume_path)
        logger.info(self.plan.describe(config))
        if self.is_main:
            run_files.write_json(config.output_dir, run_files.CONFIG_FILE, {
                **dataclasses.asdict(config), run_files.RUN_PLAN_KEY: self.plan.record()})
        # Started once setup has succeeded, so a bad model or data path leaves no empty run.
        report.start_trackers(self.accelerator, config, self.plan.record())
        self.model.train()

    def _setup_accelerator(self) -> None:
        config, plan = self.config, self.plan
        self.dtype = resolve_dtype(config.dtype)
        self.quantize = resolve_quantization(config.quantization,
                                             config.finetuning_type == "full")
        self.gradient_checkpointing = resolve_gradient_checkpointing(config.gradient_checkpointing)
        self.accelerator = distributed.make_accelerator(
            self.dtype, report.tracker_options(config.report_to, config.output_dir))
        distributed.check_backend(config, self.accelerator.state, self.quantize)
        set_seed(config.seed)
        if self.is_main:
            os.makedirs(config.output_dir, exist_ok=True)
        plan.quantization = "4bit" if self.quantize else "none"
        plan.dtype = str(self.dtype).removeprefix("torch.")
        plan.gradient_checkpointing = self.gradient_checkpointing
        plan.distributed_type = self.accelerator.distributed_type.value
        plan.fsdp_version = distributed.fsdp_version(self.accelerator)
        plan.num_processes = self.accelerator.num_processes
        plan.reuse_host_memory = (config.reuse_host_memory
                                  and self.accelerator.device.type == "cpu"
                                  and host_memory.reuse_freed_host_memory())

    def _setup_model(self) -> None:
        self.model = build_policy(self.config, self.dtype, self.quantize,
                                  self.gradient_checkpointing)

    def _setup_tokenizer(self) -> None:
        self.tokenizer = load_tokenizer(self.config.model_name, self.config.trust_remote_code)
        self.plan.chat_template = resolve_chat_template(self.tokenizer, self.config.chat_template)

    def _setup_optimizer(self) -> None:
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=self.config.learning_rate, weight_decay=self.config.weight_decay)

    def _setup_objective(self) -> None:
        plan = self.plan
        plan.padding_free, plan.prefix_sharing, logps_fn = resolve_forward(
            self.model, self.config.padding_free, self.config.prefix_sharing)
        self.objective = PreferenceObjective.from_config(self.config, logps_fn)

    def _setup_data(self) -> None:
        with self.accelerator.main_process_first():
            self.data = build_training_data(self.config, self.tokenizer, self.plan.chat_template,
                                            show_progress=self.is_main)
        self.train_pairs, self.eval_pairs = self.data.train, self.data.eval
        self.collator = PreferenceCollator(self.tokenizer.pad_token_id)
        if self.plan.padding_free:  # the packed layout built on the CPU, in the DataLoader
            self.collator = PaddingFreeCollator(self.collator,
                                                prefix_shared=self.plan.prefix_sharing == "always")
        distributed.prepare_for_backend(self.accelerator, self.config.batch_size)
        self.model, self.optimizer = distributed.prepare_model(self.accelerator, self.model,
                                                               self.optimizer)
        logger.info(distributed.describe_backend(self.accelerator, self.model))

    def _setup_reference(self) -> None:
        """The reference log-probs of every pair in one no-grad pass, cached on disk, where
        the plan says so; the collator then hands them to the objective with each batch."""
        config, plan = self.config, self.plan
        plan.precompute_ref_log_probs = resolve_precompute(
            config, self.objective.uses_reference, len(self.train_pairs),
            self.accelerator.num_processes)
        self.objective = dataclasses.replace(self.objective, reference=reference_for(
            config, self.model, self.accelerator, precomputed=plan.precompute_ref_log_probs))
        self.reference_pass_s = 0.0
        if not plan.precompute_ref_log_probs:
            return
        plan.ref_batch_size = config.ref_batch_size or 4 * config.batch_size
        passes = precompute_reference(
            config, (self.train_pairs, self.eval_pairs), model=self.model,
            objective=self.objective, collator=self.collator, accelerator=self.accelerator,
            batch_size=plan.ref_batch_size, dtype=self.dtype, quantize=self.quantize)
        self.train_pairs, self.eval_pairs = passes[0].pairs, passes[1].pairs
        self.reference_pass_s = sum(p.seconds for p in passes)
        self.collator = ReferenceLogpsCollator(self.collator)

    def _setup_batches(self) -> None:
        config, plan = self.config, self.plan
        prefix_shared = plan.prefix_sharing == "always"

        def lengths(pairs: list) -> list[int] | None:  # None: no length grouping
            return [pair_length(p, prefix_shared) for p in pairs] if config.group_by_length \
                else None

        self.stream = MicroBatchStream(self.accelerator, self.train_pairs, config.batch_size,
                                       self.collator, config.seed, lengths(self.train_pairs))
        plan.eval_batch_size = config.eval_batch_size or config.batch_size
        self.eval_loader = (eval_loader(self.accelerator, self.eval_pairs, plan.eval_batch_size,
                                        self.collator, lengths(self.eval_pairs))
                            if self.eval_pairs else None)

    def _setup_schedule(self) -> None:
        config, plan = self.config, self.plan
        plan.total_steps = config.max_steps or math.ceil(
            config.epochs * self.stream.batches_per_epoch / config.gradient_accumulation_steps)
        plan.warmup_steps = config.warmup_for(plan.total_steps)
        if config.warmup_ratio is None and plan.warmup_steps < config.warmup_steps:
            logger.info(f"--warmup_steps {config.warmup_steps} is longer than this "
                        f"{plan.total_steps}-step run; warming up for {plan.warmup_steps} steps "
                        "instead.")

    def _setup_state(self, resume_path: str | None) -> None:
        """A fresh TrainState, or the checkpoint's (weights, optimizer, RNG and data position
        restored, after checking that its data order and starting point are this run's)."""
        config = self.config
        order = checkpoint.data_order(config, self.accelerator.num_processes,
                                      len(self.train_pairs))
        start = checkpoint.started_from(config)
        self.state = checkpoint.TrainState(data_order=order, started_from=start)
        if resume_path:
            self.state = checkpoint.load_checkpoint(resume_path, self.accelerator, self.model,
                                                    self.optimizer, order, start)
            if self.is_main:
                run_files.truncate_log(config.output_dir, self.state.step)
            logger.info(f"Resumed from {resume_path} at step {self.state.step}.")
        elif self.is_main:
            run_files.clear_previous_run(config.output_dir)

    # -- the loop ---------------------------------------------------------------------------
    def train(self) -> dict:
        """Optimizer steps to the end of the plan, logging, evaluating and checkpointing on
        schedule; then `_finish`. Returns the final metrics."""
        config, state, plan = self.config, self.state, self.plan
        window = MetricWindow()
        batches = self.stream.iterate(state.micro_batches_seen)
        progress = tqdm(total=plan.total_steps, initial=state.step, desc="DPO",
                        disable=not self.is_main, dynamic_ncols=True)
        last_train, last_eval = {}, {}
        started = time.perf_counter()
        while state.step < plan.total_steps:
            lr = get_lr(state.step, peak_lr=config.learning_rate, warmup_steps=plan.warmup_steps,
                        total_steps=plan.total_steps, kind=config.lr_scheduler)
            try:
                self._optimizer_step(batches, lr, window)
            except torch.OutOfMemoryError as error:
                raise failures.DeviceMemoryError(failures.out_of_memory_message(
                    config, state.step + 1, self.gradient_checkpointing)) from error
            progress.update(1)

            last_step = state.step == plan.total_steps
            logging = state.step % config.logging_steps == 0 or last_step
            evaluating = self.eval_loader is not None and (
                (config.eval_steps and state.step % config.eval_steps == 0) or last_step)
            saving = bool(config.save_steps and state.step % config.save_steps == 0)
            interrupted = self.interrupt.requested(self.accelerator)
            if logging or evaluating or saving or interrupted:
                # Read the steps since the last read (one host sync); a non-finite one stops
                # the run here, before anything is written.
                if (step_loss := self._settle(window)) is not None:
                    progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
            if logging and window.stats:
                window.tokens = self.accelerator.reduce(window.tokens, "sum")
                last_train = {"step": state.step,
                              "epoch": state.micro_batches_seen / self.stream.batches_per_epoch,
                              "split": "train", **window.metrics(), "learning_rate": lr}
                self._log(last_train)
                window = MetricWindow()
            if evaluating:
                last_eval = {"step": state.step, "split": "eval", **self.evaluate()}
                self._log(last_eval)
            if saving:
                checkpoint.save_checkpoint(config.output_dir, self.accelerator, self.model,
                                           self.optimizer, state, config.save_total_limit)
            if interrupted:
                progress.close()
                checkpoint_and_stop(config, self.accelerator, self.model, self.optimizer, state,
                                    plan.total_steps, saved_now=saving)
        progress.close()
        self.interrupt.release()
        if warning := self.gradients.warning():
            logger.warning(warning)
        metrics = {
            "train": {k: v for k, v in last_train.items() if k != "split"},
            "eval": {k: v for k, v in last_eval.items() if k != "split"},
            "steps": state.step,
            "num_processes": plan.num_processes,
            "distributed_type": plan.distributed_type,
            "fsdp_version": plan.fsdp_version,
            "train_pairs": len(self.train_pairs),
            "eval_pairs": len(self.eval_pairs),
            "train_runtime_s": time.perf_counter() - started,
            "reference_pass_s": self.reference_pass_s,
        }
        return self._finish(metrics)

    def _optimizer_step(self, batches: Iterator[dict[str, torch.Tensor]], lr: float,
                        window: MetricWindow) -> None:
        """One optimizer step at `lr` over the next `gradient_accumulation_steps`
        micro-batches; their per-pair stats go into `window`, the step's mean loss (over every
        process's pairs) and gradient norm into `window.pending`, on the device.

        By default the update is applied without the host reading anything, and `_settle`
        judges the step later. With --skip_nonfinite_steps (skipping needs the decision now)
        or fp16 loss scaling the step is read at once: a non-finite loss or gradient skips the
        update while --skip_nonfinite_steps allows, else raises NonFiniteError."""
        config, state, accelerator = self.config, self.state, self.accelerator
        accumulation = config.gradient_accumulation_steps
        micro_batches = [next(batches) for _ in range(accumulation)]
        state.micro_batches_seen += accumulation
        # Sum of per-pair losses over the step's pairs: the gradient equals that of one batch
        # holding all of them, even when the last micro-batch is smaller.
        pairs_in_step = sum(len(b["chosen_input_ids"]) for b in micro_batches)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        step_losses = []
        for i, batch in enumerate(micro_batches):
            last_micro = i == accumulation - 1
            with nullcontext() if last_micro else accelerator.no_sync(self.model):
                stats = self.objective(self.model, batch)
                accelerator.backward(stats["losses"].sum() / pairs_in_step)
            gathered = accelerator.gather({k: v.detach() for k, v in stats.items()})
            window.stats.append(gathered)
            step_losses.append(gathered["losses"])
            tokens = batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum()
            window.tokens = window.tokens + tokens  # this process's; summed when logged
        grad_norm = distributed.whole_tensor(accelerator.clip_grad_norm_(
            self.model.parameters(), config.max_grad_norm or float("inf")))
        mean_loss = torch.cat(step_losses).mean().float()
        record = torch.stack([mean_loss, torch.as_tensor(grad_norm, dtype=torch.float32,
                                                         device=mean_loss.device)])
        window.pending.append((state.step + 1, record))
        # Whether to apply the update needs the loss and the norm now only when skipping.
        read_now = config.skip_nonfinite_steps or accelerator.scaler is not None
        values = record.tolist() if read_now else None
        if values is not None and not self._finite(*values):
            if state.nonfinite_steps_skipped >= config.skip_nonfinite_steps:
                raise failures.nonfinite_error(state.step + 1, *values, config.output_dir)
            state.nonfinite_steps_skipped += 1
            del window.stats[-accumulation:]
            window.pending.pop()
            logger.warning(f"step {state.step + 1}: non-finite loss or gradient, update skipped "
                           f"({state.nonfinite_steps_skipped}/{config.skip_nonfinite_steps}).")
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1

    def _finite(self, loss: float, grad_norm: float) -> bool:
        """Under fp16 loss scaling an inf gradient is the scaler's business: it skips the
        step itself."""
        return math.isfinite(loss) and (math.isfinite(grad_norm)
                                        or self.accelerator.scaler is not None)

    def _settle(self, window: MetricWindow) -> float | None:
        """Read the pending steps' loss and gradient norm in one host sync: a non-finite one
        raises NonFiniteError naming that step (nothing has been written since it), the
        others' norms join the window. Returns the newest step's loss, or None if none was
        pending."""
        if not window.pending:
            return None
        values = torch.stack([record for _, record in window.pending]).tolist()
        for (step, _), (loss, grad_norm) in zip(window.pending, values, strict=True):
            if not self._finite(loss, grad_norm):
                raise failures.nonfinite_error(step, loss, grad_norm, self.config.output_dir)
            window.grad_norms.append(grad_norm)
            self.gradients.observe(grad_norm)
        window.pending.clear()
        return values[-1][0]

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Preference metrics over every eval pair exactly once (duplicates from padding to
        equal batches across processes are dropped by gather_for_metrics)."""
        gathered = []
        with eval_mode(self.model):
            for batch in self.eval_loader:
                stats = self.objective(self.model, batch)
                gathered.append(self.accelerator.gather_for_metrics(
                    {k: v.detach() for k, v in stats.items()}))
        return merged_metrics(gathered)

    def _log(self, record: dict) -> None:
        """One record to train_log.jsonl, the console and the trackers."""
        if self.is_main:
            run_files.append_log(self.config.output_dir, record)
            self.accelerator.log(report.tracker_values(record), step=record["step"])
        logger.info(format_record(record))

    def _before_and_after(self, model: torch.nn.Module, metrics: dict) -> None:
        """The evaluation hook's "before" and "after" and samples.md: the starting model does
        all its part inside one reference context (full fine-tuning reads it from disk once),
        then the trained `model` does its part."""
        hook, prompts = self.evaluation_hook, self.data.sample_prompts
        if hook is None and not prompts:
            return
        options = {"use_chat_template": self.plan.chat_template,
                   "max_new_tokens": self.config.sample_max_new_tokens}
        with torch.no_grad(), self.objective.reference(model) as before:
            if hook is not None:
                metrics["before"] = hook(before, self.tokenizer)
            if prompts:
                base = generate_replies(before, self.tokenizer, prompts, **options)
        if hook is not None:
            metrics["after"] = hook(model, self.tokenizer)
        if prompts:
            trained = generate_replies(model, self.tokenizer, prompts, **options)
            if self.is_main:
                report.write_samples(
                    os.path.join(self.config.output_dir, run_files.SAMPLES_FILE), prompts,
                    base, trained, **options)

    def _finish(self, metrics: dict) -> dict:
        """Before/after evaluation, then the adapter, tokenizer, metrics.json, curves and
        samples (and the merged model if asked) into output_dir; returns `metrics`."""
        config, accelerator = self.config, self.accelerator
        unwrapped = accelerator.unwrap_model(self.model)
        # With sharded weights every process takes part in each forward pass, so every
        # process evaluates and generates (the same text); only the main process writes.
        generates = self.is_main or distributed.weights_are_sharded(accelerator)
        if generates:
            with distributed.root_weights_gathered(unwrapped):
                self._before_and_after(unwrapped, metrics)
        accelerator.wait_for_everyone()
        checkpoint.save_trained_weights(accelerator, self.model, config.output_dir)
        if self.is_main:
            self.tokenizer.save_pretrained(config.output_dir)
            if config.merge_adapter:
                metrics["merged_model"] = save_merged_model(config, config.output_dir,
                                                            self.dtype, self.tokenizer)
            run_files.write_json(config.output_dir, run_files.METRICS_FILE, metrics)
            report.write_training_curves(config.output_dir)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return metrics
