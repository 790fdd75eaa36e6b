"""Every bad input and fault stops with a message that names it, and loses nothing saved."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import shutil

import pytest
import torch
from conftest import train_args, train_records
from safetensors.torch import load_file

import train
from dpo_core.config.train import TrainConfig
from dpo_core.modeling import loading as model_module
from dpo_core.training.objective import PreferenceObjective
from dpo_core.training.trainer import Trainer

RUN = ("--max_steps", "4", "--save_steps", "2", "--save_total_limit", "0", "--eval_fraction",
       "0.1")


def snapshot(directory) -> dict[str, str]:
    """Every file under `directory` and a hash of its bytes."""
    found = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return found


def train_steps(out) -> list[int]:
    return [r["step"] for r in train_records(out)]


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, pairs_file, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("finished")
    assert train.main(train_args(tiny_model_dir, pairs_file, out, *RUN)) == 0
    return str(out)


@pytest.fixture()
def copy_of(tmp_path):
    def copy(run: str) -> pathlib.Path:
        return pathlib.Path(shutil.copytree(run, tmp_path / "copy"))
    return copy


@pytest.mark.parametrize("flags, message", [
    (["--beta", "0"], "--beta must be > 0"),
    (["--beta", "-0.5"], "--beta must be > 0"),
    (["--max_prompt_length", "64"],
     "--max_prompt_length (64) must be > 0 and smaller than --max_length (64)"),
    (["--max_prompt_length", "80"], "smaller than --max_length (64)"),
    (["--batch_size", "0"], "--batch_size must be >= 1"),
    (["--eval_batch_size", "-1"], "--eval_batch_size must be >= 0"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be >= 1"),
    (["--skip_nonfinite_steps", "-1"], "--skip_nonfinite_steps must be >= 0"),
    (["--model_name", "/no/such/model"], "--model_name: path '/no/such/model' does not exist"),
    (["--dataset_name", "missing.jsonl"], "--dataset_name: path 'missing.jsonl' does not exist"),
    (["--eval_dataset", "./held_out.csv"], "--eval_dataset: path './held_out.csv' does not"),
])
def test_bad_settings_are_named_and_touch_nothing(finished_run, tiny_model_dir, pairs_file,
                                                  capsys, flags, message):
    before = snapshot(finished_run)
    # Even with leave to overwrite, a setting that cannot work is refused before any write.
    args = train_args(tiny_model_dir, pairs_file, finished_run, *RUN, "--overwrite_output_dir",
                      *flags)
    assert train.main(args) == 2
    assert message in capsys.readouterr().err
    assert snapshot(finished_run) == before


def test_finished_run_is_not_overwritten(finished_run, tiny_model_dir, pairs_file, capsys):
    before = snapshot(finished_run)
    assert train.main(train_args(tiny_model_dir, pairs_file, finished_run, *RUN)) == 2
    err = capsys.readouterr().err
    assert f"--output_dir {finished_run!r} already holds a finished run" in err
    assert "--overwrite_output_dir" in err
    assert snapshot(finished_run) == before


def test_unfinished_run_is_not_restarted_over(finished_run, copy_of, tiny_model_dir, pairs_file,
                                              capsys):
    out = copy_of(finished_run)
    (out / "metrics.json").unlink()  # as if killed after its last checkpoint
    before = snapshot(out)
    assert train.main(train_args(tiny_model_dir, pairs_file, out, *RUN)) == 2
    err = capsys.readouterr().err
    assert "holds checkpoints of an unfinished run (newest: checkpoint-4)" in err
    assert "--resume_from_checkpoint latest" in err
    assert snapshot(out) == before


def test_overwrite_output_dir_starts_clean(finished_run, copy_of, tiny_model_dir, pairs_file):
    out = copy_of(finished_run)
    args = train_args(tiny_model_dir, pairs_file, out, *RUN, "--max_steps", "1",
                      "--save_steps", "0", "--overwrite_output_dir")
    assert train.main(args) == 0
    # The old run's checkpoints and log records are gone: `latest` cannot pick a stale one.
    assert not [name for name in os.listdir(out) if "checkpoint" in name]
    assert train_steps(out) == [1]
    assert json.loads((out / "metrics.json").read_text())["steps"] == 1


@pytest.mark.parametrize("target, message", [
    ("latest", "--resume_from_checkpoint latest: no checkpoint in"),
    ("{out}", "is not a checkpoint directory"),
])
def test_bad_resume_target_is_named_and_touches_nothing(finished_run, copy_of, tiny_model_dir,
                                                        pairs_file, capsys, target, message):
    out = copy_of(finished_run)
    for checkpoint in ("checkpoint-2", "checkpoint-4"):
        shutil.rmtree(out / checkpoint)
    before = snapshot(out)
    args = train_args(tiny_model_dir, pairs_file, out, *RUN, "--resume_from_checkpoint",
                      target.format(out=out))
    assert train.main(args) == 2
    assert message in capsys.readouterr().err
    assert snapshot(out) == before


def test_resume_with_another_data_order_is_refused(finished_run, copy_of, tiny_model_dir,
                                                    pairs_file, capsys):
    out = copy_of(finished_run)
    before = snapshot(out)
    # Same pairs per step, but split differently: step N would be other pairs than before.
    args = train_args(tiny_model_dir, pairs_file, out, *RUN, "--batch_size", "2",
                      "--gradient_accumulation_steps", "2", "--resume_from_checkpoint", "latest")
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "checkpoint-4' was saved with --batch_size 4 (now 2), " in err
    assert "--gradient_accumulation_steps 1 (now 2); resuming with other values" in err
    assert snapshot(out) == before


class Tampered:
    """Unpickling this would create `path`: what a malicious checkpoint could do."""

    def __init__(self, path: pathlib.Path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


def test_tampered_checkpoint_is_refused_without_running_it(finished_run, copy_of,
                                                           tiny_model_dir, pairs_file, capsys):
    out = copy_of(finished_run)
    marker = out.parent / "code-ran"
    torch.save({"state": Tampered(marker)}, out / "checkpoint-4" / "optimizer.pt")
    before = snapshot(out)
    args = train_args(tiny_model_dir, pairs_file, out, *RUN, "--resume_from_checkpoint",
                      "latest")
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "optimizer.pt' holds more than tensors and plain data; refusing to load it" in err
    assert not marker.exists()
    assert snapshot(out) == before


def test_saved_files_are_safetensors_and_plain_tensors(finished_run):
    names = snapshot(finished_run)
    assert "adapter_model.safetensors" in names
    assert "checkpoint-4/adapter/adapter_model.safetensors" in names
    assert not [n for n in names if n.endswith((".bin", ".pkl", ".pickle"))]
    for name in (n for n in names if n.endswith(".pt")):
        torch.load(os.path.join(finished_run, name), weights_only=True)


@pytest.mark.parametrize("flags, expected", [([], False), (["--trust_remote_code"], True)])
def test_trust_remote_code_only_when_asked(monkeypatch, tiny_model_dir, pairs_file, tmp_path,
                                           flags, expected):
    assert TrainConfig().trust_remote_code is False
    seen = {}
    real_model_class = model_module.AutoModelForCausalLM

    class Stop(BaseException):  # passes through the commands' error path
        pass

    class Model:
        @staticmethod
        def from_pretrained(name, **kwargs):
            seen["model"] = kwargs["trust_remote_code"]
            return real_model_class.from_pretrained(name, **kwargs)

    class Tokenizer:
        @staticmethod
        def from_pretrained(name, **kwargs):
            seen["tokenizer"] = kwargs["trust_remote_code"]
            raise Stop  # loaded after the model: both have been seen

    monkeypatch.setattr(model_module, "AutoModelForCausalLM", Model)
    monkeypatch.setattr(model_module, "AutoTokenizer", Tokenizer)
    with pytest.raises(Stop):
        train.main(train_args(tiny_model_dir, pairs_file, tmp_path / "run", *flags))
    assert seen == {"model": expected, "tokenizer": expected}


def poisoned(steps: set[int], *, in_gradient: bool):
    """An objective factory whose training loss (or only its gradient) is NaN at the given
    micro-batch calls; with one micro-batch per step, call k is step k. Evaluation calls are
    not counted."""
    calls = []

    class Poisoned(PreferenceObjective):
        def __call__(self, model, batch, reference=None):
            stats = super().__call__(model, batch, reference)
            if torch.is_grad_enabled():
                calls.append(1)
                if len(calls) in steps:
                    losses = stats["losses"]
                    if in_gradient:  # value unchanged; d sqrt(x)/dx at 0 is inf, times 0: NaN
                        losses = losses + 0.0 * torch.sqrt(losses - losses.detach())
                    else:
                        losses = losses * float("nan")
                    stats = {**stats, "losses": losses}
            return stats

    return Poisoned.from_config


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(monkeypatch, tiny_model_dir,
                                                                 pairs_file, tmp_path, capsys):
    out = tmp_path / "nan"
    args = train_args(tiny_model_dir, pairs_file, out, *RUN, "--max_steps", "6")
    assert train.main(args, make_objective=poisoned({3}, in_gradient=False)) == 1
    err = capsys.readouterr().err
    assert "step 3: loss nan" in err and "is not finite; stopping" in err
    assert f"Last good checkpoint: {out / 'checkpoint-2'}." in err
    # Nothing from before the fault is lost, nothing after it is written.
    assert train_steps(out) == [1, 2]
    assert (out / "training_config.json").is_file()
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["step"] == 2
    assert not (out / "metrics.json").exists() and not (out / "adapter_model.safetensors").exists()
    # The kept checkpoint is good: the run continues from it.
    assert train.main([*args, "--resume_from_checkpoint", "latest"]) == 0
    assert train_steps(out) == [1, 2, 3, 4, 5, 6]


def test_nonfinite_step_is_judged_before_anything_is_written(monkeypatch, tiny_model_dir,
                                                             pairs_file, tmp_path, capsys):
    """Without --skip_nonfinite_steps the host reads a step's loss and gradient norm only at
    the next logging, evaluation or checkpoint step. A NaN loss at step 5, with records every
    3 steps and checkpoints every 4: step 6 still runs, then the read at step 6 stops the run
    naming step 5, before step 6's record is written; checkpoint-4 is the last good one."""
    out = tmp_path / "deferred"
    args = train_args(tiny_model_dir, pairs_file, out, *RUN, "--max_steps", "8",
                      "--logging_steps", "3", "--save_steps", "4")
    assert train.main(args, make_objective=poisoned({5}, in_gradient=False)) == 1
    err = capsys.readouterr().err
    assert "step 5: loss nan" in err and "is not finite; stopping" in err
    assert f"Last good checkpoint: {out / 'checkpoint-4'}." in err
    assert train_steps(out) == [3]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-4"]
    # A clean run reads the device once per logging or checkpoint step, all steps since the
    # last read at once (3, then 4, then 5-6, then 7-8), and its records cover them all.
    reads = []
    settle = Trainer._settle

    def counted(self, window):
        reads.append([step for step, _ in window.pending])
        return settle(self, window)

    monkeypatch.setattr(Trainer, "_settle", counted)
    assert train.main([*args, "--overwrite_output_dir"]) == 0
    assert reads == [[1, 2, 3], [4], [5, 6], [7, 8]]
    records = train_records(out)
    assert [r["step"] for r in records] == [3, 6, 8]
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in records)


