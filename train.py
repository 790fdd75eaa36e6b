"""Align a causal language model with Direct Preference Optimization (LoRA / QLoRA).

Runs as `python train.py ...` on one device or `accelerate launch train.py ...` on many.
"""

from __future__ import annotations

import sys

from dpo_core.cli import run_command
from dpo_core.config import TrainConfig, build_parser

EXAMPLES = """examples:
  python train.py --demo                                  # offline, bundled model and data
  python train.py --num_samples 2000 --epochs 1           # TinyLlama-Chat on UltraFeedback
  python train.py --model_name ./my-model --dataset_name pairs.jsonl --no_quantization
  accelerate launch --multi_gpu --num_processes 2 train.py --batch_size 4
"""


def main(argv: list[str] | None = None) -> int:
    """Exit status of a training run; argv None means this process's own command line."""
    return run_command(_train, argv)


def _train(argv: list[str] | None) -> int:
    parser = build_parser(TrainConfig, __doc__, EXAMPLES)
    explicit = vars(parser.parse_args(argv))
    hook = None
    presets: dict = {}
    if explicit.get("demo"):
        from dpo_core.demo import DEMO_PRESETS, demo_evaluation

        presets, hook = DEMO_PRESETS, demo_evaluation
    config = TrainConfig(**{**presets, **explicit})
    config.validate()  # bad flags are refused before the heavy imports below
    from dpo_core.model import avoid_bitsandbytes, resolve_quantization

    if argv is None and not resolve_quantization(config.quantization):
        avoid_bitsandbytes()
    from accelerate import PartialState

    from dpo_core.trainer import train

    metrics = train(config, evaluation_hook=hook)
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
