"""What trains on the base model: a fresh LoRA adapter (the reference is the same
model with its adapter disabled, or with --sync_ref_model a frozen copy of the adapter), an SFT
adapter loaded twice on one base (a trainable policy copy and a frozen reference copy), or every
weight (full fine-tuning).

peft is imported where it is used: importing it imports bitsandbytes, which a run without
4-bit weights must not pay for (see `avoid_bitsandbytes`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from transformers import PreTrainedTokenizerBase

from dpo_core.config.train import TrainConfig
from dpo_core.errors import ConfigError, ModelLoadError, first_line
from dpo_core.modeling.loading import (
    _default_device_map,
    _load_error,
    load_base_model,
    load_run_base_model,
)

if TYPE_CHECKING:
    from peft import PeftModel

# Adapter names when DPO starts from an SFT adapter: PEFT's default name for the one that
# trains (and is saved), and a frozen copy of the adapter as loaded for the reference pass.
POLICY_ADAPTER, REFERENCE_ADAPTER = "default", "reference"


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft calls transformers' deprecated `is_gradient_checkpointing` (a FutureWarning for
    peft's maintainers), and says it sets `fan_in_fan_out` for GPT-2's Conv1D layers itself:
    nothing for the user to do; only those warnings are hidden."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                category=FutureWarning)
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False but the "
                                "target module is `Conv1D`", category=UserWarning)
        yield


def disable_dropout(model: torch.nn.Module) -> None:
    """Set p=0 on every dropout module (LoRA's included): both passes see one network."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


# The original project's default targets, which Llama-family users know.
ATTENTION_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """The distinct last names of `model`'s linear layers (torch's, 4-bit ones, GPT-2's
    Conv1D), the LM head left out: what --lora_target_modules can name."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head})


def resolve_lora_targets(model: torch.nn.Module, setting: str | list[str]) -> str | list[str]:
    """What peft is asked to adapt for --lora_target_modules `setting` ('auto', 'all-linear'
    or names): 'auto' = ATTENTION_PROJECTIONS where the model has all four, else peft's
    targets for its model type where the model has them, else 'all-linear'. A name that
    matches no module of the model raises ConfigError listing its linear layers."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    linear = linear_layer_names(model)
    if setting == "all-linear":
        return setting
    if setting != "auto":
        names = [name for name, _ in model.named_modules()]
        # peft's rule: a target names a module, or the end of its dotted name.
        missing = [target for target in setting
                   if not any(name == target or name.endswith(f".{target}") for name in names)]
        if missing:
            raise ConfigError(
                f"--lora_target_modules: this model has no module named {', '.join(missing)}; "
                f"its linear layers are {','.join(linear)} (or pass auto, or all-linear)")
        return setting
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for candidate in (ATTENTION_PROJECTIONS,
                      TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)):
        if candidate and all(name in linear for name in candidate):
            return list(candidate)
    return "all-linear"


def add_lora(
    model: torch.nn.Module,
    *,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: str | list[str],
    gradient_checkpointing: bool,
    quantized: bool,
) -> torch.nn.Module:
    """Wrap `model` with a fresh LoRA adapter; only the adapter's weights train.
    `target_modules`: 'auto', 'all-linear' or module names (`resolve_lora_targets`)."""
    from peft import LoraConfig, get_peft_model

    target_modules = resolve_lora_targets(model, target_modules)

    model = _prepare_frozen_base(model, gradient_checkpointing=gradient_checkpointing,
                                 quantized=quantized)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        with _quiet_peft():
            return get_peft_model(model, config)
    except ValueError as error:
        if dropout and "lora_dropout" in str(error):
            raise ConfigError(
                f"--lora_target_modules {_shown(target_modules)} has peft adapt fused expert "
                f"weights (lora.ParamWrapper), which take no LoRA dropout ({first_line(error)}): "
                "pass --lora_dropout 0, or keep --disable_dropout on") from None
        raise ConfigError(f"--lora_target_modules: {error}") from None


def _shown(target_modules: str | list[str]) -> str:
    return target_modules if isinstance(target_modules, str) else ",".join(target_modules)


def adapted_modules(model: torch.nn.Module) -> str | None:
    """What the policy's LoRA adapter adapts, for the run plan: the distinct last names of its
    target modules, then its target parameters (fused expert weights); None without one."""
    config = getattr(model, "peft_config", {}).get(POLICY_ADAPTER)
    if config is None:
        return None
    modules = config.target_modules
    names = {modules} if isinstance(modules, str) else {m.rsplit(".", 1)[-1] for m in modules}
    return ",".join(sorted(names) + sorted(config.target_parameters or []))


