"""The command lines: `python train.py` (`dpo-train`) and `python chat.py` (`dpo-chat`);
`python -m dpo_core.report` (`dpo-report`) lives with the report. Parsing and wiring only."""

from __future__ import annotations

import sys

from accelerate import PartialState

from dpo_core.chat import ChatConfig, ChatSession, interactive
from dpo_core.checkpoint import CheckpointError
from dpo_core.config import ConfigError, TrainConfig, build_parser, parse_config
from dpo_core.data import DataError
from dpo_core.failures import DeviceMemoryError, NonFiniteError
from dpo_core.model import (
    ModelLoadError,
    load_inference_model,
    load_tokenizer,
    resolve_dtype,
    resolve_quantization,
)
from dpo_core.trainer import train

TRAIN_DESCRIPTION = """Align a causal language model with Direct Preference Optimization
(LoRA / QLoRA).

Runs as `python train.py ...` (or `dpo-train ...`) on one device, or as
`accelerate launch train.py ...` on many."""

CHAT_DESCRIPTION = """Chat with a base model plus a DPO-trained LoRA adapter (multi-turn, streamed).

Interactive by default; `--prompt "..."` answers once and exits."""

EXAMPLES = """examples:
  python train.py --demo                                  # offline, bundled model and data
  python train.py --num_samples 2000 --epochs 1           # TinyLlama-Chat on UltraFeedback
  python train.py --config examples/configs/tinyllama_qlora_ultrafeedback.yaml
  python train.py --model_name ./my-model --dataset_name pairs.jsonl --no_quantization
  accelerate launch --multi_gpu --num_processes 2 train.py --batch_size 4
"""


def demo_presets(settings: dict) -> dict:
    """The demo's tuned settings when `settings` ask for the demo (flags still win)."""
    if not settings.get("demo"):
        return {}
    from dpo_core.demo import DEMO_PRESETS

    return DEMO_PRESETS


def train_main(argv: list[str] | None = None) -> int:
    """`python train.py` / `dpo-train`: returns the exit status."""
    parser = build_parser(TrainConfig, TRAIN_DESCRIPTION, EXAMPLES, config_file=True)
    try:
        config = parse_config(TrainConfig, parser, argv, presets=demo_presets)
        hook = None
        if config.demo:
            from dpo_core.demo import demo_evaluation

            hook = demo_evaluation
        metrics = train(config, evaluation_hook=hook)
    except (ConfigError, DataError, ModelLoadError, CheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (NonFiniteError, DeviceMemoryError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if not PartialState().is_main_process:  # under torchrun / accelerate launch
        return 0
    if config.demo:
        from dpo_core.demo import format_before_after

        print(format_before_after(metrics))
    print(f"Saved the adapter, tokenizer, training_config.json and metrics.json to "
          f"{config.output_dir}")
    return 0


def chat_main(argv: list[str] | None = None) -> int:
    """`python chat.py` / `dpo-chat`: returns the exit status."""
    explicit = vars(build_parser(ChatConfig, CHAT_DESCRIPTION).parse_args(argv))
    if explicit.get("demo"):
        from dpo_core.demo import CHAT_PRESETS

        explicit = {**CHAT_PRESETS, **explicit}
    config = ChatConfig(**explicit)
    try:
        tokenizer = load_tokenizer(config.base_model, config.trust_remote_code)
        model = load_inference_model(
            config.base_model,
            None if config.no_adapter else config.adapter_path,
            dtype=resolve_dtype(config.dtype),
            quantize_4bit=resolve_quantization(config.quantization),
            trust_remote_code=config.trust_remote_code,
        )
    except ModelLoadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    session = ChatSession(model, tokenizer, config)
    if config.prompt is not None:
        session.reply(config.prompt, stream=True)
        print()
        return 0
    interactive(session)
    return 0
