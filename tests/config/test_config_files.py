"""--config files: the same settings as the flags, flags win, unknown keys named, and a
finished run's training_config.json reproduces it."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, train_args, train_records

import train
from dpo_core.cli import demo_presets
from dpo_core.config.fields import build_parser, load_config_file, parse_config
from dpo_core.config.train import TrainConfig
from dpo_core.errors import ConfigError
from dpo_core.run_files import read_run_plan
from dpo_core.training import host_memory


def parse(argv: list[str]) -> TrainConfig:
    return parse_config(TrainConfig, build_parser(TrainConfig, "", config_file=True), argv,
                        presets=demo_presets)


def test_file_settings_apply_and_command_line_flags_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("beta: 0.25\nbatch_size: 8\nprefix_sharing: false\nlearning_rate: 1e-4\n")
    config = parse(["--config", str(path), "--batch_size", "3"])
    assert (config.beta, config.batch_size, config.prefix_sharing) == (0.25, 3, False)
    assert config.learning_rate == 1e-4 and config.epochs == 1  # untouched: the default
    # Comma-separated settings may be YAML lists.
    path.write_text("loss_type: [sigmoid, sft]\nloss_weights: [0.8, 1]\n"
                    "lora_target_modules: [q_proj, v_proj]\n")
    config = parse(["--config", str(path)])
    assert (config.loss_type, config.loss_weights) == ("sigmoid,sft", "0.8,1")
    assert config.target_modules == ["q_proj", "v_proj"]
    config.validate()
    # JSON files are read the same way; the demo preset fills only what neither file nor
    # flags set.
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"demo": True, "beta": 0.3}))
    config = parse(["--config", str(path)])
    demo = TrainConfig(**demo_presets({"demo": True}))
    assert config.demo and config.beta == 0.3 and config.model_name == demo.model_name


@pytest.mark.parametrize("text, message", [
    ("learning_rat: 1e-4\n", "unknown setting 'learning_rat'; did you mean 'learning_rate'?"),
    ("batch_size: two\n", "batch_size must be an int, got 'two'"),
    ("beta: true\n", "beta must be a float, got True"),
    ("lr_scheduler: exp\n", "lr_scheduler must be one of cosine, linear, constant"),
    ("max_steps: null\n", "max_steps cannot be null"),
    ("- beta\n", "expected a mapping of setting: value, got a list"),
    ("beta: [0.1\n", "not valid YAML or JSON"),
])
def test_bad_config_files_are_refused_naming_file_and_key(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="--config .*bad.yaml") as error:
        parse(["--config", str(path)])
    assert message in str(error.value)
    # Through the CLI: exit 2 and the same message, no traceback.
    assert train.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_config_file_is_named(tmp_path, capsys):
    assert train.main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "examples", "configs",
                                                                "*.yaml"))))
def test_example_configs_are_valid(path):
    config = TrainConfig(**load_config_file(path, TrainConfig))
    config.validate()


def test_training_config_json_fed_back_reproduces_the_run(tiny_model_dir, pairs_file, tmp_path):
    first = tmp_path / "first"
    assert train.main(train_args(tiny_model_dir, pairs_file, first, "--max_steps", "3")) == 0
    plan = read_run_plan(str(first))
    # What ran, beside what was asked: "auto" and unset settings resolved.
    asked = json.loads((first / "training_config.json").read_text())
    assert asked["quantization"] == "auto" and plan["quantization"] == "none"
    assert asked["dtype"] == "auto" and plan["dtype"] == "float32"
    assert asked["padding_free"] is None and plan["padding_free"] is True
    # Packed rows share each prompt unless sharing is turned off.
    assert asked["prefix_sharing"] is None and plan["prefix_sharing"] == "always"
    assert plan["total_steps"] == 3 and plan["warmup_steps"] == 0
    assert plan["chat_template"] is True and plan["num_processes"] == 1
    # On by default where it can take effect: the CPU, with glibc's malloc.
    assert asked["reuse_host_memory"] is True
    assert plan["reuse_host_memory"] is (host_memory._glibc() is not None)

    again = tmp_path / "again"
    argv = ["--config", str(first / "training_config.json"), "--output_dir", str(again)]
    assert train.main(argv) == 0
    losses = [r["loss"] for r in train_records(first)]
    assert len(losses) == 3
    assert [r["loss"] for r in train_records(again)] == losses
    # The same data and data settings: the rerun finds the token ids in the tokenized cache.
    again_plan = read_run_plan(str(again))
    assert again_plan.pop("tokenized_cache") == "hit"
    plan.pop("tokenized_cache")
    assert again_plan == plan


@pytest.mark.parametrize("script, entry", [("dpo-train", "train.py"), ("dpo-chat", "chat.py"),
                                           ("dpo-report", "-m dpo_core.reporting")])
def test_console_scripts_are_the_entry_points(script, entry):
    """Installing the package gives dpo-train / dpo-chat / dpo-report, the same commands as
    the checkout's entry points."""
    installed = os.path.join(os.path.dirname(sys.executable), script)
    assert os.path.isfile(installed), f"{script} not installed beside {sys.executable}"
    run = {"capture_output": True, "text": True, "check": True, "cwd": ROOT}
    from_script = subprocess.run([installed, "--help"], **run).stdout
    from_checkout = subprocess.run([sys.executable, *entry.split(), "--help"], **run).stdout
    # argparse names the program after argv[0] in the usage block; what follows is the same.
    assert from_script.split("\n\n", 1)[1] == from_checkout.split("\n\n", 1)[1]


def test_run_plan_says_asked_only_where_the_value_differs():
    """The console block names what was asked beside a resolved value only when they differ:
    LoRA targets resolved to the names asked, in another order, are what was asked."""
    from dpo_core.training.plan import RunPlan

    fields = {f.name: None for f in dataclasses.fields(RunPlan) if f.name != "notes"}
    plan = RunPlan(**{**fields, "lora_target_modules": "k_proj,o_proj,q_proj,v_proj",
                      "max_length": 512, "total_steps": 2})
    shown = plan.describe(TrainConfig(lora_target_modules="q_proj,k_proj,v_proj,o_proj",
                                      max_length=1024, max_steps=2)).splitlines()
    assert "  lora_target_modules       k_proj,o_proj,q_proj,v_proj" in shown
    assert "  max_length                512  (asked: 1024)" in shown
    assert "  total_steps               2  (asked: --max_steps 2)" in shown
