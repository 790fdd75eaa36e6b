"""Base model, tokenizer and LoRA adapter: one model in memory, the reference is the same
model with its adapter disabled.
"""

from __future__ import annotations

import os

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from dpo_core.config import ConfigError, TrainConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The model or tokenizer could not be loaded; the message names it and says what to do."""


def resolve_dtype(name: str) -> torch.dtype:
    """'auto' -> bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if name != "auto":
        return DTYPES[name]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_quantization(name: str) -> bool:
    """Whether to load the base weights in 4-bit: 'auto' means only where CUDA is present."""
    if name == "auto":
        return torch.cuda.is_available()
    return name == "4bit"


def resolve_gradient_checkpointing(setting: bool | None) -> bool:
    """Unset (None) means on where CUDA is present: GPU memory is the usual limit there."""
    if setting is None:
        return torch.cuda.is_available()
    return setting


def _load_error(kind: str, name: str, error: Exception) -> ModelLoadError:
    if os.path.isdir(name):
        return ModelLoadError(f"could not load the {kind} from {name!r}: {error}")
    return ModelLoadError(
        f"could not load the {kind} {name!r} from the Hugging Face Hub ({type(error).__name__}). "
        "If this machine is offline, pass a local directory instead, or try `--demo`, which "
        "uses the model bundled with dpo."
    )


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it can pad.

    Padding is masked out everywhere, so any id works; EOS is the usual choice, and a new
    `<pad>` token is added only when the tokenizer has no EOS either.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise _load_error("tokenizer", name, error) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


def load_base_model(
    name: str,
    *,
    dtype: torch.dtype,
    quantize_4bit: bool,
    attn_implementation: str | None = "sdpa",
    trust_remote_code: bool = False,
    device_map: dict | str | None = None,
) -> torch.nn.Module:
    """`AutoModelForCausalLM`, optionally with NF4 double-quantised 4-bit weights (QLoRA)."""
    kwargs: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantize_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = device_map or _default_device_map()
    elif device_map is not None:
        kwargs["device_map"] = device_map
    try:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as error:
        raise _load_error("model", name, error) from None


def _default_device_map() -> dict:
    # Quantised weights are placed at load time; under `accelerate launch` each process
    # owns the GPU given by its local rank.
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return {"": "cpu"}


def disable_dropout(model: torch.nn.Module) -> None:
    """Set p=0 on every dropout module (LoRA's included): both passes see one network."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def add_lora(
    model: torch.nn.Module,
    *,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: str | list[str],
    gradient_checkpointing: bool,
    quantized: bool,
) -> PeftModel:
    """Wrap `model` with a fresh LoRA adapter; only the adapter's weights train."""
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
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as error:
        raise ConfigError(f"--lora_target_modules: {error}") from None


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
        try:
            model = PeftModel.from_pretrained(model, adapter_path)
        except (OSError, ValueError) as error:
            raise ModelLoadError(
                f"could not load the adapter from {adapter_path!r}: {error}"
            ) from None
    return model.eval()


def build_policy(config: TrainConfig, dtype: torch.dtype, quantize: bool,
                 gradient_checkpointing: bool) -> PeftModel:
    """Base model + fresh LoRA adapter; dropout off (unless asked) so both passes see one
    network."""
    base = load_base_model(config.model_name, dtype=dtype, quantize_4bit=quantize,
                           attn_implementation=config.attn_implementation,
                           trust_remote_code=config.trust_remote_code)
    model = add_lora(base, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                     target_modules=config.target_modules,
                     gradient_checkpointing=gradient_checkpointing, quantized=quantize)
    if config.disable_dropout:
        disable_dropout(model)
    return model


def save_merged_model(config: TrainConfig, adapter_dir: str, dtype: torch.dtype) -> str:
    """Base weights (reloaded unquantized: a 4-bit base cannot absorb the adapter exactly)
    plus the adapter saved in `adapter_dir`, merged, written to adapter_dir/merged."""
    base = load_base_model(config.model_name, dtype=dtype, quantize_4bit=False,
                           attn_implementation=config.attn_implementation,
                           trust_remote_code=config.trust_remote_code)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged_dir = os.path.join(adapter_dir, "merged")
    merged.save_pretrained(merged_dir)
    load_tokenizer(config.model_name, config.trust_remote_code).save_pretrained(merged_dir)
    return merged_dir
