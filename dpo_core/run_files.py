"""The files a run writes into its output_dir, and how a new run claims that directory.

One place for the names, so the trainer, the report, the chat entry point, the benchmarks
and the tests all read and write the same files:

    train_log.jsonl        one JSON record per logged step (train) or evaluation (eval)
    metrics.json           the final metrics; its presence marks a finished run
    training_config.json   every setting as asked, plus "run_plan": what actually ran
    training_curves.png    drawn from the log by `dpo_core.reporting.curves`
    samples.md             greedy replies of the base and the trained model
    checkpoint-<step>/     resumable checkpoints (`dpo_core.training.checkpoint`)
    run.lock               while a run writes here: who it is (`dpo_core.run_lock`)

and what `dpo-eval` adds (`dpo_core.evaluation`): eval.json, eval_samples.md, eval.png.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator

from dpo_core.errors import ConfigError

LOG_FILE = "train_log.jsonl"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "training_config.json"
CURVES_FILE = "training_curves.png"
SAMPLES_FILE = "samples.md"
ADAPTER_CONFIG_FILE = "adapter_config.json"
EVAL_FILE = "eval.json"
EVAL_SAMPLES_FILE = "eval_samples.md"
EVAL_PLOT_FILE = "eval.png"
LOCK_FILE = "run.lock"
# training_config.json keeps, beside the settings, what each "auto" one resolved to under this
# key; a --config file may hold it (a finished run's file fed back), and it is not a setting.
RUN_PLAN_KEY = "run_plan"
# Resumable checkpoints are `checkpoint-<step>` directories; hidden (leading dot) names are
# work in progress or being deleted, never a checkpoint.
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
PARTIAL_RE = re.compile(r"^\.checkpoint-\d+\.(tmp|old)$")
# What the final save of a run writes besides the files above: the adapter (PEFT), the
# tokenizer (the names transformers uses across tokenizer kinds), the merged model, the
# TensorBoard events. A new run clears them with the old log, so that no directory ever
# holds files of two runs (chat.py would load the old adapter beside the new config).
PREVIOUS_RUN_FILES = (
    LOG_FILE, METRICS_FILE, CURVES_FILE, SAMPLES_FILE, ADAPTER_CONFIG_FILE,
    EVAL_FILE, EVAL_SAMPLES_FILE, EVAL_PLOT_FILE,
    "adapter_model.safetensors", "adapter_model.bin", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
)

PREVIOUS_RUN_DIRS = ("merged", "tensorboard")
PEFT_MODEL_CARD = "README.md"


def checkpoint_dirs(output_dir: str) -> list[str]:
    """Complete checkpoints in `output_dir`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir)
             if (m := CHECKPOINT_RE.match(name)) and os.path.isdir(os.path.join(output_dir, name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def check_output_dir(output_dir: str, *, overwrite: bool, resuming: bool) -> None:
    """Refuse to start afresh over a finished run, or over an unfinished run's checkpoints,
    unless asked; resuming into either is fine."""
    if overwrite or resuming:
        return
    if os.path.isfile(os.path.join(output_dir, METRICS_FILE)):
        raise ConfigError(
            f"--output_dir {output_dir!r} already holds a finished run; pass "
            "--overwrite_output_dir to replace it or choose another directory"
        )
    saved = checkpoint_dirs(output_dir)
    if saved:
        raise ConfigError(
            f"--output_dir {output_dir!r} holds checkpoints of an unfinished run (newest: "
            f"{os.path.basename(saved[-1])}); pass --resume_from_checkpoint latest to continue "
            "it, --overwrite_output_dir to start over, or choose another directory"
        )
    if os.path.isfile(os.path.join(output_dir, ADAPTER_CONFIG_FILE)):
        raise ConfigError(
            f"--output_dir {output_dir!r} holds a trained adapter; pass --overwrite_output_dir "
            "to replace it or choose another directory"
        )


def clear_previous_run(output_dir: str) -> None:
    """Starting afresh in a used output_dir: remove everything an earlier run wrote there
    (log, metrics, checkpoints, adapter, tokenizer, merged model, curves, samples, dpo-eval's
    results), so that neither chat.py, the log nor `--resume_from_checkpoint latest` can mix
    two runs. The reference log-prob cache stays: it is keyed by model and data, and valid for
    any run."""
    for name in PREVIOUS_RUN_FILES:
        if os.path.isfile(os.path.join(output_dir, name)):
            os.remove(os.path.join(output_dir, name))
    card = os.path.join(output_dir, PEFT_MODEL_CARD)
    if os.path.isfile(card) and _is_peft_model_card(card):  # not a README of the user's
        os.remove(card)
    for name in PREVIOUS_RUN_DIRS:
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    for old in checkpoint_dirs(output_dir):
        shutil.rmtree(old)


def _is_peft_model_card(path: str) -> bool:
    with open(path, errors="replace") as f:
        return "library_name: peft" in f.read(4096)


@contextlib.contextmanager
def removed_if_left_empty(output_dir: str) -> Iterator[None]:
    """A start that fails before writing anything leaves no empty output_dir behind (e.g.
    the default dpo_tinyllama_model/ when the model cannot be downloaded)."""
    existed = os.path.isdir(output_dir)
    try:
        yield
    except BaseException:
        if not existed and os.path.isdir(output_dir) and not os.listdir(output_dir):
            with contextlib.suppress(OSError):  # another process may have removed it
                os.rmdir(output_dir)
        raise


def append_log(output_dir: str, record: dict) -> None:
    with open(os.path.join(output_dir, LOG_FILE), "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(output_dir: str, last_step: int) -> None:
    """Drop records logged after the checkpoint a run resumes from: they are redone."""
    path = os.path.join(output_dir, LOG_FILE)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    with open(path, "w") as f:
        f.writelines(kept)


def write_json(output_dir: str, name: str, values: dict) -> None:
    with open(os.path.join(output_dir, name), "w") as f:
        json.dump(values, f, indent=2)


def read_json(output_dir: str, name: str) -> dict | None:
    """The JSON object in output_dir/name, or None where there is no such file."""
    path = os.path.join(output_dir, name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_run_plan(output_dir: str) -> dict | None:
    """What a finished (or started) run resolved its "auto" settings to, from its
    training_config.json; None for a directory without one (or an older run)."""
    config = read_json(output_dir, CONFIG_FILE)
    return None if config is None else config.get(RUN_PLAN_KEY)