def test_out_of_device_memory_names_the_fixes_and_keeps_the_checkpoint(
        monkeypatch, tiny_model_dir, pairs_file, tmp_path, capsys):
    """A CUDA OOM in step 3 (simulated: this machine has no GPU) stops the run with exit 1,
    the settings that would make the step fit, and the last checkpoint to resume from."""
    out = tmp_path / "oom"
    args = train_args(tiny_model_dir, pairs_file, out, *RUN, "--max_steps", "6")
    calls = []

    class OutOfMemoryAtStep3(PreferenceObjective):
        def __call__(self, model, batch, reference=None):
            if torch.is_grad_enabled():
                calls.append(1)
                if len(calls) == 3:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return super().__call__(model, batch, reference)

    oom = OutOfMemoryAtStep3.from_config
    assert train.main(args, make_objective=oom) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert (f"step 3: out of device memory. Last good checkpoint: {out / 'checkpoint-2'}. "
            "Add --gradient_checkpointing") in err
    assert "and continue with --resume_from_checkpoint latest." in err
    assert ("Or start over (--overwrite_output_dir) with --batch_size 2 "
            "--gradient_accumulation_steps 2 (the same pairs per step) or a shorter "
            "--max_length (now 64).") in err
    assert train_steps(out) == [1, 2] and (out / "checkpoint-2").is_dir()
    # The advice works: the run continues from checkpoint-2 with checkpointing on.
    assert train.main([*args, "--resume_from_checkpoint", "latest",
                       "--gradient_checkpointing"]) == 0
    assert train_steps(out) == [1, 2, 3, 4, 5, 6]
    # Checkpointing already on, an odd batch: one pair per micro-batch keeps the step's pairs.
    calls.clear()
    capsys.readouterr()
    assert train.main([*args, "--overwrite_output_dir", "--gradient_checkpointing",
                       "--batch_size", "3"], make_objective=oom) == 1
    err = capsys.readouterr().err
    assert "Add --gradient_checkpointing" not in err
    assert ("Start over (--overwrite_output_dir) with --batch_size 1 "
            "--gradient_accumulation_steps 3 (the same pairs per step) or a shorter") in err


