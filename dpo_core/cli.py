"""The command lines: `python train.py` (`dpo-train`), `python chat.py` (`dpo-chat`),
`dpo-report` (`python -m dpo_core.reporting`) and `dpo-eval` (`python -m dpo_core.evaluate`).
Parsing and wiring only.

One error path: every failure the user can cause ends with a message on stderr and exit status
2 (something to fix in the command) or 1 (a run that could not go on), 130 for Ctrl-C;
`--debug` or DPO_DEBUG=1 shows the traceback instead. Heavy modules (torch, transformers,
peft) are imported only once the flags are known to be good: `--help` and flag errors need
none of them, and a run without 4-bit weights never imports bitsandbytes.
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import sys
from collections.abc import Callable

from dpo_core.config.chat import ChatConfig
from dpo_core.config.evaluation import EvalConfig
from dpo_core.config.fields import build_parser, parse_config
from dpo_core.config.train import TrainConfig
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

REPORT_DESCRIPTION = """Redraw a run's training curves from its train_log.jsonl, or compare two
runs on the same axes, and print their final train/eval metrics and run plans side by side,
and dpo-eval's results where a run has them (eval.json). (samples.md needs the model, so only
training writes it.)"""

EVAL_DESCRIPTION = """Did DPO help? Evaluate a finished run's trained model against the model it
started from (its reference), loaded as the run's plan says: preference accuracy on held-out
pairs before and after, replies of both to the same prompts (length, stops, repeats, the KL
estimate), and, with a judge, the win rate of the policy over the reference.

Writes eval.json, eval_samples.md and eval.png into RUN_DIR (or --output_dir). Runs as
`dpo-eval RUN_DIR` or `python -m dpo_core.evaluate RUN_DIR` on one device, or as
`accelerate launch --multi_gpu -m dpo_core.evaluate RUN_DIR` on many (prompts split across
processes; without GPUs they run on the CPU)."""

EVAL_EXAMPLES = """examples:
  dpo-eval demo_output --judge rule:dpo_core.demo.task:follows_rule --temperature 0
  dpo-eval dpo_tinyllama_model --reward_model Skywork/Skywork-Reward-V2-Qwen3-0.6B
  dpo-eval run_dir --eval_dataset pairs.jsonl --num_prompts 0     # pair metrics only
  dpo-eval run_dir --prompts prompts.txt --max_new_tokens 512     # replies only
  accelerate launch --multi_gpu --num_processes 2 -m dpo_core.evaluate run_dir
"""

EXAMPLES = """examples:
  python train.py --demo                                  # offline, bundled model and data
  python train.py --num_samples 2000 --epochs 1           # TinyLlama-Chat on UltraFeedback
  python train.py --config examples/configs/tinyllama_qlora_ultrafeedback.yaml
  python train.py --model_name ./my-model --dataset_name pairs.jsonl --no_quantization
  python train.py --adapter_path ./sft-adapter            # DPO from an SFT LoRA adapter
  python train.py --model_name ./small-model --finetuning_type full --no_quantization
  accelerate launch --multi_gpu --num_processes 2 train.py --batch_size 4
"""

REPORT_EXAMPLES = """examples:
  dpo-report dpo_tinyllama_model            # redraw its training_curves.png
  dpo-report run_sigmoid run_ipo            # compare two runs
  dpo-report run_a run_b --out a_vs_b.png
"""


def demo_presets(settings: dict, chat: bool = False) -> dict:
    """The demo's tuned settings (training's, or with `chat` its model and adapter) when
    `settings` ask for the demo; flags and the config file still win."""
    if not settings.get("demo"):
        return {}
    from dpo_core import demo

    return demo.CHAT_PRESETS if chat else demo.DEMO_PRESETS


def train_main(argv: list[str] | None = None, *,
               make_objective: Callable | None = None) -> int:
    """`python train.py` / `dpo-train`: returns the exit status. argv None means this
    process's own command line (the process is the command: its imports may be steered).
    `make_objective`: what the run trains on (`dpo_core.training.trainer.train`), for code
    that drives the command line and brings its own objective."""
    return run_command(functools.partial(_train, make_objective=make_objective), argv)


def chat_main(argv: list[str] | None = None) -> int:
    """`python chat.py` / `dpo-chat`: returns the exit status (argv as for `train_main`)."""
    return run_command(_chat, argv)


def report_main(argv: list[str] | None = None) -> int:
    """`dpo-report` / `python -m dpo_core.reporting`: returns the exit status."""
    return run_command(_report, argv)


def eval_main(argv: list[str] | None = None) -> int:
    """`dpo-eval` / `python -m dpo_core.evaluate`: returns the exit status."""
    return run_command(_eval, argv)


def _quantization(setting: str, argv: list[str] | None, full_finetuning: bool = False) -> bool:
    """Whether the base weights load in 4-bit. When they do not, a command-line run (argv
    None) keeps bitsandbytes from being imported at all (`avoid_bitsandbytes`)."""
    from dpo_core.modeling.loading import avoid_bitsandbytes, resolve_quantization

    quantize = resolve_quantization(setting, full_finetuning)
    if argv is None and not quantize:
        avoid_bitsandbytes()
    return quantize


def train_parser() -> argparse.ArgumentParser:
    """`train.py`'s flags: one per `TrainConfig` field, plus `--config FILE`."""
    return build_parser(TrainConfig, TRAIN_DESCRIPTION, EXAMPLES, config_file=True)