def expert_note(model: torch.nn.Module, num_experts: int | None) -> str | None:
    """For a mixture-of-experts policy (`num_experts` experts per layer), whether LoRA adapts
    the experts' fused weights, in a sentence."""
    config = getattr(model, "peft_config", {}).get(POLICY_ADAPTER)
    if config is None or not num_experts:
        return None
    if config.target_parameters:
        return (f"LoRA adapts the {num_experts} experts' fused weights "
                f"({', '.join(sorted(config.target_parameters))}) through peft's "
                "lora.ParamWrapper, which takes no dropout: LoRA dropout is 0")
    return (f"LoRA leaves the {num_experts} experts' weights frozen (they are fused tensors, "
            "no linear layers); peft adapts them for the models it converts, e.g. Mixtral, "
            "under --lora_target_modules all-linear")


def _prepare_frozen_base(model: torch.nn.Module, *, gradient_checkpointing: bool,
                         quantized: bool) -> torch.nn.Module:
    """Ready a base whose own weights stay frozen for adapter training (QLoRA casts, and the
    input-grad hook that gradient checkpointing needs)."""
    from peft import prepare_model_for_kbit_training

    if quantized:
        # Casts norms to fp32 and hooks input grads, as QLoRA training needs.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # With frozen embeddings no input would require grad and checkpointed blocks would
        # get no gradient: make the embedding output require it.
        model.enable_input_require_grads()
    if gradient_checkpointing:
        model.config.use_cache = False
    return model


def load_trainable_adapter(
    model: torch.nn.Module,
    adapter_path: str,
    *,
    gradient_checkpointing: bool,
    quantized: bool,
) -> PeftModel:
    """Load the LoRA adapter at `adapter_path` (local directory or Hub id) twice onto `model`:
    as `POLICY_ADAPTER`, trainable and active, and as `REFERENCE_ADAPTER`, frozen. The
    reference pass switches the frozen copy in (`reference.AdapterSwitched`): the reference
    is the model the adapter made, as the DPO paper's SFT reference, with one base in memory.

    Raises ModelLoadError when the adapter is not LoRA or does not fit the base (other
    architecture, other sizes, other layer count)."""
    from peft import PeftConfig, PeftModel, PeftType

    try:
        adapter_config = PeftConfig.from_pretrained(adapter_path)
    except (OSError, ValueError) as error:
        raise _load_error("adapter", adapter_path, error) from None
    if adapter_config.peft_type != PeftType.LORA:
        raise ModelLoadError(f"--adapter_path {adapter_path!r} holds a "
                             f"{adapter_config.peft_type.value} adapter; DPO here trains LoRA")
    model = _prepare_frozen_base(model, gradient_checkpointing=gradient_checkpointing,
                                 quantized=quantized)
    base_name = getattr(model, "name_or_path", "") or "the base model"
    trained_on = adapter_config.base_model_name_or_path
    where = f"the adapter at {adapter_path!r}" + (f" (made for {trained_on!r})" if trained_on
                                                   else "")
    try:
        with _quiet_peft():
            peft_model = PeftModel.from_pretrained(model, adapter_path,
                                                   adapter_name=POLICY_ADAPTER, is_trainable=True)
            peft_model.load_adapter(adapter_path, adapter_name=REFERENCE_ADAPTER,
                                    is_trainable=False)
    except (ValueError, RuntimeError, KeyError, SafetensorError) as error:
        # Module names the base lacks (ValueError), weight shapes that differ (RuntimeError).
        detail = " ".join(str(error).split())[:600]
        raise ModelLoadError(f"{where} does not fit {base_name!r}: {detail}") from None
    _check_every_weight_loaded(peft_model, adapter_path, f"{where} does not fit {base_name!r}")
    peft_model.set_adapter(POLICY_ADAPTER)  # trainable; the reference copy stays frozen
    return peft_model


def add_reference_adapter(model: PeftModel) -> PeftModel:
    """Add `REFERENCE_ADAPTER`, a frozen copy of the policy adapter, to `model` (TR-DPO's moving
    reference, --sync_ref_model: it starts where the policy starts, which for a fresh adapter,
    whose B is 0, is exactly the base model); the policy adapter stays active."""
    with _quiet_peft():
        model.add_adapter(REFERENCE_ADAPTER, copy.deepcopy(model.peft_config[POLICY_ADAPTER]))
    weights = dict(model.named_parameters())
    with torch.no_grad():
        for name, weight in weights.items():
            if policy := policy_weight_of(name):
                weight.copy_(weights[policy])
    model.set_adapter(POLICY_ADAPTER)  # trainable; the reference copy stays frozen
    return model


def policy_weight_of(name: str) -> str | None:
    """The name of the policy adapter weight that reference-adapter weight `name` mirrors
    ("...lora_A.reference.weight" -> "...lora_A.default.weight"); None for any other weight."""
    parts = name.split(".")
    if REFERENCE_ADAPTER not in parts:
        return None
    return ".".join(POLICY_ADAPTER if part == REFERENCE_ADAPTER else part for part in parts)


