"""The training run `dpo-eval` evaluates, as its output_dir records it; torch-free, so a bad
directory is reported before anything heavy is imported.

A finished run holds training_config.json (every setting, plus under "run_plan" what each "auto"
one resolved to: dtype, 4-bit, chat template, forward path, ...), and what it trained: the LoRA
adapter (adapter_config.json + weights) or, for full fine-tuning, the whole model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from dpo_core.config.train import TrainConfig
from dpo_core.errors import EvaluationError
from dpo_core.run_files import ADAPTER_CONFIG_FILE, CONFIG_FILE, METRICS_FILE, RUN_PLAN_KEY

MODEL_CONFIG_FILE = "config.json"  # what save_pretrained writes beside a whole model


@dataclass(frozen=True)
class TrainedRun:
    """A run directory, its settings as recorded and its run plan (a dict, as saved)."""

    directory: str
    config: TrainConfig
    plan: dict

    @property
    def full_finetuning(self) -> bool:
        return self.config.finetuning_type == "full"

    def describe_reference(self) -> str:
        """What the reference of this run is, in words (the same network training used)."""
        if self.full_finetuning:
            return f"the starting model {self.config.model_name} (reloaded)"
        if self.config.adapter_path:
            return f"the starting adapter {self.config.adapter_path} (frozen copy)"
        return f"the base model {self.config.model_name} (adapter switched off)"


def read_run(directory: str) -> TrainedRun:
    """The run in `directory`; EvaluationError saying what is missing and what to do when it
    is not a training output_dir, has no run plan, or holds no trained weights."""
    if not os.path.isdir(directory):
        raise EvaluationError(f"{directory!r} is not a directory: pass the --output_dir of a "
                              "train.py run")
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise EvaluationError(f"{directory}: no {CONFIG_FILE} here; pass the --output_dir of a "
                              "train.py run")
    try:
        with open(path) as f:
            recorded = json.load(f)
    except (OSError, ValueError) as error:
        raise EvaluationError(f"{path}: cannot be read as JSON ({error})") from None
    plan = recorded.get(RUN_PLAN_KEY) if isinstance(recorded, dict) else None
    if not isinstance(plan, dict):
        raise EvaluationError(
            f"{path} has no run plan ('{RUN_PLAN_KEY}'): it was not written by a train.py run of "
            "this version, which records how the model was loaded (dtype, 4-bit, chat template, "
            "forward path). Train the run again with this version, then evaluate it.")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in recorded.items() if k in fields})
    run = TrainedRun(directory, config, plan)
    _check_trained_weights(run)
    return run


def _check_trained_weights(run: TrainedRun) -> None:
    marker = MODEL_CONFIG_FILE if run.full_finetuning else ADAPTER_CONFIG_FILE
    if os.path.isfile(os.path.join(run.directory, marker)):
        return
    trained = "model" if run.full_finetuning else "adapter"
    unfinished = "" if os.path.isfile(os.path.join(run.directory, METRICS_FILE)) else (
        f" The run did not finish (no {METRICS_FILE}): continue it with `python train.py "
        f"--config {os.path.join(run.directory, CONFIG_FILE)} --resume_from_checkpoint latest`.")
    raise EvaluationError(f"{run.directory} holds no trained {trained} (no {marker}).{unfinished}")
