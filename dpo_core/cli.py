"""The command lines: `python train.py` (`dpo-train`) and `python chat.py` (`dpo-chat`);
`python -m dpo_core.report` (`dpo-report`) lives with the report. Parsing and wiring only.

One error path: every failure the user can cause ends with a message on stderr and exit status
2 (something to fix in the command) or 1 (a run that could not go on), 130 for Ctrl-C;
`--debug` or DPO_DEBUG=1 shows the traceback instead. Heavy modules (torch, transformers,
peft) are imported only once the flags are known to be good: `--help` and flag errors need
none of them, and a run without 4-bit weights never imports bitsandbytes.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable

from dpo_core.chat_config import ChatConfig
from dpo_core.config import TrainConfig, build_parser, parse_config
from dpo_core.errors import RunFailure, TrainingInterrupted, UserError

DEBUG_ENV = "DPO_DEBUG"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)

TRAIN_DESCRIPTION = """Align a causal language model with Direct Preference Optimization
(LoRA / QLoRA, from a fresh or an SFT adapter, or full fine-tuning).

Runs as `python train.py ...` (or `dpo-train ...`) on one device, or as
`accelerate launch train.py ...` on many."""

CHAT_DESCRIPTION = """Chat with a base model plus a DPO-trained LoRA adapter (multi-turn, streamed).

Interactive by default; `--prompt "..."` answers once and exits."""

EXAMPLES = """examples:
  python train.py --demo                                  # offline, bundled model and data
  python train.py --num_samples 2000 --epochs 1           # TinyLlama-Chat on UltraFeedback
  python train.py --config examples/configs/tinyllama_qlora_ultrafeedback.yaml
  python train.py --model_name ./my-model --dataset_name pairs.jsonl --no_quantization
  python train.py --adapter_path ./sft-adapter            # DPO from an SFT LoRA adapter
  python train.py --model_name ./small-model --finetuning_type full --no_quantization
  accelerate launch --multi_gpu --num_processes 2 train.py --batch_size 4
"""


def demo_presets(settings: dict, chat: bool = False) -> dict:
    """The demo's tuned settings (training's, or with `chat` its model and adapter) when
    `settings` ask for the demo; flags and the config file still win."""
    if not settings.get("demo"):
        return {}
    from dpo_core import demo

    return demo.CHAT_PRESETS if chat else demo.DEMO_PRESETS


def train_main(argv: list[str] | None = None) -> int:
    """`python train.py` / `dpo-train`: returns the exit status. argv None means this
    process's own command line (the process is the command: its imports may be steered)."""
    return run_command(_train, argv)


def chat_main(argv: list[str] | None = None) -> int:
    """`python chat.py` / `dpo-chat`: returns the exit status (argv as for `train_main`)."""
    return run_command(_chat, argv)


def _quantization(setting: str, argv: list[str] | None, full_finetuning: bool = False) -> bool:
    """Whether the base weights load in 4-bit. When they do not, a command-line run (argv
    None) keeps bitsandbytes from being imported at all (`avoid_bitsandbytes`)."""
    from dpo_core.model import avoid_bitsandbytes, resolve_quantization

    quantize = resolve_quantization(setting, full_finetuning)
    if argv is None and not quantize:
        avoid_bitsandbytes()
    return quantize


def _train(argv: list[str] | None) -> int:
    parser = build_parser(TrainConfig, TRAIN_DESCRIPTION, EXAMPLES, config_file=True)
    config = parse_config(TrainConfig, parser, argv, presets=demo_presets)
    config.validate()  # bad flags are refused before the heavy imports below
    _quantization(config.quantization, argv, config.finetuning_type == "full")
    from accelerate import PartialState

    from dpo_core.trainer import train

    hook = None
    if config.demo:
        from dpo_core.demo import demo_evaluation

        hook = demo_evaluation
    metrics = train(config, evaluation_hook=hook)
    if not PartialState().is_main_process:  # under torchrun / accelerate launch
        return 0
    if config.demo:
        from dpo_core.demo import format_before_after

        print(format_before_after(metrics))
    trained = "model" if config.finetuning_type == "full" else "adapter"
    print(f"Saved the {trained}, tokenizer, training_config.json and metrics.json to "
          f"{config.output_dir}")
    return 0


def _chat(argv: list[str] | None) -> int:
    config = parse_config(ChatConfig, build_parser(ChatConfig, CHAT_DESCRIPTION), argv,
                          presets=lambda settings: demo_presets(settings, chat=True))
    config.validate()
    quantize = _quantization(config.quantization, argv)
    from dpo_core.chat import ChatSession, interactive
    from dpo_core.model import load_inference_model, load_tokenizer, resolve_dtype

    tokenizer = load_tokenizer(config.base_model, config.trust_remote_code)
    model = load_inference_model(
        config.base_model,
        None if config.no_adapter else config.adapter_path,
        dtype=resolve_dtype(config.dtype),
        quantize_4bit=quantize,
        trust_remote_code=config.trust_remote_code,
    )
    session = ChatSession(model, tokenizer, config)
    if config.prompt is not None:
        session.reply(config.prompt, stream=True)
        print()
        return 0
    interactive(session)
    return 0


def wants_traceback(argv: list[str] | None) -> bool:
    args = sys.argv[1:] if argv is None else argv
    return "--debug" in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_command(command: Callable[[list[str] | None], int], argv: list[str] | None) -> int:
    """`command(argv)`'s exit status; a failure becomes a one-paragraph message instead."""
    debug = wants_traceback(argv)
    try:
        return command(argv)
    except TrainingInterrupted as stopped:  # Ctrl-C handled at a safe point
        print(stopped, file=sys.stderr)
        return stopped.exit_status
    except KeyboardInterrupt:
        if debug:
            raise
        print("\nInterrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (UserError, RunFailure) as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return error.exit_status
    except OSError as error:
        if debug:
            raise
        print(f"error: {describe_os_error(error)}", file=sys.stderr)
        # A path the user gave that is missing or forbidden is theirs to fix; a full disk or
        # an I/O error is the run's failure.
        return 2 if isinstance(error, PATH_ERRORS) else 1
    except Exception as error:  # a bug, not a user mistake: say so, keep the way to the details
        if debug:
            raise
        lines = str(error).strip().splitlines()
        print(f"error: unexpected {type(error).__name__}: {lines[0] if lines else ''}\n"
              f"This is likely a bug in dpo. Rerun with --debug (or {DEBUG_ENV}=1) for the "
              "traceback, and please report it.", file=sys.stderr)
        return 1


def describe_os_error(error: OSError) -> str:
    """What the operating system refused, naming the path and what to do about it."""
    where = f" ({error.filename})" if error.filename else ""
    if error.errno == errno.ENOSPC:
        return f"no space left on the device{where}; free some space and run again"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"not allowed to write{where}: {error.strerror}; choose another location"
    return f"{error.strerror or error}{where}"
