"""Run reports: curves from train_log.jsonl, run comparison, samples.md, trackers, and every
--loss_type through the real training loop."""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
from conftest import ROOT, table_rows, train_args
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import train
from dpo_core import run_files
from dpo_core.cli import report_main, report_parser
from dpo_core.config.fields import load_config_file
from dpo_core.config.train import TrainConfig
from dpo_core.errors import ConfigError
from dpo_core.modeling.generation import generate_replies
from dpo_core.reporting import curves, samples, trackers

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# Two steps are enough to exercise the loop, the log and the reports.
TWO_STEPS = ("--max_steps", "2")


def train_record(step: int, loss: float, margin: float, lr: float) -> dict:
    return {"step": step, "split": "train", "epoch": step / 4, "loss": loss,
            "rewards/chosen": margin / 2, "rewards/rejected": -margin / 2,
            "rewards/accuracies": 0.5 + margin, "rewards/margins": margin,
            "logps/chosen": -20.0 - step, "logps/rejected": -21.0 - 2 * step,
            "grad_norm": 1.0, "learning_rate": lr, "tokens_per_second": 100.0}


def eval_record(step: int, loss: float, margin: float) -> dict:
    record = train_record(step, loss, margin, 0.0)
    for key in ("epoch", "grad_norm", "learning_rate", "tokens_per_second"):
        del record[key]
    return {**record, "split": "eval"}


def write_log(directory, records: list[dict]) -> str:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, run_files.LOG_FILE), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(directory)


RUN_A = [train_record(1, 0.69, 0.0, 1e-3), train_record(2, 0.6, 0.1, 2e-3),
         eval_record(2, 0.65, 0.05), train_record(3, 0.5, 0.3, 1e-3), eval_record(3, 0.55, 0.2)]
RUN_B = [train_record(1, 0.69, 0.0, 1e-3), train_record(2, 0.4, 0.4, 1e-3),
         eval_record(2, 0.45, 0.35)]


def drawn(series: list[curves.Series], run: str, split: str, metric: str):
    matches = [(s.steps, s.values) for s in series
               if (s.run, s.split, s.metric) == (run, split, metric)]
    assert len(matches) <= 1
    return matches[0] if matches else None


def assert_png(path) -> None:
    """A PNG of the whole 16 x 8.5 inch figure at 100 dpi, with real content."""
    with open(path, "rb") as f:
        header = f.read(24)
    assert header[:8] == PNG_MAGIC
    width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
    assert (width, height) == (1600, 850)
    assert os.path.getsize(path) > 20_000


def test_curves_plot_the_log_values(tmp_path):
    run = write_log(tmp_path / "run_a", RUN_A)
    series = curves.write_training_curves(run)
    assert_png(tmp_path / "run_a" / run_files.CURVES_FILE)
    assert drawn(series, "run_a", "train", "loss") == ([1, 2, 3], [0.69, 0.6, 0.5])
    assert drawn(series, "run_a", "eval", "loss") == ([2, 3], [0.65, 0.55])
    assert drawn(series, "run_a", "train", "rewards/margins") == ([1, 2, 3], [0.0, 0.1, 0.3])
    assert drawn(series, "run_a", "eval", "rewards/accuracies") == ([2, 3], [0.55, 0.7])
    assert drawn(series, "run_a", "train", "logps/chosen") == ([1, 2, 3], [-21.0, -22.0, -23.0])
    assert drawn(series, "run_a", "eval", "logps/rejected") == ([2, 3], [-25.0, -27.0])
    assert drawn(series, "run_a", "train", "learning_rate") == ([1, 2, 3], [1e-3, 2e-3, 1e-3])
    # Eval records carry no learning rate: nothing drawn rather than a made-up line.
    assert drawn(series, "run_a", "eval", "learning_rate") is None
    # Every panel metric, both splits (eval has all but the learning rate).
    assert len(series) == 2 * 8 - 1


def test_compare_two_runs(tmp_path, capsys, monkeypatch):
    a = write_log(tmp_path / "sigmoid", RUN_A)
    b = write_log(tmp_path / "ipo", RUN_B)
    series = curves.plot_runs({"sigmoid": curves.load_run(a), "ipo": curves.load_run(b)},
                              str(tmp_path / "both.png"))
    assert_png(tmp_path / "both.png")
    assert drawn(series, "sigmoid", "train", "loss") == ([1, 2, 3], [0.69, 0.6, 0.5])
    assert drawn(series, "ipo", "train", "loss") == ([1, 2], [0.69, 0.4])
    assert drawn(series, "ipo", "eval", "rewards/margins") == ([2], [0.35])

    monkeypatch.chdir(tmp_path)
    assert report_main([a, b]) == 0
    out = capsys.readouterr().out
    assert_png(tmp_path / "compare_sigmoid_vs_ipo.png")
    assert "Wrote compare_sigmoid_vs_ipo.png" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    assert rows["metric"] == ["sigmoid", "ipo"]
    assert rows["train"] == ["step", "3", "2"]  # "train step" row
    assert rows["train/loss"] == ["0.5", "0.4"]
    assert rows["eval/loss"] == ["0.55", "0.45"]
    assert rows["eval/rewards/margins"] == ["0.2", "0.35"]


