"""trl's names for this project's settings, so that `--config` reads a trl-style YAML.

A `trl dpo --config` file mixes trl 1.16's `DPOConfig` (with the `TrainingArguments` it
extends), `ModelConfig` and `ScriptArguments` keys. Most are this project's flag names already
(`beta`, `loss_type`, `learning_rate`, `max_length`, `lora_r`, ...). `TRL_KEYS` maps the others:
to one of our settings (with the value converted where the meaning differs: `use_peft: false`
is `finetuning_type: full`), or to no setting at all, with the reason and what to do instead.
`from_trl_names` applies it to a file's keys; `--config` says which keys it mapped. Torch-free.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TrlKey:
    """One trl key: our setting `ours` (None: none), its value converted by `convert` (None:
    taken as it is; a converter returning None drops the key), or `why` it has no counterpart.
    `null_is_default`: whether null means trl's default there (left out) or is read as given
    (and refused like any null setting)."""

    ours: str | None
    convert: Callable[[Any], Any] | None = None
    why: str = ""
    null_is_default: bool = True


def _dtype_if(name: str) -> Callable[[Any], str | None]:
    """trl's bf16/fp16 flags: true picks that --dtype; false leaves --dtype as it is."""
    return lambda value: name if value is True else None


def _scheduler(value: Any) -> Any:
    # trl's constant_with_warmup is ours: warmup (--warmup_steps/--warmup_ratio), then flat.
    return "constant" if value == "constant_with_warmup" else value


def _no_limit(value: Any) -> Any:
    # trl's max_steps -1 ("train for num_train_epochs") is our 0.
    return 0 if value == -1 else value


def _drop_auto(value: Any) -> Any:
    # trl's "auto" pads to 128 on AWS Neuron only, which this project does not run on.
    return None if value == "auto" else value


_OPTIMIZER = "this project always trains with AdamW (--learning_rate, --weight_decay)"
_STRATEGY = ("this project logs, evaluates and saves every --logging_steps, --eval_steps and "
             "--save_steps steps")
_HUB = "this project writes to --output_dir only; upload that directory yourself"

