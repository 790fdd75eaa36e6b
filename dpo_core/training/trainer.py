"""The DPO training loop on Accelerate.

`Trainer.setup` builds the run in dependency order, one plain step each
(`dpo_core.training.setup`: device -> model -> model fit -> tokenizer -> forward -> objective
-> data -> backend -> reference -> batches -> schedule -> state), once the run has claimed its
output_dir (`run_claim`: one run per directory, all processes agreeing), and collects what
every "auto" setting resolved to in the run plan. `Trainer.train` then takes optimizer steps,
each over `gradient_accumulation_steps` micro-batches from a seeded, epoch-by-epoch shuffled
stream, so the step number alone says where in the data a run is: that is what makes resuming
exact.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterator

import torch
from tqdm.auto import tqdm

from dpo_core import run_files
from dpo_core.config.train import TrainConfig
from dpo_core.console import configure_console, logger
from dpo_core.errors import DeviceMemoryError
from dpo_core.forward.logps import TokenLogpsFn
from dpo_core.modeling import backends
from dpo_core.modeling.adapters import save_merged_model
from dpo_core.modeling.generation import generate_replies
from dpo_core.reporting import curves, samples, trackers
from dpo_core.run_lock import RunLock
from dpo_core.training import checkpoint
from dpo_core.training import setup as steps
from dpo_core.training.metrics import MetricWindow, ZeroGradientWatch, format_record, merged_metrics
from dpo_core.training.objective import PreferenceObjective, evaluate_pairs
from dpo_core.training.run_claim import claim_output_dir
from dpo_core.training.schedule import get_lr
from dpo_core.training.stops import (
    StopOnInterrupt,
    checkpoint_and_stop,
    nonfinite_error,
    out_of_memory_message,
)

# An extra evaluation run after training on the reference (the model training started from)
# and on the trained model: hook(model, tokenizer) -> {"metric": value}. The demo's
# before/after table uses it.
EvaluationHook = Callable[[torch.nn.Module, object], dict]
# (config, the forward's log-prob function) -> the objective a run trains on.
ObjectiveFactory = Callable[[TrainConfig, TokenLogpsFn], PreferenceObjective]


def train(config: TrainConfig, evaluation_hook: EvaluationHook | None = None,
          make_objective: ObjectiveFactory = PreferenceObjective.from_config) -> dict:
    """Train a LoRA adapter (or every weight) with DPO as `config` says; return the final
    metrics. `make_objective` builds what each micro-batch is trained on (a subclass of
    `PreferenceObjective` changes the loss or watches the steps)."""
    trainer = Trainer(config, evaluation_hook, make_objective)
    try:
        with run_files.removed_if_left_empty(config.output_dir):
            try:
                trainer.setup()
            except BaseException:
                trainer.release_output_dir()  # first: the lock alone is no reason to keep it
                raise
        with trainer.interrupt:  # Ctrl-C stops at the next step boundary
            return trainer.train()
    finally:
        trainer.release_output_dir()


class Trainer:
    """One run: `setup()` then `train()`. Attributes are set by the setup steps, in order."""

    def __init__(self, config: TrainConfig, evaluation_hook: EvaluationHook | None = None,
                 make_objective: ObjectiveFactory = PreferenceObjective.from_config):
        self.config, self.evaluation_hook = config, evaluation_hook
        self.make_objective = make_objective
        self.interrupt = StopOnInterrupt()
        self.gradients = ZeroGradientWatch()
        self.lock: RunLock | None = None  # output_dir's, held by the main process

    def release_output_dir(self) -> None:
        """Let another run use output_dir (the run ends, however it ends)."""
        if self.lock is not None:
            self.lock.release()

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

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
        self.device = steps.setup_device(config)
        self.accelerator = self.device.accelerator
        self.lock = claim_output_dir(config, self.accelerator)
        model = steps.setup_model(config, self.device)
        # From here on the run's settings are the asked ones fitted to the model (--max_length
        # to its positions, ...); training_config.json keeps what was asked.
        asked, fit = config, steps.setup_model_fit(config, model)
        self.config = config = fit.config
        self.tokenizer, self.use_chat_template = steps.setup_tokenizer(config)
        self.forward = steps.setup_forward(config, model)
        self.objective = self.make_objective(config, self.forward.token_logps)
        self.data = steps.setup_data(config, self.device, self.tokenizer, self.use_chat_template)
        self.model, self.optimizer = steps.setup_backend(config, self.device, model)
        collator = self.forward.collator(self.tokenizer.pad_token_id, config.pad_to_multiple_of)
        self.reference = steps.setup_reference(config, self.device, self.model, self.objective,
                                               self.forward, self.data, collator)
        self.batches = steps.setup_batches(config, self.device, self.forward, self.data,
                                           self.reference, collator)
        self.schedule = steps.setup_schedule(config, self.batches)
        self.state = steps.setup_state(config, self.device, self.model, self.optimizer,
                                       self.reference, self.data.num_train, resume_path)
        self.plan = steps.run_plan(self.device, fit, self.use_chat_template, self.forward,
                                   self.data, self.reference, self.batches, self.schedule)
        logger.info(self.plan.describe(asked))
        if self.is_main:
            run_files.write_json(config.output_dir, run_files.CONFIG_FILE, {
                **dataclasses.asdict(asked), run_files.RUN_PLAN_KEY: self.plan.record()})
        # Started once setup has succeeded, so a bad model or data path leaves no empty run.
        trackers.start_trackers(self.accelerator, asked, self.plan.record())
        self.model.train()

    # -- the loop ---------------------------------------------------------------------------
    def train(self) -> dict:
        """Optimizer steps to the end of the plan, logging, evaluating and checkpointing on
        schedule; then `_finish`. Returns the final metrics."""
        config, state, schedule = self.config, self.state, self.schedule
        window = MetricWindow()
        batches = self.batches.stream.resume(state)
        progress = tqdm(total=self.schedule.total_steps, initial=state.step, desc="DPO",
                        disable=not self.is_main, dynamic_ncols=True)
        last_train, last_eval = {}, {}
        started = time.perf_counter()
        while state.step < schedule.total_steps:
            lr = get_lr(state.step, peak_lr=config.learning_rate,
                        warmup_steps=schedule.warmup_steps, total_steps=schedule.total_steps,
                        kind=config.lr_scheduler)
            try:
                self._optimizer_step(batches, lr, window)
            except torch.OutOfMemoryError as error:
                raise DeviceMemoryError(out_of_memory_message(
                    config, state.step + 1, self.device.gradient_checkpointing)) from error
            progress.update(1)

            last_step = state.step == schedule.total_steps
            logging = state.step % config.logging_steps == 0 or last_step
            evaluating = self.batches.eval_loader is not None and (
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
                              "epoch": self.batches.stream.epoch(state),
                              "split": "train", **window.metrics(), "learning_rate": lr}
                self._log(last_train)
                window = MetricWindow()
            if evaluating:
                last_eval = {"step": state.step, "split": "eval", **self.evaluate()}
                self._log(last_eval)
            if saving:
                checkpoint.save_checkpoint(config.output_dir, self.accelerator, self.model,
                                           self.optimizer, state, config.save_total_limit,
                                           self.reference.sync)
            if interrupted:
                progress.close()
                checkpoint_and_stop(config, self.accelerator, self.model, self.optimizer, state,
                                    schedule.total_steps, saved_now=saving,
                                    reference=self.reference.sync)
        progress.close()
        self.interrupt.release()
        if warning := self.gradients.warning():
            logger.warning(warning)
        metrics = {
            "train": {k: v for k, v in last_train.items() if k != "split"},
            "eval": {k: v for k, v in last_eval.items() if k != "split"},
            "steps": state.step,
            "num_processes": self.plan.num_processes,
            "distributed_type": self.plan.distributed_type,
            "fsdp_version": self.plan.fsdp_version,
            "zero_stage": self.plan.zero_stage,
            "train_pairs": self.data.num_train,
            "eval_pairs": len(self.data.eval),
            "train_runtime_s": time.perf_counter() - started,
            "reference_pass_s": self.reference.seconds,
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
        update while --skip_nonfinite_steps allows, else raises NonFiniteError. A DeepSpeed
        engine clips and applies the update inside the last backward (`optimizer.step` is then
        a no-op) and `clip_grad_norm_` reads the norm it clipped by."""
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
            with backends.micro_batch(accelerator, self.model, last=i == accumulation - 1):
                stats = self.objective(self.model, batch, self.reference.context)
                backends.backward(accelerator, stats["losses"].sum() / pairs_in_step)
            gathered = accelerator.gather({k: v.detach() for k, v in stats.items()})
            window.stats.append(gathered)
            step_losses.append(gathered["losses"])
            tokens = batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum()
            window.tokens = window.tokens + tokens  # this process's; summed when logged
        grad_norm = backends.whole_tensor(accelerator.clip_grad_norm_(
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
                raise nonfinite_error(state.step + 1, *values, config.output_dir)
            state.nonfinite_steps_skipped += 1
            del window.stats[-accumulation:]
            window.pending.pop()
            logger.warning(f"step {state.step + 1}: non-finite loss or gradient, update skipped "
                           f"({state.nonfinite_steps_skipped}/{config.skip_nonfinite_steps}).")
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        if self.reference.sync and self.reference.sync.due(state.step):
            self.reference.sync()  # TR-DPO: the reference moves toward the updated policy

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
                raise nonfinite_error(step, loss, grad_norm, self.config.output_dir)
            window.grad_norms.append(grad_norm)
            self.gradients.observe(grad_norm)
        window.pending.clear()
        return values[-1][0]

    def evaluate(self) -> dict[str, float]:
        """Preference metrics over every eval pair exactly once (duplicates from padding to
        equal batches across processes are dropped by gather_for_metrics)."""
        return merged_metrics([evaluate_pairs(self.objective, self.model,
                                              self.batches.eval_loader, self.reference.context,
                                              self.accelerator)])

    def _log(self, record: dict) -> None:
        """One record to train_log.jsonl, the console and the trackers."""
        if self.is_main:
            run_files.append_log(self.config.output_dir, record)
            self.accelerator.log(trackers.tracker_values(record), step=record["step"])
        logger.info(format_record(record))

    def _before_and_after(self, model: torch.nn.Module, metrics: dict) -> None:
        """The evaluation hook's "before" and "after" and samples.md: the starting model does
        all its part inside one reference context (full fine-tuning reads it from disk once),
        then the trained `model` does its part."""
        hook, prompts = self.evaluation_hook, self.data.sample_prompts
        if hook is None and not prompts:
            return
        options = {"use_chat_template": self.use_chat_template,
                   "max_new_tokens": self.config.sample_max_new_tokens}
        with torch.no_grad(), self.reference.start(model) as before:
            if hook is not None:
                metrics["before"] = hook(before, self.tokenizer)
            if prompts:
                base = generate_replies(before, self.tokenizer, prompts, **options)
        if hook is not None:
            metrics["after"] = hook(model, self.tokenizer)
        if prompts:
            trained = generate_replies(model, self.tokenizer, prompts, **options)
            if self.is_main:
                samples.write_samples(
                    os.path.join(self.config.output_dir, run_files.SAMPLES_FILE), prompts,
                    base, trained, **options)

    def _finish(self, metrics: dict) -> dict:
        """Before/after evaluation, then the adapter, tokenizer, metrics.json, curves and
        samples (and the merged model if asked) into output_dir; returns `metrics`."""
        config, accelerator = self.config, self.accelerator
        unwrapped = accelerator.unwrap_model(self.model)
        # With sharded weights every process takes part in each forward pass, so every
        # process evaluates and generates (the same text); only the main process writes.
        generates = self.is_main or backends.weights_are_sharded(accelerator)
        if generates:
            with backends.root_weights_gathered(unwrapped):
                self._before_and_after(unwrapped, metrics)
        accelerator.wait_for_everyone()
        checkpoint.save_trained_weights(accelerator, self.model, config.output_dir)
        if self.is_main:
            self.tokenizer.save_pretrained(config.output_dir)
            if config.merge_adapter:
                metrics["merged_model"] = save_merged_model(config, config.output_dir,
                                                            self.device.dtype, self.tokenizer)
            run_files.write_json(config.output_dir, run_files.METRICS_FILE, metrics)
            curves.write_training_curves(config.output_dir)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return metrics