def test_compare_shows_what_each_run_resolved(tmp_path, capsys, monkeypatch):
    a = write_log(tmp_path / "a", RUN_A)
    b = write_log(tmp_path / "b", RUN_B)
    plan = {"dtype": "float32", "prefix_sharing": "per batch", "total_steps": 3}
    (tmp_path / "a" / run_files.CONFIG_FILE).write_text(json.dumps({"beta": 0.1,
                                                                     "run_plan": plan}))
    monkeypatch.chdir(tmp_path)
    assert report_main([a, b]) == 0  # b predates run plans: its column says "-"
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()
            if line.strip()}
    assert rows["plan/dtype"] == ["float32", "-"]
    assert rows["plan/prefix_sharing"] == ["per", "batch", "-"]
    assert rows["plan/total_steps"] == ["3", "-"]


def test_report_cli_redraws_and_explains(tmp_path):
    run = write_log(tmp_path / "run", RUN_B)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "dpo_core.reporting", run], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True)
    png = os.path.join(run, run_files.CURVES_FILE)
    assert f"Wrote {png}" in done.stdout
    assert_png(png)
    help_text = report_parser().format_help()
    assert "OTHER_DIR" in help_text.upper() and "--out" in help_text and "compare" in help_text


def test_report_cli_names_bad_input(tmp_path, capsys):
    assert report_main([str(tmp_path / "missing")]) == 2
    assert "no train_log.jsonl here" in capsys.readouterr().err
    run = tmp_path / "bad"
    run.mkdir()
    (run / run_files.LOG_FILE).write_text(json.dumps(RUN_A[0]) + "\n{not json\n")
    assert report_main([str(run)]) == 2
    assert "train_log.jsonl, line 2: not JSON" in capsys.readouterr().err


def test_samples_cells_are_escaped():
    assert samples.markdown_cell(" a|b\n<c> & d\r\ne\u2028f ") == \
        "a\\|b<br>&lt;c&gt; &amp; d<br>e<br>f"
    assert samples.markdown_cell("  ") == "*(empty)*"
    text = samples.format_samples(
        ["hi", [{"role": "system", "content": "be brief"}, {"role": "user", "content": "yo"}]],
        ["x", ""], ["y", "z"], use_chat_template=True, max_new_tokens=8)
    assert "| 1 | hi | x | y |" in text
    assert "| 2 | **system**: be brief<br>**user**: yo | *(empty)* | z |" in text


