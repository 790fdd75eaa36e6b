"""Every training setting in one dataclass, and the command line built from it.

`TrainConfig` is the single source of truth: `train.py --help`, the defaults, validation
and `training_config.json` all come from its fields. Flag names and defaults follow the
original project (docs/configuration.md) so its users' command lines keep working.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import ClassVar

from dpo_core.config.fields import (
    CHAT_TEMPLATE_MODES,
    DTYPE_NAMES,
    QUANTIZATION_MODES,
    TRACKERS,
    check_finite,
    check_writable_dir,
)
from dpo_core.errors import ConfigError
from dpo_core.losses.options import LOSS, LossSettings, validate_loss_options
from dpo_core.paths import looks_like_local_path
from dpo_core.setting import setting

# The --help groups, in order.
MODEL, LORA, DATA, TRAIN = "model", "LoRA", "data", "optimisation"
SPEED, LOG = "speed and memory", "logging, evaluation and checkpoints"


@dataclass
class TrainConfig(LossSettings):
    """Every training setting. The loss options are inherited from `LossSettings` (declared
    there, once); the rest are declared here, grouped as `--help` shows them."""

    HELP_GROUPS: ClassVar[tuple[str, ...]] = (MODEL, LORA, DATA, TRAIN, LOSS, SPEED, LOG)

    # -- model ------------------------------------------------------------------------------
    model_name: str = setting(
        "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "Hub id or local directory of the base model.", MODEL
    )
    adapter_path: str | None = setting(
        None,
        "Start from this trained LoRA adapter of --model_name (a local directory or Hub id, "
        "e.g. an SFT adapter): the policy trains it, and the reference is the adapter as "
        "loaded, frozen, on the same base. Its own rank, alpha and targets replace the --lora_* "
        "flags.",
        MODEL,
    )
    quantization: str = setting(
        "auto",
        "Base weights: 'auto' = 4-bit NF4 QLoRA when CUDA is present, none on CPU; '4bit' "
        "forces QLoRA (bitsandbytes also runs it on CPU); 'none' trains on full-precision weights.",
        MODEL,
        choices=QUANTIZATION_MODES,
    )
    no_quantization: bool = setting(False, "Same as --quantization none (original flag).", MODEL)
    dtype: str = setting(
        "auto",
        "Compute dtype: 'auto' = bfloat16 on GPUs that support it, float16 on older GPUs, "
        "float32 on CPU.",
        MODEL,
        choices=DTYPE_NAMES,
    )
    gradient_checkpointing: bool | None = setting(
        None,
        "Recompute activations in the backward pass: much less activation memory, slower "
        "(measured in benchmarks/RESULTS.md). Unset: on where CUDA is present, as in the "
        "original project (GPU memory is what limits a 1.1B model at 1024 tokens), off on "
        "CPU, where the faster exact setting wins.",
        MODEL,
    )
    attn_implementation: str = setting(
        "auto",
        "Attention kernel passed to transformers: 'auto' = sdpa where the model supports it, "
        "else eager (Gemma 2: SDPA cannot soft-cap attention); or sdpa, eager, "
        "flex_attention, flash_attention_2, ... (one the model refuses stops the run).",
        MODEL,
    )
    trust_remote_code: bool = setting(
        False, "Run modelling code shipped with the model repository (off unless asked).", MODEL
    )
    disable_dropout: bool = setting(
        True,
        "Zero every dropout (LoRA's included) so the policy and reference passes see the same "
        "network, as the original DPO code does.",
        MODEL,
    )
    # -- LoRA -------------------------------------------------------------------------------
    finetuning_type: str = setting(
        "lora",
        "'lora' trains an adapter (fresh, or --adapter_path); 'full' trains every weight, with "
        "fp32 master weights, and saves the whole model (no 4-bit: see docs/sft-to-dpo.md).",
        LORA,
        choices=["lora", "full"],
    )
    lora_r: int = setting(16, "LoRA rank.", LORA)
    lora_alpha: int = setting(32, "LoRA scaling numerator (scale = alpha / r).", LORA)
    lora_dropout: float = setting(0.05, "LoRA dropout (inactive while --disable_dropout).", LORA)
    lora_target_modules: str = setting(
        "auto",
        "Comma-separated module names to adapt, or 'all-linear', or 'auto' = "
        "q_proj,k_proj,v_proj,o_proj where the model has all four, else peft's targets for "
        "the model type (GPT-2: c_attn; GPT-NeoX: query_key_value; Phi-2: q_proj,v_proj,fc1,"
        "fc2), else all linear layers. The run plan says what was adapted.",
        LORA,
    )
    # -- data -------------------------------------------------------------------------------
    dataset_name: str = setting(
        "argilla/ultrafeedback-binarized-preferences-cleaned",
        "Hub dataset id, a local .json/.jsonl/.csv/.parquet file, or a save_to_disk directory.",
        DATA,
    )
    dataset_split: str = setting("train", "Split of --dataset_name to read.", DATA)
    eval_dataset: str | None = setting(
        None,
        "Separate evaluation data (same formats). Without it, --eval_fraction of the sampled "
        "rows is held out.",
        DATA,
    )
    num_samples: int = setting(
        500, "Rows to use after a seeded shuffle (0 = all rows).", DATA
    )
    eval_fraction: float = setting(
        0.1, "Fraction of the sampled rows held out for evaluation.", DATA)
    seed: int = setting(42, "Seed for shuffling, the eval split, LoRA init and data order.", DATA)
    max_length: int = setting(1024, "Longest prompt + response, in tokens.", DATA)
    max_prompt_length: int = setting(
        512, "Prompt tokens a pair keeps at least when it must be cut to --max_length (a prompt "
        "loses only the leading tokens that must go).", DATA
    )
    chat_template: str = setting(
        "auto",
        "'auto' renders prompt and replies with the tokenizer's chat template when it has one "
        "(and trains its end-of-turn token); 'none' uses plain text.",
        DATA,
        choices=CHAT_TEMPLATE_MODES,
    )
    skip_bad_rows: bool = setting(
        False, "Drop malformed rows (and print how many and why) instead of stopping.", DATA
    )
    tokenized_cache: bool = setting(
        True,
        "Save the token ids of the data under --tokenized_cache_dir, keyed by everything that "
        "changes them (data, tokenizer, chat template, lengths, sampling, split), and reuse "
        "them: a rerun, a resume or another experiment on the same data starts without "
        "tokenizing. --no-tokenized_cache tokenizes every run, in memory.",
        DATA,
    )
    tokenized_cache_dir: str | None = setting(
        None,
        "Directory of the tokenized cache (default: dpo_tokenized under the Hugging Face "
        "datasets cache, HF_DATASETS_CACHE).",
        DATA,
    )
    tokenize_num_proc: int = setting(
        0,
        "Processes that tokenize the data (0 = one per CPU core, fewer for small datasets; "
        "1 = the training process alone).",
        DATA,
    )
    streaming: bool = setting(
        False,
        "Read --dataset_name as a stream, for data that does not fit in memory: rows are read, "
        "shuffled in a seeded buffer (--shuffle_buffer_size) and tokenized on the fly by a "
        "background worker. Needs --max_steps; evaluation uses --eval_dataset only.",
        DATA,
    )
    shuffle_buffer_size: int = setting(
        10000, "Rows in the seeded shuffle buffer of --streaming.", DATA
    )
    # -- optimisation -----------------------------------------------------------------------
    epochs: float = setting(1, "Passes over the training pairs (fractions allowed).", TRAIN)
    max_steps: int = setting(0, "Stop after this many optimizer steps (0 = use --epochs).", TRAIN)
    batch_size: int = setting(2, "Pairs per device per micro-batch.", TRAIN)
    eval_batch_size: int = setting(0, "Pairs per device for evaluation (0 = --batch_size).", TRAIN)
    gradient_accumulation_steps: int = setting(4, "Micro-batches per optimizer step.", TRAIN)
    learning_rate: float = setting(5e-5, "Peak AdamW learning rate.", TRAIN)
    weight_decay: float = setting(0.0, "AdamW weight decay.", TRAIN)
    max_grad_norm: float = setting(1.0, "Clip the gradient norm to this (0 = no clipping).", TRAIN)
    lr_scheduler: str = setting(
        "cosine", "Decay after warmup.", TRAIN, choices=["cosine", "linear", "constant"]
    )
    warmup_steps: int = setting(
        100,
        "Linear warmup steps; capped at 10%% of the run when the run is shorter than this.",
        TRAIN,
    )
    warmup_ratio: float | None = setting(
        None, "Warmup as a fraction of the run (overrides --warmup_steps).", TRAIN
    )
    skip_nonfinite_steps: int = setting(
        0,
        "Skip up to N optimizer steps whose loss or gradient is NaN/inf (no update) before "
        "stopping; 0 = stop at the first one.",
        TRAIN,
    )
    # -- loss (and, inherited from LossSettings, every loss option) ----------------------
    reference_free: bool = setting(
        False, "Use a uniform reference (log-prob 0) instead of the base model.", LOSS
    )
    router_aux_loss_coef: float | None = setting(
        None,
        "Mixture-of-experts models (Mixtral, Qwen2-MoE, ...): weight of the router's "
        "load-balancing loss added to each pair's loss, as trl adds it, logged as loss/aux. "
        "Unset: the model config's router_aux_loss_coef; 0 = off. Dense models have none.",
        LOSS,
    )
    sync_ref_model: bool = setting(
        False,
        "TR-DPO (arXiv 2404.09656), trl's name: move the reference toward the policy after "
        "every --ref_model_sync_steps optimizer steps, weight by weight: reference = alpha * "
        "policy + (1 - alpha) * reference. With LoRA/QLoRA the reference is a second adapter "
        "(one adapter's memory), with --finetuning_type full a frozen copy of the model. Not "
        "with precomputed reference log-probs (they would go stale).",
        LOSS,
    )
    ref_model_mixup_alpha: float = setting(
        0.6, "alpha of --sync_ref_model, in (0, 1] (1 = copy the policy), trl's default.", LOSS
    )
    ref_model_sync_steps: int = setting(
        512, "Optimizer steps between two moves of the --sync_ref_model reference (TR-DPO's "
        "tau), trl's default.", LOSS
    )
    # -- speed and memory -------------------------------------------------------------------
    prefix_sharing: bool | None = setting(
        None,
        "Encode each prompt once: chosen and rejected share one row with a 4D attention mask "
        "(same log-probs, fewer tokens; needs --attn_implementation sdpa or eager). Unset "
        "(None): always in padding-free rows (it only saves tokens there); in padded rows, per "
        "batch, where it saves enough tokens to pay for the longer rows' attention "
        "(forward.prefix_sharing.PREFIX_SHARING_MIN_SAVING; measured in benchmarks/RESULTS.md).",
        SPEED,
    )
    padding_free: bool | None = setting(
        None,
        "Lay each micro-batch out as one row of real tokens (no padding), each sequence "
        "attending only to itself; same pairs per step and same log-probs. Unset (None): on "
        "where the attention allows it (sdpa: per-sequence SDPA; flex_attention on CUDA); on "
        "with eager uses one dense mask.",
        SPEED,
    )
    precompute_ref_log_probs: bool | None = setting(
        None,
        "Compute the reference log-probs of all pairs in one no-grad pass before training, "
        "cache them on disk (keyed by model, weights and data) and reuse them every epoch, "
        "evaluation and restart. Unset (None): on when the loss uses a reference and the run "
        "trains on every pair at least once (else the pass would cost extra).",
        SPEED,
    )
    ref_batch_size: int = setting(
        0, "Pairs per batch of the reference pass (0 = 4 x --batch_size); trl calls it "
        "precompute_ref_batch_size.", SPEED, aliases=("precompute_ref_batch_size",)
    )
    ref_cache_dir: str | None = setting(
        None,
        "Directory of the reference log-prob cache (default: output_dir/reference_logps); "
        "point runs on the same model and data at one directory to share it.",
        SPEED,
    )
    group_by_length: bool = setting(
        False,
        "Batch pairs of similar length together (within windows of 50 batches, batch order "
        "shuffled) to cut padding; deterministic for --seed, so resuming stays exact.",
        SPEED,
    )
    pad_to_multiple_of: int | None = setting(
        None,
        "Pad each batch's rows to a multiple of this many tokens (trl's name), e.g. for "
        "tensor-core shapes or a compiler that compiles once per shape. Padding-free rows grow "
        "by one padding block that attends only to itself; prefix-shared rows built per batch "
        "keep their width. The log-probs do not change. Unset: no rounding.",
        SPEED,
    )
    activation_offloading: bool = setting(
        False,
        "Keep the tensors the policy forward saves for its backward pass in (pinned) host "
        "memory instead of on the accelerator, copied back when the backward pass needs them "
        "(trl's name). Less accelerator memory, two copies of each; same numbers. On the CPU "
        "activations are in host memory already: nothing moves.",
        SPEED,
    )
    reuse_host_memory: bool = setting(
        True,
        "Training on the CPU with glibc: keep freed memory in the heap for the next step "
        "instead of returning it to the kernel and faulting it back in (same numbers, less "
        "kernel time; see dpo_core/training/host_memory.py). Process-wide.",
        SPEED,
    )
    # -- logging, evaluation, checkpoints ---------------------------------------------------
    output_dir: str = setting(
        "dpo_tinyllama_model", "Where the adapter, logs and checkpoints go.", LOG
    )
    overwrite_output_dir: bool = setting(
        False, "Allow writing into an output_dir that already holds a finished run.", LOG
    )
    logging_steps: int = setting(10, "Log metrics every N optimizer steps.", LOG)
    eval_steps: int = setting(50, "Evaluate every N optimizer steps (0 = only at the end).", LOG)
    save_steps: int = setting(100, "Save a resumable checkpoint every N steps (0 = never).", LOG)
    save_total_limit: int = setting(2, "Keep only the newest N checkpoints (0 = keep all).", LOG)
    save_on_interrupt: bool = setting(
        True,
        "On Ctrl-C, finish the current step, save a checkpoint and print how to resume "
        "(a second Ctrl-C stops at once).",
        LOG,
    )
    resume_from_checkpoint: str | None = setting(
        None, "A checkpoint directory, or 'latest' for the newest in --output_dir.", LOG
    )
    merge_adapter: bool = setting(
        False, "Also write the base model with the adapter merged in (output_dir/merged).", LOG
    )
    report_to: str = setting(
        "none",
        "Also send the train/ and eval/ metrics to an experiment tracker through Accelerate "
        "(install it with pip install 'dpo-core[tensorboard]' or 'dpo-core[wandb]').",
        LOG,
        choices=TRACKERS,
    )
    num_sample_prompts: int = setting(
        4,
        "Eval prompts whose greedy replies, base model vs trained model, go to samples.md "
        "(0 = no samples).",
        LOG,
    )
    sample_max_new_tokens: int = setting(128, "Longest reply in samples.md, in tokens.", LOG)
    demo: bool = setting(
        False,
        "Offline demo: the bundled tiny model and arithmetic preference data, tuned settings, "
        "a before/after table. Flags given explicitly still win.",
        LOG,
    )
    debug: bool = setting(
        False, "Show the full traceback of an error (also DPO_DEBUG=1).", LOG
    )

    def __post_init__(self) -> None:
        # Unlike a bare LossSettings, nothing is checked here: `validate` checks every setting,
        # the loss options among them, once the command line and config file are read.
        if self.no_quantization:
            self.quantization = "none"

    # -- derived values -------------------------------------------------------------------
    @property
    def target_modules(self) -> str | list[str]:
        """'auto', 'all-linear' or the module names of --lora_target_modules."""
        if self.lora_target_modules in ("auto", "all-linear"):
            return self.lora_target_modules
        return [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]

    def warmup_for(self, total_steps: int) -> int:
        """Warmup steps for a run of `total_steps`; never the whole run (the original's bug)."""
        if self.warmup_ratio is not None:
            warmup = math.ceil(self.warmup_ratio * total_steps)
        else:
            warmup = self.warmup_steps
        if warmup >= total_steps:
            warmup = total_steps // 10
        return warmup

    def validate(self) -> None:
        """Raise ConfigError naming the flag for settings that cannot work."""
        check_finite(self)
        checks = [
            (self.beta > 0, "--beta must be > 0"),
            (self.batch_size >= 1, "--batch_size must be >= 1"),
            (self.eval_batch_size >= 0, "--eval_batch_size must be >= 0"),
            (self.gradient_accumulation_steps >= 1, "--gradient_accumulation_steps must be >= 1"),
            (self.learning_rate > 0, "--learning_rate must be > 0"),
            (self.epochs > 0 or self.max_steps > 0, "--epochs or --max_steps must be > 0"),
            (self.max_steps >= 0, "--max_steps must be >= 0"),
            (self.num_samples >= 0, "--num_samples must be >= 0 (0 = all rows)"),
            (0 <= self.eval_fraction < 1, "--eval_fraction must be in [0, 1)"),
            (self.max_length >= 2, "--max_length must be >= 2"),
            (
                0 < self.max_prompt_length < self.max_length,
                f"--max_prompt_length ({self.max_prompt_length}) must be > 0 and smaller than "
                f"--max_length ({self.max_length}), or no response token would fit",
            ),
            (self.lora_r >= 1, "--lora_r must be >= 1"),
            (self.lora_alpha >= 1, "--lora_alpha must be >= 1 (0 would scale the adapter to "
             "nothing: zero gradient)"),
            (self.weight_decay >= 0, "--weight_decay must be >= 0"),
            (0 <= self.lora_dropout < 1, "--lora_dropout must be in [0, 1)"),
            (bool(self.target_modules), "--lora_target_modules names no module"),
            (self.max_grad_norm >= 0, "--max_grad_norm must be >= 0"),
            (self.logging_steps >= 1, "--logging_steps must be >= 1"),
            (self.eval_steps >= 0, "--eval_steps must be >= 0"),
            (self.save_steps >= 0, "--save_steps must be >= 0"),
            (self.save_total_limit >= 0, "--save_total_limit must be >= 0"),
            (self.num_sample_prompts >= 0, "--num_sample_prompts must be >= 0"),
            (self.sample_max_new_tokens >= 1, "--sample_max_new_tokens must be >= 1"),
            (self.warmup_steps >= 0, "--warmup_steps must be >= 0"),
            (self.skip_nonfinite_steps >= 0, "--skip_nonfinite_steps must be >= 0"),
            (self.ref_batch_size >= 0, "--ref_batch_size must be >= 0"),
            (self.router_aux_loss_coef is None or self.router_aux_loss_coef >= 0,
             "--router_aux_loss_coef must be >= 0 (0 = off)"),
            (self.tokenize_num_proc >= 0, "--tokenize_num_proc must be >= 0 (0 = one per core)"),
            (self.shuffle_buffer_size >= 1, "--shuffle_buffer_size must be >= 1"),
            (self.pad_to_multiple_of is None or self.pad_to_multiple_of >= 1,
             "--pad_to_multiple_of must be >= 1 (unset: no rounding)"),
            (0 < self.ref_model_mixup_alpha <= 1,
             "--ref_model_mixup_alpha must be in (0, 1] (0 would never move the reference)"),
            (self.ref_model_sync_steps >= 1, "--ref_model_sync_steps must be >= 1"),
            (
                self.warmup_ratio is None or 0 <= self.warmup_ratio < 1,
                "--warmup_ratio must be in [0, 1)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self._validate_finetuning_type()
        self._validate_streaming()
        self._validate_sync_ref_model()
        self.check_loss_options()
        validate_loss_options(self, reference_free=self.reference_free,
                              precompute_ref_log_probs=bool(self.precompute_ref_log_probs))
        for flag in ("model_name", "adapter_path", "dataset_name", "eval_dataset"):
            value = getattr(self, flag)
            if value and looks_like_local_path(value) and not os.path.exists(value):
                raise ConfigError(f"--{flag}: path {value!r} does not exist")
        check_writable_dir("--output_dir", self.output_dir)

    def _validate_streaming(self) -> None:
        if not self.streaming:
            return
        if not self.max_steps:
            raise ConfigError("--streaming needs --max_steps: how many pairs a stream holds is "
                              "only known once it has been read (an epoch is one pass).")
        if self.precompute_ref_log_probs:
            raise ConfigError(
                "--precompute_ref_log_probs needs every pair before training starts, and "
                "--streaming reads pairs only as training uses them: drop one of the two "
                "(with --streaming the reference runs on each batch).")
        if self.group_by_length:
            raise ConfigError("--group_by_length sorts all pairs by length before each epoch, "
                              "which a stream cannot: drop one of the two.")

    def _validate_sync_ref_model(self) -> None:
        if not self.sync_ref_model:
            return
        if self.reference_free or not self.needs_reference:
            raise ConfigError(
                "--sync_ref_model moves the reference model, and this run uses none "
                f"({'--reference_free' if self.reference_free else '--loss_type ' + self.loss_type}"
                "): drop --sync_ref_model")
        if self.precompute_ref_log_probs:
            raise ConfigError(
                "--sync_ref_model moves the reference during training, so reference log-probs "
                "computed before it would go stale: drop --precompute_ref_log_probs (with "
                "--sync_ref_model the reference pass runs with each step)")

    def _validate_finetuning_type(self) -> None:
        if self.finetuning_type != "full":
            return
        if self.quantization == "4bit":
            raise ConfigError(
                "--finetuning_type full cannot train 4-bit weights: NF4 weights are frozen "
                "integer codes with no gradient or optimizer state (QLoRA trains an adapter "
                "beside them). Use --quantization none, or --finetuning_type lora for 4-bit.")
        if self.adapter_path:
            raise ConfigError(
                "--adapter_path trains a LoRA adapter; for --finetuning_type full, merge the "
                "adapter into its base first (PeftModel.merge_and_unload) and pass the merged "
                "model as --model_name.")
        if self.merge_adapter:
            raise ConfigError("--merge_adapter merges a LoRA adapter; --finetuning_type full "
                              "already saves the whole model to --output_dir.")