def test_skip_nonfinite_steps_skips_up_to_k(monkeypatch, tiny_model_dir, pairs_file, tmp_path,
                                            capsys):
    out = tmp_path / "skip"
    args = train_args(tiny_model_dir, pairs_file, out, *RUN, "--max_steps", "6", "--save_steps",
                      "1", "--skip_nonfinite_steps", "1")
    assert train.main(args, make_objective=poisoned({2, 4}, in_gradient=True)) == 1
    captured = capsys.readouterr()
    assert "step 2: non-finite loss or gradient, update skipped (1/1)" in captured.out
    assert "step 4: loss" in captured.err and "grad norm nan is not finite" in captured.err
    assert f"Last good checkpoint: {out / 'checkpoint-3'}." in captured.err

    def weights(step: int) -> dict[str, torch.Tensor]:
        return load_file(out / f"checkpoint-{step}" / "adapter" / "adapter_model.safetensors")

    # Step 2 changed nothing: same adapter, and AdamW still counts one update.
    assert all(torch.equal(weights(1)[k], weights(2)[k]) for k in weights(1))
    assert not all(torch.equal(weights(2)[k], weights(3)[k]) for k in weights(2))
    optimizer = torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert {s["step"].item() for s in optimizer["state"].values()} == {1.0}
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["nonfinite_steps_skipped"] == 1
    assert train_steps(out) == [1, 3]  # a skipped step has no record; step 4 was not finished