def test_training_writes_curves_and_samples(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "run"
    assert train.main(train_args(tiny_model_dir, pairs_file, out, *TWO_STEPS,
                                 "--num_sample_prompts", "3", "--sample_max_new_tokens", "12")) == 0
    log = curves.read_log(str(out / run_files.LOG_FILE))
    assert_png(out / run_files.CURVES_FILE)
    assert [r["step"] for r in log if r["split"] == "train"] == [1, 2]

    rows = table_rows((out / run_files.SAMPLES_FILE).read_text())
    assert [row[0] for row in rows] == ["1", "2", "3"] and all(len(r) == 4 for r in rows)
    # The columns are the plain base model's and the saved adapter's greedy replies.
    prompts = [row[1] for row in rows]  # plain words: the cell is the prompt itself
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    options = {"use_chat_template": True, "max_new_tokens": 12}
    base_replies = generate_replies(base, tokenizer, prompts, **options)
    trained = PeftModel.from_pretrained(base, str(out))
    trained_replies = generate_replies(trained, tokenizer, prompts, **options)
    assert [row[2] for row in rows] == [samples.markdown_cell(r) for r in base_replies]
    assert [row[3] for row in rows] == [samples.markdown_cell(r) for r in trained_replies]


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                    reason="tensorboard not installed (pip install 'dpo-core[tensorboard]')")
def test_report_to_tensorboard_logs_the_records(tiny_model_dir, pairs_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert train.main(train_args(tiny_model_dir, pairs_file, out, *TWO_STEPS,
                                 "--report_to", "tensorboard")) == 0
    event_files = glob.glob(str(out / "tensorboard" / "dpo" / "events.out.tfevents.*"))
    assert len(event_files) == 1
    events = EventAccumulator(event_files[0])
    events.Reload()
    log = curves.read_log(str(out / run_files.LOG_FILE))
    for record in log:
        for name, value in trackers.tracker_values(record).items():
            logged = {e.step: e.value for e in events.Scalars(name)}
            assert logged[record["step"]] == pytest.approx(value, rel=1e-6), name
    assert "eval/loss" in events.Tags()["scalars"] and "train/grad_norm" in events.Tags()["scalars"]


@pytest.mark.parametrize("tracker, check", [("tensorboard", "is_tensorboard_available"),
                                            ("wandb", "is_wandb_available")])
def test_missing_tracker_package_is_named(tiny_model_dir, pairs_file, tmp_path, capsys,
                                          monkeypatch, tracker, check):
    monkeypatch.setattr(trackers, check, lambda: False)
    assert train.main(train_args(tiny_model_dir, pairs_file, tmp_path / "x", *TWO_STEPS,
                                 "--report_to", tracker)) == 2
    assert (f"--report_to {tracker} needs the {tracker} package: pip install 'dpo-core[{tracker}]'"
            in capsys.readouterr().err)


# Step 1 trains a zero-initialised adapter: the policy is the reference, every reference-based
# reward is 0, and the loss is the loss at h = 0.
LN2 = math.log(2)


@pytest.mark.parametrize("flags, first_loss", [
    (["--loss_type", "sigmoid", "--label_smoothing", "0.1"], LN2),
    (["--loss_type", "robust", "--label_smoothing", "0.1"], LN2),
    (["--loss_type", "ipo"], (1 / (2 * 0.1)) ** 2),
    (["--loss_type", "hinge"], 1.0),
    (["--loss_type", "rpo"], None),
    (["--loss_type", "simpo", "--beta", "2"], None),
    (["--loss_type", "sigmoid", "--reference_free"], None),
])
def test_every_loss_trains_end_to_end(tiny_model_dir, pairs_file, tmp_path, flags, first_loss):
    out = tmp_path / "run"
    assert train.main(train_args(tiny_model_dir, pairs_file, out, *TWO_STEPS, *flags)) == 0
    log = curves.read_log(str(out / run_files.LOG_FILE))
    assert [(r["split"], r["step"]) for r in log] == [("train", 1), ("train", 2), ("eval", 2)]
    assert all(math.isfinite(v) for r in log for k, v in r.items() if k != "split")
    first = log[0]
    config = TrainConfig(**load_config_file(str(out / "training_config.json"), TrainConfig))
    if first_loss is not None:
        assert first["loss"] == pytest.approx(first_loss, rel=1e-5)
    if config.loss_type == "simpo":
        # beta * mean per-token log-prob: negative, and not tied to any reference.
        assert first["rewards/chosen"] < 0 and first["rewards/rejected"] < 0
    elif config.reference_free:
        # Reference log-probs are 0: every reward is beta * the summed policy log-prob.
        for record in log:
            for side in ("chosen", "rejected"):
                assert record[f"rewards/{side}"] == pytest.approx(
                    config.beta * record[f"logps/{side}"], rel=1e-5)
    else:
        assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
        assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    if config.loss_type == "rpo":
        # DPO's ln 2 plus the chosen response's mean per-token NLL, which is positive.
        assert first["loss"] > LN2 + 0.1


@pytest.mark.parametrize("flags, message", [
    (["--loss_type", "simpo", "--label_smoothing", "0.1"],
     "--label_smoothing 0.1 has no effect with --loss_type simpo"),
    (["--loss_type", "ipo", "--label_smoothing", "0.1"],
     "--label_smoothing 0.1 has no effect with --loss_type ipo"),
    (["--label_smoothing", "0.5"], "--label_smoothing must be in [0, 0.5)"),
    (["--loss_type", "rpo", "--rpo_alpha", "-1"], "--rpo_alpha must be a finite number >= 0"),
    (["--loss_type", "simpo", "--simpo_gamma", "-0.5"], "--simpo_gamma must be a finite number"),
    (["--loss_type", "simpo", "--precompute_ref_log_probs"],
     "--loss_type simpo uses no reference model: drop --precompute_ref_log_probs"),
    (["--reference_free", "--precompute_ref_log_probs"],
     "--reference_free uses no reference model: drop --precompute_ref_log_probs"),
    (["--num_sample_prompts", "-1"], "--num_sample_prompts must be >= 0"),
])
def test_invalid_loss_settings_are_refused(tiny_model_dir, pairs_file, tmp_path, capsys, flags,
                                           message):
    args = train_args(tiny_model_dir, pairs_file, tmp_path / "x", *TWO_STEPS, *flags)
    assert train.main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_simpo_with_reference_free_is_accepted():
    # SimPO never uses a reference, so asking for none is redundant, not contradictory.
    TrainConfig(loss_type="simpo", reference_free=True, beta=2.0).validate()
    with pytest.raises(ConfigError, match="--rpo_alpha"):
        TrainConfig(loss_type="rpo", rpo_alpha=float("nan")).validate()
