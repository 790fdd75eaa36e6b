"""Align a causal language model with Direct Preference Optimization (LoRA / QLoRA).

Runs as `python train.py ...` on one device or `accelerate launch train.py ...` on many.
"""

from __future__ import annotations

import sys

from accelerate import PartialState

from dpo_core.checkpoint import CheckpointError
from dpo_core.config import ConfigError, TrainConfig, build_parser, parse_config
from dpo_core.data import DataError
from dpo_core.failures import DeviceMemoryError, NonFiniteError
from dpo_core.model import ModelLoadError
from dpo_core.trainer import train

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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(TrainConfig, __doc__, EXAMPLES, config_file=True)
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


if __name__ == "__main__":
    sys.exit(main())
