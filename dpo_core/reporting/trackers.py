"""Experiment trackers (`--report_to tensorboard|wandb`) through Accelerate: the run's
settings and plan as hyperparameters, and every train_log.jsonl record under `train/` and
`eval/` names."""

from __future__ import annotations

import dataclasses
import os

from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, is_tensorboard_available, is_wandb_available

from dpo_core.config.fields import TRACKERS
from dpo_core.config.train import TrainConfig
from dpo_core.errors import ConfigError

TRACKER_PROJECT = "dpo"  # the wandb project; TensorBoard writes to output_dir/tensorboard/dpo

TENSORBOARD_DIR = "tensorboard"


# -- experiment trackers ----------------------------------------------------------------------
def check_tracker_installed(report_to: str) -> None:
    """ConfigError naming the pip command when the tracker's package is missing.

    Accelerate itself only logs a debug line and drops a tracker it cannot import, so a run
    asked to report to TensorBoard would otherwise finish without writing anything.
    """
    available = {"none": lambda: True, "tensorboard": is_tensorboard_available,
                 "wandb": is_wandb_available}
    if report_to not in available:
        raise ConfigError(f"--report_to must be one of {', '.join(TRACKERS)}, got {report_to!r}")
    if not available[report_to]():
        raise ConfigError(f"--report_to {report_to} needs the {report_to} package: "
                          f"pip install 'dpo-core[{report_to}]'")


def tracker_options(report_to: str, output_dir: str) -> dict:
    """Keyword arguments for `Accelerator(...)` that enable the tracker (none: {})."""
    check_tracker_installed(report_to)
    if report_to == "none":
        return {}
    project = ProjectConfiguration(project_dir=output_dir,
                                   logging_dir=os.path.join(output_dir, TENSORBOARD_DIR))
    return {"log_with": report_to, "project_config": project}


def start_trackers(accelerator: Accelerator, config: TrainConfig, run_plan: dict) -> None:
    """Open the tracker run with every setting, and what each "auto" one resolved to
    ("run_plan/..."; the plan's notes as one text), as its hyperparameters (no-op without
    one); a wandb run is named after the output directory."""
    run_name = os.path.basename(os.path.abspath(config.output_dir))
    # Hyperparameters are scalars (TensorBoard refuses lists).
    hyperparameters = {**dataclasses.asdict(config), **{
        f"run_plan/{name}": "\n".join(value) if isinstance(value, list) else value
        for name, value in run_plan.items()}}
    accelerator.init_trackers(TRACKER_PROJECT, config=hyperparameters,
                              init_kwargs={"wandb": {"name": run_name}})


def tracker_values(record: dict) -> dict[str, float]:
    """A train_log.jsonl record under tracker names: "train/loss", "eval/rewards/margins", ..."""
    return {f"{record['split']}/{key}": value for key, value in record.items()
            if key not in ("step", "split")}
