"""Base model, tokenizer and what trains on it: a fresh LoRA adapter (the reference is the same
model with its adapter disabled), an SFT adapter loaded twice on one base (a trainable policy
copy and a frozen reference copy), or every weight (full fine-tuning).

peft is imported where it is used: importing it imports bitsandbytes, which a run without
4-bit weights must not pay for (see `avoid_bitsandbytes`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from dpo_core.config import ConfigError, TrainConfig
from dpo_core.errors import UserError, first_line

if TYPE_CHECKING:
    from peft import PeftModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Adapter names when DPO starts from an SFT adapter: PEFT's default name for the one that
# trains (and is saved), and a frozen copy of the adapter as loaded for the reference pass.
POLICY_ADAPTER, REFERENCE_ADAPTER = "default", "reference"


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`model` in eval mode (dropout off) inside the block, then in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def base_model_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP/Accelerate/compile wrappers and a PEFT model: for
    reading its config, signature, modules and weights (a wrapped model is still what is
    called)."""
    from accelerate.utils import extract_model_from_parallel

    inner = extract_model_from_parallel(model)
    get_base_model = getattr(inner, "get_base_model", None)  # PEFT
    return get_base_model() if callable(get_base_model) else inner


class ModelLoadError(UserError, RuntimeError):
    """The model or tokenizer could not be loaded; the message names it and says what to do."""


def resolve_dtype(name: str) -> torch.dtype:
    """'auto' -> bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if name != "auto":
        return DTYPES[name]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_quantization(name: str, full_finetuning: bool = False) -> bool:
    """Whether to load the base weights in 4-bit: 'auto' means only where CUDA is present, and
    never for full fine-tuning (4-bit weights cannot train; config validation refuses '4bit')."""
    if name == "auto":
        return torch.cuda.is_available() and not full_finetuning
    return name == "4bit"


def resolve_gradient_checkpointing(setting: bool | None) -> bool:
    """Unset (None) means on where CUDA is present: GPU memory is the usual limit there."""
    if setting is None:
        return torch.cuda.is_available()
    return setting


def avoid_bitsandbytes() -> None:
    """Make `import bitsandbytes` fail in this process, for a command that uses no 4-bit
    weights: peft imports it eagerly, which costs time and, on CPU, prints a kernel warning
    that is not the user's business. peft then treats it as not installed. Only for a fresh
    process: once peft is imported, its view of bitsandbytes is fixed.
    """
    if "bitsandbytes" not in sys.modules and "peft" not in sys.modules:
        sys.modules["bitsandbytes"] = None  # type: ignore[assignment]


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft calls transformers' deprecated `is_gradient_checkpointing`: a FutureWarning for
    peft's maintainers, not for the user; only that warning is hidden."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                category=FutureWarning)
        yield


def _load_error(kind: str, name: str, error: Exception) -> ModelLoadError:
    if isinstance(error, SafetensorError):
        return ModelLoadError(
            f"could not load the {kind} from {name!r}: a weights file is damaged or truncated "
            f"({error}); copy or download the model again")
    if os.path.isdir(name):
        return ModelLoadError(f"could not load the {kind} from {name!r}: {error}")
    return ModelLoadError(
        f"could not load the {kind} {name!r} from the Hugging Face Hub ({type(error).__name__}). "
        "If this machine is offline, pass a local directory instead, or try `--demo`, which "
        "uses the model bundled with dpo."
    )


def hub_access(name: str) -> dict:
    """`from_pretrained` options for `name`, decided with one quick request instead of the
    minute of retries a machine without network spends in transformers before failing:
    {} for a local directory or a reachable Hub; `local_files_only` when the Hub cannot be
    reached but the model is in the local cache; ModelLoadError when it is in neither."""
    if os.path.isdir(name) or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return {}
    state = _hub_state(name)
    if state == "unreachable":
        raise ModelLoadError(
            f"could not reach the Hugging Face Hub to download {name!r}, and it is not in the "
            "local cache. If this machine is offline, pass a local directory instead, or try "
            "`--demo`, which uses the model bundled with dpo.")
    return {"local_files_only": True} if state == "cached" else {}


@functools.lru_cache(maxsize=8)
def _hub_state(name: str) -> str:
    """'online' (or an answer such as not-found that from_pretrained will explain), 'cached'
    or 'unreachable'."""
    from huggingface_hub import HfApi, try_to_load_from_cache

    try:
        HfApi().model_info(name, timeout=10)
        return "online"
    except Exception as error:  # noqa: BLE001 - only connection failures matter here
        if not _is_connection_error(error):
            return "online"
    return "cached" if isinstance(try_to_load_from_cache(name, "config.json"), str) \
        else "unreachable"


def _is_connection_error(error: Exception) -> bool:
    # The HTTP client (httpx or requests, by huggingface_hub version) has its own classes.
    names = {cls.__name__ for cls in type(error).__mro__}
    return isinstance(error, (ConnectionError, TimeoutError)) or bool(names & {
        "TransportError", "ConnectError", "ConnectionError", "Timeout", "TimeoutException",
        "OfflineModeIsEnabled"})


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it can pad.

    Padding is masked out everywhere, so any id works; EOS is the usual choice, and a new
    `<pad>` token is added only when the tokenizer has no EOS either.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code,
                                                  **hub_access(name))
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
    kwargs: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code, **hub_access(name)}
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
    except (OSError, ValueError, SafetensorError) as error:
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
) -> torch.nn.Module:
    """Wrap `model` with a fresh LoRA adapter; only the adapter's weights train."""
    from peft import LoraConfig, get_peft_model

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
        raise ConfigError(f"--lora_target_modules: {error}") from None


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


def load_run_base_model(config: TrainConfig, dtype: torch.dtype,
                        quantize_4bit: bool = False) -> torch.nn.Module:
    """`load_base_model` of the run's --model_name, with its attention and remote-code
    settings (`config`: the TrainConfig)."""
    return load_base_model(config.model_name, dtype=dtype, quantize_4bit=quantize_4bit,
                           attn_implementation=config.attn_implementation,
                           trust_remote_code=config.trust_remote_code)


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
        model = add_lora(base, r=config.lora_r, alpha=config.lora_alpha,
                         dropout=config.lora_dropout, target_modules=config.target_modules,
                         gradient_checkpointing=gradient_checkpointing, quantized=quantize)
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