def _check_every_weight_loaded(model: PeftModel, adapter_path: str, mismatch: str) -> None:
    """PEFT only warns about adapter weights the base has no place for, or places the file does
    not fill (e.g. an adapter of a model with fewer layers); either means another base."""
    from peft import get_peft_model_state_dict, load_peft_weights

    saved = set(load_peft_weights(adapter_path))
    expected = set(get_peft_model_state_dict(model, adapter_name=POLICY_ADAPTER))
    missing, unexpected = sorted(expected - saved), sorted(saved - expected)
    problems = []
    if missing:
        problems.append(f"{len(missing)} adapter weights the base expects are not in it "
                        f"(e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} of its weights have no place in the base "
                        f"(e.g. {unexpected[0]})")
    if problems:
        raise ModelLoadError(f"{mismatch}: " + "; ".join(problems))


def prepare_full_finetuning(model: torch.nn.Module, *,
                            gradient_checkpointing: bool) -> torch.nn.Module:
    """Make every weight of `model` trainable (full fine-tuning)."""
    model.requires_grad_(True)
    if gradient_checkpointing:
        # The embeddings train, so checkpointed blocks get inputs that require grad already.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def load_inference_model(
    base_model: str,
    adapter_path: str | None,
    *,
    dtype: torch.dtype,
    quantize_4bit: bool,
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """Base model (on the GPU when there is one) plus, unless None, a trained adapter."""
    model = load_base_model(
        base_model,
        dtype=dtype,
        quantize_4bit=quantize_4bit,
        trust_remote_code=trust_remote_code,
        device_map=_default_device_map(),
    )
    if adapter_path is not None:
        model = load_adapter(model, adapter_path, base_model)
    return model.eval()


def load_adapter(model: torch.nn.Module, adapter_path: str, base_model: str) -> torch.nn.Module:
    """`model` with the trained LoRA adapter in `adapter_path`; ModelLoadError saying what to
    do when the directory holds no adapter, a damaged one, or one trained on another base."""
    from peft import PeftModel

    if not os.path.isfile(os.path.join(adapter_path, "adapter_config.json")):
        raise ModelLoadError(
            f"{adapter_path!r} holds no trained adapter (no adapter_config.json): pass the "
            "--output_dir of a finished train.py run as --adapter_path, or --no_adapter")
    try:
        with _quiet_peft():
            return PeftModel.from_pretrained(model, adapter_path)
    except RuntimeError as error:  # shape mismatch: the adapter belongs to another base model
        if "size mismatch" not in str(error):
            raise
        raise ModelLoadError(
            f"the adapter in {adapter_path!r} does not fit the base model {base_model!r} "
            f"(its weights have other shapes: it was trained on "
            f"{_adapter_base(adapter_path)!r}); pass that model as --base_model") from None
    except (OSError, ValueError, SafetensorError) as error:
        raise ModelLoadError(
            f"could not load the adapter from {adapter_path!r}: {first_line(error)}"
        ) from None


def _adapter_base(adapter_path: str) -> str:
    """The base model an adapter records in adapter_config.json ('unknown' if none)."""
    try:
        with open(os.path.join(adapter_path, "adapter_config.json")) as f:
            return json.load(f).get("base_model_name_or_path") or "unknown"
    except (OSError, ValueError):
        return "unknown"


def build_policy(config: TrainConfig, dtype: torch.dtype, quantize: bool,
                 gradient_checkpointing: bool) -> torch.nn.Module:
    """Base model + fresh LoRA adapter, the --adapter_path adapter, or every weight trainable
    (--finetuning_type full); dropout off (unless asked) so both passes see one network."""
    full = config.finetuning_type == "full"
    # Full fine-tuning keeps fp32 master weights: --dtype is then the autocast precision.
    base = load_run_base_model(config, torch.float32 if full else dtype, quantize_4bit=quantize)
    if full:
        model = prepare_full_finetuning(base, gradient_checkpointing=gradient_checkpointing)
    elif config.adapter_path:
        model = load_trainable_adapter(base, config.adapter_path,
                                       gradient_checkpointing=gradient_checkpointing,
                                       quantized=quantize)
    else:
        # With --disable_dropout the LoRA dropout is zeroed anyway; asking peft for none up front
        # lets it adapt fused expert weights (lora.ParamWrapper takes no dropout).
        model = add_lora(base, r=config.lora_r, alpha=config.lora_alpha,
                         dropout=0.0 if config.disable_dropout else config.lora_dropout,
                         target_modules=config.target_modules,
                         gradient_checkpointing=gradient_checkpointing, quantized=quantize)
        if config.sync_ref_model:
            model = add_reference_adapter(model)
    if config.disable_dropout:
        disable_dropout(model)
    return model


def save_merged_model(config: TrainConfig, adapter_dir: str, dtype: torch.dtype,
                      tokenizer: PreTrainedTokenizerBase) -> str:
    """Base weights (reloaded unquantized: a 4-bit base cannot absorb the adapter exactly)
    plus the adapter saved in `adapter_dir`, merged, written to adapter_dir/merged with the
    run's `tokenizer`."""
    from peft import PeftModel

    base = load_run_base_model(config, dtype)
    with _quiet_peft():
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged_dir = os.path.join(adapter_dir, "merged")
    merged.save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)
    return merged_dir
