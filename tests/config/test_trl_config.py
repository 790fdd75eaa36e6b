"""--config reads a trl-style DPOConfig YAML: trl's keys mapped to this program's settings
(said once, each mapping), trl keys without a counterpart refused by name, and a run from such
a file."""

from __future__ import annotations

import json
import math

import pytest
from conftest import train_args
from test_config_files import parse

import train
from dpo_core.errors import ConfigError


def write(tmp_path, text: str) -> str:
    path = tmp_path / "dpo.yaml"
    path.write_text(text)
    return str(path)


TRL_STYLE = """
model_name_or_path: org/some-model
dataset_name: org/some-preferences
dataset_train_split: train_prefs
per_device_train_batch_size: 3
per_device_eval_batch_size: 6
num_train_epochs: 2
gradient_accumulation_steps: 8
learning_rate: 5.0e-7
lr_scheduler_type: constant_with_warmup
warmup_ratio: 0.1
max_length: 512
beta: 0.05
loss_type: [sigmoid, sft]
loss_weights: [1.0, 0.5]
bf16: true
fp16: false
use_peft: false
precompute_ref_batch_size: 32
pad_to_multiple_of: auto
use_weighting: true
sync_ref_model: false
ref_model_mixup_alpha: 0.6
max_steps: -1
eval_steps: null
dataset_num_proc: 2
router_aux_loss_coef: 0.001
"""


def test_trl_style_yaml_is_read_with_each_mapping_said(tmp_path, capsys):
    config = parse(["--config", write(tmp_path, TRL_STYLE)])
    assert (config.model_name, config.dataset_name, config.dataset_split) == (
        "org/some-model", "org/some-preferences", "train_prefs")
    assert (config.batch_size, config.eval_batch_size, config.epochs) == (3, 6, 2.0)
    assert (config.gradient_accumulation_steps, config.learning_rate) == (8, 5e-7)
    assert (config.lr_scheduler, config.warmup_ratio, config.max_length) == ("constant", 0.1,
                                                                             512)
    assert (config.beta, config.loss_type, config.loss_weights) == (0.05, "sigmoid,sft",
                                                                    "1.0,0.5")
    assert (config.dtype, config.finetuning_type, config.ref_batch_size) == ("bfloat16", "full",
                                                                             32)
    assert config.pad_to_multiple_of is None and config.use_weighting
    assert (config.max_steps, config.eval_steps) == (0, 50)  # 50: our default
    assert (config.tokenize_num_proc, config.router_aux_loss_coef) == (2, 0.001)
    out = capsys.readouterr().out
    for said in ("model_name_or_path -> model_name", "dataset_train_split -> dataset_split",
                 "per_device_train_batch_size -> batch_size",
                 "per_device_eval_batch_size -> eval_batch_size", "num_train_epochs -> epochs",
                 "lr_scheduler_type -> lr_scheduler 'constant'", "bf16 -> dtype 'bfloat16'",
                 "fp16: False left out", "use_peft -> finetuning_type 'full'",
                 "precompute_ref_batch_size -> ref_batch_size",
                 "pad_to_multiple_of: 'auto' left out", "max_steps -> max_steps 0",
                 "eval_steps: None left out", "dataset_num_proc -> tokenize_num_proc"):
        assert said in out
    assert "beta ->" not in out  # trl's name and ours: nothing to say


@pytest.mark.parametrize("text, message", [
    ("optim: adamw_torch\n", "trl's 'optim' has no counterpart here: this project always "
                             "trains with AdamW"),
    ("eval_strategy: steps\n", "trl's 'eval_strategy' has no counterpart here"),
    ("dataset_test_split: test\n", "use --eval_dataset or --eval_fraction; remove it (the "
                                   "closest setting here is 'dataset_split')"),
    ("batch_size: 2\nper_device_train_batch_size: 4\n",
     "both 'per_device_train_batch_size' (trl's name) and 'batch_size' are given"),
    ("per_device_train_batch_size: two\n", "batch_size must be an int, got 'two'"),
    ("num_train_epoch: 1\n", "unknown setting 'num_train_epoch'"),
])
def test_trl_keys_without_a_counterpart_are_refused_by_name(tmp_path, text, message):
    with pytest.raises(ConfigError, match="--config .*dpo.yaml") as error:
        parse(["--config", write(tmp_path, text)])
    assert message in str(error.value)


def test_trl_name_of_ref_batch_size_is_a_flag_too():
    assert parse(["--precompute_ref_batch_size", "12"]).ref_batch_size == 12


def test_two_steps_from_a_trl_style_file(tiny_model_dir, pairs_file, tmp_path):
    """LD-DPO with reference log-probs computed before training, from trl's keys: step 1 is
    ln 2 only if the cached reference values carry the same LD weighting as the policy's."""
    path = write(tmp_path, """
per_device_eval_batch_size: 3
lr_scheduler_type: linear
ld_alpha: 0.5
precompute_ref_log_probs: true
precompute_ref_batch_size: 8
pad_to_multiple_of: 8
""")
    out = tmp_path / "run"
    args = train_args(tiny_model_dir, pairs_file, out, "--max_steps", "2", "--config", path)
    assert train.main(args) == 0
    saved = json.loads((out / "training_config.json").read_text())
    assert (saved["eval_batch_size"], saved["ref_batch_size"], saved["lr_scheduler"]) == (
        3, 8, "linear")
    assert (saved["ld_alpha"], saved["pad_to_multiple_of"]) == (0.5, 8)
    assert saved["run_plan"]["precompute_ref_log_probs"] is True
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert log[1]["loss"] != log[0]["loss"]
