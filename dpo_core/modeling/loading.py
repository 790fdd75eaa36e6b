"""Loading the base model and tokenizer, and the device settings decided before loading.

`load_base_model` loads any causal LM from the Hub or a directory (optionally NF4 4-bit for
QLoRA), `load_tokenizer` makes sure it can pad; an unreachable Hub or a damaged file is a
`ModelLoadError` saying what to do, found with one quick request rather than a minute of
retries. `resolve_dtype`, `resolve_quantization` and `resolve_gradient_checkpointing` turn the
"auto" settings into what this machine runs.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Iterator

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from dpo_core.config.train import TrainConfig
from dpo_core.errors import ConfigError, ModelLoadError, first_line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    attn_implementation: str = "auto",
    trust_remote_code: bool = False,
    device_map: dict | str | None = None,
) -> torch.nn.Module:
    """`AutoModelForCausalLM`, optionally with NF4 double-quantised 4-bit weights (QLoRA).

    attn_implementation 'auto' lets transformers choose: SDPA where the model class supports
    it, else eager (Gemma 2). One the model refuses raises ConfigError naming the flag."""
    kwargs: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code, **hub_access(name)}
    if attn_implementation != "auto":
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
    except ValueError as error:
        # transformers says so when a model class cannot run the attention asked for.
        if "attention" in str(error).lower() and attn_implementation != "auto":
            raise ConfigError(
                f"--attn_implementation {attn_implementation}: {name!r} cannot run it "
                f"({first_line(error)}); use --attn_implementation auto, which picks SDPA "
                "where the model supports it and eager otherwise") from None
        raise _load_error("model", name, error) from None
    except (OSError, SafetensorError) as error:
        raise _load_error("model", name, error) from None


def _default_device_map() -> dict:
    # Quantised weights are placed at load time; under `accelerate launch` each process
    # owns the GPU given by its local rank.
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return {"": "cpu"}


def load_run_base_model(config: TrainConfig, dtype: torch.dtype,
                        quantize_4bit: bool = False) -> torch.nn.Module:
    """`load_base_model` of the run's --model_name, with its attention and remote-code
    settings (`config`: the TrainConfig)."""
    return load_base_model(config.model_name, dtype=dtype, quantize_4bit=quantize_4bit,
                           attn_implementation=config.attn_implementation,
                           trust_remote_code=config.trust_remote_code)
