"""Every training setting in one dataclass, and the command line built from it.

`TrainConfig` is the single source of truth: `train.py --help`, the defaults, validation
and `training_config.json` all come from its fields. Flag names and defaults follow the
original project (see README) so its users' command lines keep working.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dpo_core.errors import UserError


class ConfigError(UserError, ValueError):
    """A setting, or a combination of settings, that cannot work; the message says which."""


def _arg(default: Any, help: str, group: str, **argparse_kwargs: Any) -> Any:
    metadata = {"help": help, "group": group, "argparse": argparse_kwargs}
    return field(default=default, metadata=metadata)


MODEL, LORA, DATA, TRAIN, LOSS, LOG = (
    "model",
    "LoRA",
    "data",
    "optimisation",
    "loss",
    "logging, evaluation and checkpoints",
)
SPEED = "speed and memory"


# Choices shared by train.py, chat.py and the modules that act on them.
QUANTIZATION_MODES = ("auto", "4bit", "none")
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
CHAT_TEMPLATE_MODES = ("auto", "none")
TRACKERS = ("none", "tensorboard", "wandb")
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
NLL_NORMALIZATIONS = ("tokens", "pairs")


@dataclass
class TrainConfig:
    # -- model ------------------------------------------------------------------------------
    model_name: str = _arg(
        "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "Hub id or local directory of the base model.", MODEL
    )
    adapter_path: str | None = _arg(
        None,
        "Start from this trained LoRA adapter of --model_name (a local directory or Hub id, "
        "e.g. an SFT adapter): the policy trains it, and the reference is the adapter as "
        "loaded, frozen, on the same base. Its own rank, alpha and targets replace the --lora_* "
        "flags.",
        MODEL,
    )
    quantization: str = _arg(
        "auto",
        "Base weights: 'auto' = 4-bit NF4 QLoRA when CUDA is present, none on CPU; '4bit' "
        "forces QLoRA (bitsandbytes also runs it on CPU); 'none' trains on full-precision weights.",
        MODEL,
        choices=QUANTIZATION_MODES,
    )
    no_quantization: bool = _arg(False, "Same as --quantization none (original flag).", MODEL)
    dtype: str = _arg(
        "auto",
        "Compute dtype: 'auto' = bfloat16 on GPUs that support it, float16 on older GPUs, "
        "float32 on CPU.",
        MODEL,
        choices=DTYPE_NAMES,
    )
    gradient_checkpointing: bool | None = _arg(
        None,
        "Recompute activations in the backward pass: much less activation memory, slower "
        "(measured in benchmarks/RESULTS.md). Unset: on where CUDA is present, as in the "
        "original project (GPU memory is what limits a 1.1B model at 1024 tokens), off on "
        "CPU, where the faster exact setting wins.",
        MODEL,
    )
    attn_implementation: str = _arg(
        "sdpa", "Attention kernel passed to transformers (sdpa, eager, ...).", MODEL
    )
    trust_remote_code: bool = _arg(
        False, "Run modelling code shipped with the model repository (off unless asked).", MODEL
    )
    disable_dropout: bool = _arg(
        True,
        "Zero every dropout (LoRA's included) so the policy and reference passes see the same "
        "network, as the original DPO code does.",
        MODEL,
    )
    # -- LoRA -------------------------------------------------------------------------------
    finetuning_type: str = _arg(
        "lora",
        "'lora' trains an adapter (fresh, or --adapter_path); 'full' trains every weight, with "
        "fp32 master weights, and saves the whole model (no 4-bit: see README).",
        LORA,
        choices=["lora", "full"],
    )
    lora_r: int = _arg(16, "LoRA rank.", LORA)
    lora_alpha: int = _arg(32, "LoRA scaling numerator (scale = alpha / r).", LORA)
    lora_dropout: float = _arg(0.05, "LoRA dropout (inactive while --disable_dropout).", LORA)
    lora_target_modules: str = _arg(
        "q_proj,k_proj,v_proj,o_proj",
        "Comma-separated module names to adapt, or 'all-linear'.",
        LORA,
    )
    # -- data -------------------------------------------------------------------------------
    dataset_name: str = _arg(
        "argilla/ultrafeedback-binarized-preferences-cleaned",
        "Hub dataset id, a local .json/.jsonl/.csv/.parquet file, or a save_to_disk directory.",
        DATA,
    )
    dataset_split: str = _arg("train", "Split of --dataset_name to read.", DATA)
    eval_dataset: str | None = _arg(
        None,
        "Separate evaluation data (same formats). Without it, --eval_fraction of the sampled "
        "rows is held out.",
        DATA,
    )
    num_samples: int = _arg(
        500, "Rows to use after a seeded shuffle (0 = all rows).", DATA
    )
    eval_fraction: float = _arg(0.1, "Fraction of the sampled rows held out for evaluation.", DATA)
    seed: int = _arg(42, "Seed for shuffling, the eval split, LoRA init and data order.", DATA)
    max_length: int = _arg(1024, "Longest prompt + response, in tokens.", DATA)
    max_prompt_length: int = _arg(
        512, "Prompt tokens a pair keeps at least when it must be cut to --max_length (a prompt "
        "loses only the leading tokens that must go).", DATA
    )
    chat_template: str = _arg(
        "auto",
        "'auto' renders prompt and replies with the tokenizer's chat template when it has one "
        "(and trains its end-of-turn token); 'none' uses plain text.",
        DATA,
        choices=CHAT_TEMPLATE_MODES,
    )
    skip_bad_rows: bool = _arg(
        False, "Drop malformed rows (and print how many and why) instead of stopping.", DATA
    )
    # -- optimisation -----------------------------------------------------------------------
    epochs: float = _arg(1, "Passes over the training pairs (fractions allowed).", TRAIN)
    max_steps: int = _arg(0, "Stop after this many optimizer steps (0 = use --epochs).", TRAIN)
    batch_size: int = _arg(2, "Pairs per device per micro-batch.", TRAIN)
    eval_batch_size: int = _arg(0, "Pairs per device for evaluation (0 = --batch_size).", TRAIN)
    gradient_accumulation_steps: int = _arg(4, "Micro-batches per optimizer step.", TRAIN)
    learning_rate: float = _arg(5e-5, "Peak AdamW learning rate.", TRAIN)
    weight_decay: float = _arg(0.0, "AdamW weight decay.", TRAIN)
    max_grad_norm: float = _arg(1.0, "Clip the gradient norm to this (0 = no clipping).", TRAIN)
    lr_scheduler: str = _arg(
        "cosine", "Decay after warmup.", TRAIN, choices=["cosine", "linear", "constant"]
    )
    warmup_steps: int = _arg(
        100,
        "Linear warmup steps; capped at 10%% of the run when the run is shorter than this.",
        TRAIN,
    )
    warmup_ratio: float | None = _arg(
        None, "Warmup as a fraction of the run (overrides --warmup_steps).", TRAIN
    )
    skip_nonfinite_steps: int = _arg(
        0,
        "Skip up to N optimizer steps whose loss or gradient is NaN/inf (no update) before "
        "stopping; 0 = stop at the first one.",
        TRAIN,
    )
    # -- loss -------------------------------------------------------------------------------
    beta: float = _arg(0.1, "DPO temperature: strength of the KL pull toward the reference.", LOSS)
    loss_type: str = _arg(
        "sigmoid",
        "Preference loss, trl's names; several comma-separated make a weighted mixture "
        "(e.g. sigmoid,bco_pair,sft). With a reference: sigmoid (DPO; cDPO with "
        "--label_smoothing), robust, ipo, hinge, rpo (DPO + NLL of chosen), exo_pair, "
        "nca_pair, bco_pair, sppo_hard, aot, aot_unpaired (sorted within the micro-batch), "
        "apo_zero, apo_down, discopop, sigmoid_norm (length-normalised DPO). Without one: "
        "simpo, orpo, cpo, and sft (the NLL term alone). The README's metrics table gives each "
        "one's reward and step-1 value.",
        LOSS,
    )
    loss_weights: str | None = _arg(
        None,
        "Comma-separated weight per --loss_type, e.g. 0.8,0.2,1.0 (MPO); default all 1.",
        LOSS,
    )
    label_smoothing: float = _arg(
        0.0,
        "Assumed label-noise rate eps in [0, 0.5): conservative DPO (sigmoid, rpo, cpo; trl's "
        "sigmoid has none), robust DPO, aot, aot_unpaired; exo_pair's eps (needs > 0, paper: "
        "1e-3).",
        LOSS,
    )
    rpo_alpha: float = _arg(
        1.0, "Weight of the chosen-response NLL term for --loss_type rpo.", LOSS
    )
    simpo_gamma: float = _arg(
        0.5, "Target reward margin for --loss_type simpo (the paper's gamma, as trl's).", LOSS
    )
    discopop_tau: float = _arg(
        0.05, "Temperature of --loss_type discopop's blend (trl's and the paper's default).", LOSS
    )
    f_divergence_type: str = _arg(
        "reverse_kl",
        "f-DPO: the divergence from the reference (reverse_kl = DPO). Applies to sigmoid, "
        "sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, rpo, sft.",
        LOSS,
        choices=F_DIVERGENCE_TYPES,
    )
    f_alpha_divergence_coef: float = _arg(
        0.5, "alpha of --f_divergence_type alpha_divergence (1 = reverse_kl).", LOSS
    )
    nll_normalization: str = _arg(
        "tokens",
        "The NLL term of sft, rpo, cpo and orpo: 'tokens' averages over every chosen token of "
        "the micro-batch (trl); 'pairs' averages each pair's per-token NLL over the pairs.",
        LOSS,
        choices=NLL_NORMALIZATIONS,
    )
    orpo_alpha: float = _arg(
        0.1,
        "Weight lambda of ORPO's odds-ratio term (trl's ORPOConfig.beta); --loss_type orpo.",
        LOSS,
    )
    cpo_alpha: float = _arg(
        1.0, "Weight of CPO's NLL (behaviour cloning) term for --loss_type cpo, as trl.", LOSS
    )
    reference_free: bool = _arg(
        False, "Use a uniform reference (log-prob 0) instead of the base model.", LOSS
    )
    # -- speed and memory -------------------------------------------------------------------
    prefix_sharing: bool | None = _arg(
        None,
        "Encode each prompt once: chosen and rejected share one row with a 4D attention mask "
        "(same log-probs, fewer tokens; needs --attn_implementation sdpa or eager). Unset "
        "(None): per batch, where it saves enough tokens to pay for the longer rows' attention "
        "(logps.PREFIX_SHARING_MIN_SAVING; measured in benchmarks/RESULTS.md).",
        SPEED,
    )
    padding_free: bool | None = _arg(
        None,
        "Lay each micro-batch out as one row of real tokens (no padding), each sequence "
        "attending only to itself; same pairs per step and same log-probs. Unset (None): on "
        "where the attention allows it (sdpa: per-sequence SDPA; flex_attention on CUDA); on "
        "with eager uses one dense mask.",
        SPEED,
    )
    precompute_ref_log_probs: bool | None = _arg(
        None,
        "Compute the reference log-probs of all pairs in one no-grad pass before training, "
        "cache them on disk (keyed by model, weights and data) and reuse them every epoch, "
        "evaluation and restart. Unset (None): on when the loss uses a reference and the run "
        "trains on every pair at least once (else the pass would cost extra).",
        SPEED,
    )
    ref_batch_size: int = _arg(
        0, "Pairs per batch of the reference pass (0 = 4 x --batch_size).", SPEED
    )
    ref_cache_dir: str | None = _arg(
        None,
        "Directory of the reference log-prob cache (default: output_dir/reference_logps); "
        "point runs on the same model and data at one directory to share it.",
        SPEED,
    )
    group_by_length: bool = _arg(
        False,
        "Batch pairs of similar length together (within windows of 50 batches, batch order "
        "shuffled) to cut padding; deterministic for --seed, so resuming stays exact.",
        SPEED,
    )
    reuse_host_memory: bool = _arg(
        True,
        "Training on the CPU with glibc: keep freed memory in the heap for the next step "
        "instead of returning it to the kernel and faulting it back in (same numbers, less "
        "kernel time; see dpo_core/host_memory.py). Process-wide.",
        SPEED,
    )
    # -- logging, evaluation, checkpoints ---------------------------------------------------
    output_dir: str = _arg(
        "dpo_tinyllama_model", "Where the adapter, logs and checkpoints go.", LOG
    )
    overwrite_output_dir: bool = _arg(
        False, "Allow writing into an output_dir that already holds a finished run.", LOG
    )
    logging_steps: int = _arg(10, "Log metrics every N optimizer steps.", LOG)
    eval_steps: int = _arg(50, "Evaluate every N optimizer steps (0 = only at the end).", LOG)
    save_steps: int = _arg(100, "Save a resumable checkpoint every N steps (0 = never).", LOG)
    save_total_limit: int = _arg(2, "Keep only the newest N checkpoints (0 = keep all).", LOG)
    save_on_interrupt: bool = _arg(
        True,
        "On Ctrl-C, finish the current step, save a checkpoint and print how to resume "
        "(a second Ctrl-C stops at once).",
        LOG,
    )
    resume_from_checkpoint: str | None = _arg(
        None, "A checkpoint directory, or 'latest' for the newest in --output_dir.", LOG
    )
    merge_adapter: bool = _arg(
        False, "Also write the base model with the adapter merged in (output_dir/merged).", LOG
    )
    report_to: str = _arg(
        "none",
        "Also send the train/ and eval/ metrics to an experiment tracker through Accelerate "
        "(install it with pip install 'dpo-core[tensorboard]' or 'dpo-core[wandb]').",
        LOG,
        choices=TRACKERS,
    )
    num_sample_prompts: int = _arg(
        4,
        "Eval prompts whose greedy replies, base model vs trained model, go to samples.md "
        "(0 = no samples).",
        LOG,
    )
    sample_max_new_tokens: int = _arg(128, "Longest reply in samples.md, in tokens.", LOG)
    demo: bool = _arg(
        False,
        "Offline demo: the bundled tiny model and arithmetic preference data, tuned settings, "
        "a before/after table. Flags given explicitly still win.",
        LOG,
    )
    debug: bool = _arg(
        False, "Show the full traceback of an error (also DPO_DEBUG=1).", LOG
    )

    def __post_init__(self) -> None:
        if self.no_quantization:
            self.quantization = "none"

    # -- derived values -------------------------------------------------------------------
    @property
    def target_modules(self) -> str | list[str]:
        if self.lora_target_modules == "all-linear":
            return "all-linear"
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
        # imports torch: not needed for --help
        from dpo_core.loss import loss_settings_of, validate_loss_options

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
            (
                self.warmup_ratio is None or 0 <= self.warmup_ratio < 1,
                "--warmup_ratio must be in [0, 1)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self._validate_finetuning_type()
        try:  # the loss module's own checks, reported like every other bad setting
            validate_loss_options(
                loss_settings_of(self), reference_free=self.reference_free,
                precompute_ref_log_probs=bool(self.precompute_ref_log_probs))
        except ValueError as error:
            raise ConfigError(str(error)) from None
        for flag in ("model_name", "adapter_path", "dataset_name", "eval_dataset"):
            value = getattr(self, flag)
            if value and _looks_like_path(value) and not os.path.exists(value):
                raise ConfigError(f"--{flag}: path {value!r} does not exist")
        check_writable_dir("--output_dir", self.output_dir)

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

    def to_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(dataclasses.asdict(self), f, indent=2)


def check_finite(config: Any) -> None:
    """Every float setting of a config dataclass must be a finite number: argparse's float()
    takes 'nan' and 'inf', which no setting here can use."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{f.name} must be a finite number, got {value}")