def chat_parser() -> argparse.ArgumentParser:
    """`chat.py`'s flags: one per `ChatConfig` field."""
    return build_parser(ChatConfig, CHAT_DESCRIPTION)


def _train(argv: list[str] | None, make_objective: Callable | None = None) -> int:
    config = parse_config(TrainConfig, train_parser(), argv, presets=demo_presets)
    config.validate()  # bad flags are refused before the heavy imports below
    _quantization(config.quantization, argv, config.finetuning_type == "full")
    from accelerate import PartialState

    from dpo_core.training.trainer import train

    hook = None
    if config.demo:
        from dpo_core.demo import demo_evaluation

        hook = demo_evaluation
    metrics = train(config, evaluation_hook=hook,
                    **({"make_objective": make_objective} if make_objective else {}))
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
    config = parse_config(ChatConfig, chat_parser(), argv,
                          presets=lambda settings: demo_presets(settings, chat=True))
    config.validate()
    quantize = _quantization(config.quantization, argv)
    from dpo_core.chat import ChatSession, interactive
    from dpo_core.modeling.adapters import load_inference_model
    from dpo_core.modeling.loading import load_tokenizer, resolve_dtype

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


def eval_parser() -> argparse.ArgumentParser:
    return build_parser(EvalConfig, EVAL_DESCRIPTION, EVAL_EXAMPLES)


def _eval(argv: list[str] | None) -> int:
    config = parse_config(EvalConfig, eval_parser(), argv)
    config.validate()
    from dpo_core.evaluation.run import read_run

    run = read_run(config.run_dir)  # a bad directory is said before the heavy imports
    _quantization(config.quantization or run.plan.get("quantization") or "none", argv,
                  run.full_finetuning)
    from dpo_core.console import configure_console
    from dpo_core.evaluation.evaluator import evaluate_run
    from dpo_core.reporting.eval_report import format_eval_table
    from dpo_core.run_files import EVAL_FILE, EVAL_PLOT_FILE, EVAL_SAMPLES_FILE

    configure_console()
    result = evaluate_run(config, run)
    if result is None:  # not the main process of a launch
        return 0
    print(format_eval_table(result))
    print(f"Wrote {', '.join((EVAL_FILE, EVAL_SAMPLES_FILE, EVAL_PLOT_FILE))} to "
          f"{config.destination}")
    return 0


def report_parser() -> argparse.ArgumentParser:
    from dpo_core.run_files import CURVES_FILE

    parser = argparse.ArgumentParser(
        prog="dpo-report", description=REPORT_DESCRIPTION, epilog=REPORT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="a training --output_dir holding train_log.jsonl")
    parser.add_argument("other_dir", nargs="?",
                        help="a second run to compare with the first (same axes, labelled by "
                             "directory name)")
    parser.add_argument("--out", help="where to write the PNG (default: OUTPUT_DIR/"
                                      f"{CURVES_FILE} for one run, ./compare_A_vs_B.png for two)")
    return parser


def _report(argv: list[str] | None) -> int:
    from dpo_core.reporting.curves import (
        format_final_metrics,
        load_run,
        plot_runs,
        read_before_after,
        run_labels,
    )
    from dpo_core.reporting.eval_report import format_eval_table, read_eval
    from dpo_core.run_files import CURVES_FILE, EVAL_PLOT_FILE, EVAL_SAMPLES_FILE, read_run_plan

    args = report_parser().parse_args(argv)
    dirs = [d for d in (args.output_dir, args.other_dir) if d]
    runs = {label: load_run(d) for label, d in zip(run_labels(dirs), dirs, strict=True)}
    if args.out:
        path = args.out
    elif len(dirs) == 1:
        path = os.path.join(args.output_dir, CURVES_FILE)
    else:
        path = "compare_" + "_vs_".join(
            os.path.basename(os.path.normpath(d)) for d in dirs) + ".png"
    # One run is redrawn as training drew it, with its before/after panel if it has one.
    plot_runs(runs, path, read_before_after(args.output_dir) if len(dirs) == 1 else None)
    plans = {label: read_run_plan(d) for label, d in zip(runs, dirs, strict=True)}
    print(format_final_metrics(runs, plans))
    for directory in dirs:
        if (evaluation := read_eval(directory)) is not None:
            print(f"\n{format_eval_table(evaluation)}\n(dpo-eval's {EVAL_SAMPLES_FILE} and "
                  f"{EVAL_PLOT_FILE} are in {directory})")
    print(f"Wrote {path}")
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