TRL_KEYS: dict[str, TrlKey] = {
    # -- mapped ---------------------------------------------------------------------------
    "model_name_or_path": TrlKey("model_name"),
    "dataset_train_split": TrlKey("dataset_split"),
    "per_device_train_batch_size": TrlKey("batch_size"),
    "per_device_eval_batch_size": TrlKey("eval_batch_size"),
    "num_train_epochs": TrlKey("epochs"),
    "lr_scheduler_type": TrlKey("lr_scheduler", _scheduler),
    "bf16": TrlKey("dtype", _dtype_if("bfloat16")),
    "fp16": TrlKey("dtype", _dtype_if("float16")),
    "torch_dtype": TrlKey("dtype"),
    "use_peft": TrlKey("finetuning_type", lambda value: "lora" if value else "full"),
    "load_in_4bit": TrlKey("quantization", lambda value: "4bit" if value else "none"),
    "precompute_ref_batch_size": TrlKey("ref_batch_size"),
    "dataset_num_proc": TrlKey("tokenize_num_proc"),  # null (trl's default): ours, every core
    # Our names too, where trl writes its default differently (null: left out).
    "max_steps": TrlKey("max_steps", _no_limit, null_is_default=False),  # trl's default: -1
    "eval_steps": TrlKey("eval_steps"),
    "save_total_limit": TrlKey("save_total_limit"),
    "pad_to_multiple_of": TrlKey("pad_to_multiple_of", _drop_auto),
    # -- no counterpart ---------------------------------------------------------------------
    "optim": TrlKey(None, why=_OPTIMIZER),
    "adam_beta1": TrlKey(None, why=_OPTIMIZER + " with betas (0.9, 0.999)"),
    "adam_beta2": TrlKey(None, why=_OPTIMIZER + " with betas (0.9, 0.999)"),
    "adam_epsilon": TrlKey(None, why=_OPTIMIZER + " with eps 1e-8"),
    "lr_scheduler_kwargs": TrlKey(None, why="--lr_scheduler takes no options"),
    "eval_strategy": TrlKey(None, why=_STRATEGY),
    "save_strategy": TrlKey(None, why=_STRATEGY),
    "logging_strategy": TrlKey(None, why=_STRATEGY),
    "do_train": TrlKey(None, why="train.py always trains"),
    "do_eval": TrlKey(None, why="train.py evaluates whenever it has eval pairs "
                                "(--eval_fraction, --eval_dataset)"),
    "truncation_mode": TrlKey(None, why="this project cuts a prompt's start first and keeps "
                                        "at least --max_prompt_length prompt tokens"),
    "dataloader_num_workers": TrlKey(None, why="batches are built in the training process"),
    "model_init_kwargs": TrlKey(None, why="use --dtype, --attn_implementation, "
                                          "--quantization and --trust_remote_code"),
    "model_revision": TrlKey(None, why="pass a local directory (or the Hub id) as --model_name"),
    "dataset_config": TrlKey(None, why="save the configuration you want to a file and pass it "
                                       "as --dataset_name"),
    "dataset_test_split": TrlKey(None, why="use --eval_dataset or --eval_fraction"),
    "use_liger_kernel": TrlKey(None, why="the log-prob kernels here never build the logits"),
    "push_to_hub": TrlKey(None, why=_HUB),
    "hub_model_id": TrlKey(None, why=_HUB),
    "run_name": TrlKey(None, why="the run is named by --output_dir"),
    "logging_dir": TrlKey(None, why="logs go to --output_dir"),
    "load_in_8bit": TrlKey(None, why="--quantization takes 4bit or none"),
    "use_dora": TrlKey(None, why="this project trains plain LoRA"),
    "use_rslora": TrlKey(None, why="this project trains plain LoRA (scale --lora_alpha / "
                                   "--lora_r)"),
    "lora_modules_to_save": TrlKey(None, why="only the LoRA adapter trains, or every weight "
                                             "(--finetuning_type full)"),
    "gradient_checkpointing_kwargs": TrlKey(None, why="gradient checkpointing is always "
                                                      "non-reentrant here"),
}


def from_trl_names(values: dict[str, Any], fields: set[str],
                   where: str) -> tuple[dict[str, Any], list[str]]:
    """`values` (a config file's keys) with trl's names and values replaced by ours, and the
    notices ("per_device_train_batch_size -> batch_size", ...). Keys trl does not name pass
    through as they are. A trl key whose value means trl's default (null, bf16: false, ...)
    is left out. Raises ValueError naming the trl key (and `where`) when it has no counterpart
    in `fields`, or when it and our name for it are both given."""
    settings: dict[str, Any] = {}
    notices = []
    for key, value in values.items():
        trl = TRL_KEYS.get(key)
        if trl is None:
            settings[key] = value
            continue
        if trl.ours is None or trl.ours not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            closest = f" (the closest setting here is {close[0]!r})" if close else ""
            raise ValueError(f"{where}: trl's {key!r} has no counterpart here: "
                             f"{trl.why or 'this program has no such setting'}; remove "
                             f"it{closest}")
        converted = value if trl.convert is None or value is None else trl.convert(value)
        if converted is None and (value is not None or trl.null_is_default):
            notices.append(f"{key}: {value!r} left out (trl's default)")
            continue
        if trl.ours != key and (trl.ours in values or trl.ours in settings):
            raise ValueError(f"{where}: both {key!r} (trl's name) and {trl.ours!r} are given; "
                             "keep one")
        settings[trl.ours] = converted
        if (trl.ours, converted) != (key, value):
            shown = "" if converted == value else f" {converted!r}"
            notices.append(f"{key} -> {trl.ours}{shown}")
    return settings, notices