def check_writable_dir(flag: str, path: str) -> None:
    """`path` is, or can be created as, a directory this process can write into."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{flag} {path!r} is a file, not a directory; choose another path")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"{flag} {path!r}: {existing!r} is a file, so no directory can be "
                          "made there; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path!r}: {existing!r} is not writable; choose a directory "
                          "you can write to")


def _looks_like_path(value: str) -> bool:
    """Local paths start with '.', '/' or '~', or name a data file; Hub ids are 'org/name'."""
    data_suffixes = (".json", ".jsonl", ".csv", ".parquet")
    return value.startswith((".", "/", "~")) or value.endswith(data_suffixes)


def build_parser(cls: type, description: str, epilog: str | None = None,
                 config_file: bool = False) -> argparse.ArgumentParser:
    """An argparse parser with one flag per dataclass field, grouped by the field's metadata,
    and with `config_file` a `--config PATH` flag for a YAML/JSON file of the same settings.

    Defaults are suppressed in the namespace so that `parse_config` can tell which flags the
    user gave (the config file and the demo preset only fill in the others); `--help` still
    shows them.
    """
    parser = argparse.ArgumentParser(
        description=description,
        epilog=epilog,
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if config_file:
        parser.add_argument(
            "--config", metavar="PATH",
            help="YAML or JSON file of settings, keyed by the flag names below without '--' "
                 "(a finished run's training_config.json works). Flags on the command line "
                 "override it.")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        kwargs = dict(meta["argparse"])
        help_text = f"{meta['help']} (default: {f.default})"
        if f.type in ("bool", bool, "bool | None"):
            # --flag / --no-flag unless the default is off; None means "decide at run time".
            action = "store_true" if f.default is False else argparse.BooleanOptionalAction
            group.add_argument(f"--{f.name}", action=action, help=help_text, **kwargs)
            continue
        group.add_argument(f"--{f.name}", type=_field_type(f), help=help_text, **kwargs)
    return parser


def _field_type(f: dataclasses.Field) -> type:
    type_name = str(f.type).replace(" | None", "")
    return {"int": int, "float": float, "str": str}[type_name]


# training_config.json keeps, beside the settings, what each "auto" one resolved to under this
# key; a --config file may hold it (a finished run's file fed back), and it is not a setting.
RUN_PLAN_KEY = "run_plan"


def load_config_file(path: str, cls: type) -> dict[str, Any]:
    """The settings in a YAML or JSON file (JSON is read as YAML too), keyed by field name of
    `cls` and type-checked like the flags; ConfigError naming the file and the key (and the
    closest valid key) for anything else."""
    import yaml

    try:
        with open(path) as f:
            values = yaml.safe_load(f)
    except OSError as error:
        raise ConfigError(f"--config {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"--config {path}: not valid YAML or JSON ({error})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of setting: value, "
                          f"got a {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    settings = {}
    for key, value in values.items():
        if key == RUN_PLAN_KEY:
            continue
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"--config {path}: unknown setting {key!r}{hint}")
        settings[key] = _checked_value(fields[key], value, f"--config {path}: {key}")
    return settings


def _checked_value(f: dataclasses.Field, value: Any, where: str) -> Any:
    type_name = str(f.type)
    if value is None:
        if "None" in type_name:
            return None
        raise ConfigError(f"{where} cannot be null")
    base = type_name.replace(" | None", "")
    if base == "str" and isinstance(value, list) and all(
            isinstance(v, str | int | float) and not isinstance(v, bool) for v in value):
        # Comma-separated settings (--loss_type, --loss_weights, --lora_target_modules) may
        # be written as YAML lists.
        value = ",".join(str(v) for v in value)
    if base in ("int", "float") and isinstance(value, str):
        # PyYAML reads 1e-4 (no dot) as a string; take numbers written as on the command line.
        try:
            value = {"int": int, "float": float}[base](value)
        except ValueError:
            pass
    ok = {"bool": isinstance(value, bool),
          "int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, int | float) and not isinstance(value, bool),
          "str": isinstance(value, str)}[base]
    if not ok:
        raise ConfigError(f"{where} must be {'a' if base != 'int' else 'an'} {base}, "
                          f"got {value!r}")
    choices = f.metadata["argparse"].get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{where} must be one of {', '.join(choices)}, got {value!r}")
    return float(value) if base == "float" else value


def parse_config(cls: type, parser: argparse.ArgumentParser, argv: list[str] | None = None,
                 presets: Callable[[dict], dict] | None = None) -> Any:
    """`cls` from, in order of precedence: the flags given on the command line, the
    `--config` file, `presets(settings so far)` (e.g. the demo's settings when those ask for
    the demo), and the field defaults."""
    explicit = vars(parser.parse_args(argv))
    path = explicit.pop("config", None)
    settings = {**(load_config_file(path, cls) if path else {}), **explicit}
    return cls(**{**(presets(settings) if presets else {}), **settings})
