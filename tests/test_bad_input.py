"""The adversarial suite: every kind of mistake a user makes ends with exit status 1 or 2 and a
message naming the thing (file and 1-based line or row, field, flag, checkpoint) and what to
do, never a traceback; nothing saved is lost. One test (or parametrized case) per kind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import datasets
import pytest
import torch
from conftest import ROOT, learnable_pairs, train_args

import chat
import train
from dpo_core import cli
from dpo_core.data.pairs import IDENTICAL_REPLIES, load_pairs
from dpo_core.errors import DataError

GOOD = {"prompt": "p", "chosen": "yes", "rejected": "no"}


def jsonl(*lines: str) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def row(**fields) -> str:
    return json.dumps({**GOOD, **fields})


def no_traceback(err: str) -> None:
    assert "Traceback" not in err and 'File "' not in err, err


# -- data files: (file name, bytes, the message's exact tail after "<path>: ") ---------------

BAD_FILES = [
    ("empty", "rows.jsonl", b"", "the file is empty"),
    ("blank lines", "rows.jsonl", b"\n  \n\n", "the file holds only blank lines, no rows"),
    ("malformed line mid-file", "rows.jsonl", jsonl(row(), row(), '{"prompt": "p", "chosen": ',
                                                    row()),
     "line 3: not valid JSON (Expecting value at column 27) (--skip_bad_rows drops such rows)"),
    ("not utf-8", "rows.jsonl", jsonl(row(), row()) + b'{"prompt": "caf\xe9", "chosen": "a"}\n',
     "line 3, column 16: byte 0xe9 is not UTF-8; save the file with UTF-8 encoding"),
    ("a line that is not an object", "rows.jsonl", jsonl(row(), "[1, 2]"),
     "line 2: not a JSON object (got an array; one row per object, with 'prompt', 'chosen' "
     "and 'rejected' keys) (--skip_bad_rows drops such rows)"),
    ("wrong columns", "rows.jsonl", jsonl('{"question": "q", "answer": "a"}'),
     "no column 'chosen', 'rejected' (columns: question, answer; expected 'chosen' and "
     "'rejected', and 'prompt' unless the rows are HH dialogues)"),
    ("missing key", "rows.jsonl", jsonl(row(), row(), '{"prompt": "p", "rejected": "r"}'),
     "line 3, field 'chosen': is missing"),
    ("null value", "rows.jsonl", jsonl(row(), row(chosen=None)),
     "line 2, field 'chosen': is None"),
    ("missing prompt where the file has a prompt column", "rows.jsonl",
     jsonl(row(), '{"chosen": "a", "rejected": "b"}'), "line 2, field 'prompt': is missing"),
    ("line numbers count blank lines", "rows.jsonl", jsonl(row(), "", "", row(rejected="")),
     "line 4, field 'rejected': is empty"),
    ("json array element, by the line it starts on", "rows.json",
     b'[\n  {"prompt": "p", "chosen": "a", "rejected": "b"},\n  {"prompt": "p",\n'
     b'   "chosen": 5, "rejected": "b"}\n]\n',
     "line 3, field 'chosen': must be a string, got int"),
    ("malformed json array", "rows.json", b'[\n  {"prompt": "p", "chosen": "a"}\n  {"x": 1}\n]',
     "line 3, column 3: not valid JSON (expected ',' or ']' after an array element)"),
    ("one object over several lines", "rows.json", b'{\n "prompt": "p",\n "chosen": "a"\n}\n',
     "one JSON object spanning several lines; expected a JSON array of rows ([{...}, {...}]) "
     "or JSON Lines (one row object per line)"),
    ("empty json array", "rows.json", b"[]", "the file holds no rows (an empty JSON array)"),
    ("csv row as a spreadsheet numbers it", "rows.csv",
     b"prompt,chosen,rejected\np,a,b\np,a,b\np,,b\n",
     "row 4 (header = row 1), field 'chosen': is empty"),
    ("csv row with the wrong number of fields", "rows.csv",
     b"prompt,chosen,rejected\np,a,b\np,a\n",
     "row 3 (header = row 1): wrong number of fields (2; the header has 3) (--skip_bad_rows "
     "drops such rows)"),
    ("csv header only", "rows.csv", b"prompt,chosen,rejected\n",
     "the file holds a header (prompt, chosen, rejected) but no rows"),
    ("csv not utf-8", "rows.csv", b"prompt,chosen,rejected\np,\xff,b\n",
     "line 2, column 3: byte 0xff is not UTF-8; save the file with UTF-8 encoding"),
]


@pytest.mark.parametrize(("name", "content", "message"), [c[1:] for c in BAD_FILES],
                         ids=[c[0] for c in BAD_FILES])
def test_bad_file_is_named_by_file_line_and_field(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as caught:
        load_pairs(str(path), num_samples=None, seed=0, skip_bad_rows=False)
    assert str(caught.value) == f"{path}: {message}"


def test_parquet_rows_are_numbered_from_one(tmp_path):
    path = str(tmp_path / "rows.parquet")
    datasets.Dataset.from_list([GOOD, GOOD, {**GOOD, "rejected": None}]).to_parquet(path)
    with pytest.raises(DataError, match=r"rows.parquet: row 3, field 'rejected': is None$"):
        load_pairs(path, num_samples=None, seed=0, skip_bad_rows=False)


def test_damaged_parquet_is_named(tmp_path):
    path = tmp_path / "rows.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="rows.parquet: cannot read it as Parquet"):
        load_pairs(str(path), num_samples=None, seed=0, skip_bad_rows=False)


def test_first_bad_row_in_file_order_whatever_the_shuffle(tmp_path):
    lines = [row(prompt=f"p{i}") for i in range(30)]
    for bad in (7, 12, 25):
        lines[bad] = row(chosen=None)
    path = tmp_path / "rows.jsonl"
    path.write_bytes(jsonl(*lines))
    for seed in range(5):
        with pytest.raises(DataError) as caught:
            load_pairs(str(path), num_samples=None, seed=seed, skip_bad_rows=False)
        assert str(caught.value) == f"{path}: line 8, field 'chosen': is None"


def test_utf8_bom_from_spreadsheets_is_accepted(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_bytes(b"\xef\xbb\xbfprompt,chosen,rejected\r\np,a,b\r\n")
    pairs, drops = load_pairs(str(path), num_samples=None, seed=0, skip_bad_rows=False)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("p", "a", "b")] and not drops


def test_skip_bad_rows_drops_every_per_row_problem_and_counts_it(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(jsonl(row(prompt="a"), "{oops", '"a string"', row(chosen=None),
                           '{"prompt": "p", "rejected": "r"}', row(prompt="b", rejected="yes"),
                           row(prompt="c")))
    pairs, drops = load_pairs(str(path), num_samples=None, seed=0, skip_bad_rows=True)
    assert sorted(p.prompt for p in pairs) == ["a", "c"]
    assert drops == {"not valid JSON": 1, "not a JSON object": 1, "chosen: is None": 1,
                     "chosen: is missing": 1, IDENTICAL_REPLIES: 1}
    csv_path = tmp_path / "rows.csv"
    csv_path.write_bytes(b"prompt,chosen,rejected\np,a,b\np,a\np,a,b,c\n")
    pairs, drops = load_pairs(str(csv_path), num_samples=None, seed=0, skip_bad_rows=True)
    assert len(pairs) == 1 and drops == {"wrong number of fields": 2}


def test_a_file_with_no_parsable_row_says_what_was_dropped(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(jsonl("{oops", "{also not"))
    with pytest.raises(DataError, match=r"the dataset has no rows that parse \(dropped: "
                                        r"\{'not valid JSON': 2\}\)"):
        load_pairs(str(path), num_samples=None, seed=0, skip_bad_rows=True)


# -- through train.py: exit status, message on stderr, no traceback, no empty output dir ------

def test_bad_data_ends_train_py_with_exit_2_and_a_named_line(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(jsonl(*[json.dumps(r) for r in learnable_pairs(8)], "{broken"))
    out = tmp_path / "run"
    assert train.main(train_args(tiny_model_dir, str(path), out)) == 2
    err = capsys.readouterr().err
    assert f"error: {path}: line 9: not valid JSON" in err
    no_traceback(err)
    assert not out.exists()  # a failed start leaves no empty output_dir behind


# -- flags --------------------------------------------------------------------------------

@pytest.mark.parametrize(("flags", "message"), [
    (["--learning_rate", "inf"], "--learning_rate must be a finite number, got inf"),
    (["--learning_rate", "nan"], "--learning_rate must be a finite number, got nan"),
    (["--epochs", "inf"], "--epochs must be a finite number, got inf"),
    (["--beta", "nan"], "--beta must be a finite number, got nan"),
    (["--max_grad_norm=-inf"], "--max_grad_norm must be a finite number, got -inf"),
    (["--warmup_ratio", "nan"], "--warmup_ratio must be a finite number, got nan"),
    (["--weight_decay", "-0.1"], "--weight_decay must be >= 0"),
    (["--lora_alpha", "0"], "--lora_alpha must be >= 1"),
    (["--lora_dropout", "1"], "--lora_dropout must be in [0, 1)"),
    (["--eval_fraction", "1.5"], "--eval_fraction must be in [0, 1)"),
])
def test_bad_train_flag_is_named(tiny_model_dir, pairs_file, tmp_path, capsys, flags, message):
    assert train.main(train_args(tiny_model_dir, pairs_file, tmp_path / "run", *flags)) == 2
    err = capsys.readouterr().err
    assert err == f"error: {message}" + err.split(message, 1)[1]  # the message leads
    no_traceback(err)
    assert not (tmp_path / "run").exists()


def test_a_shortened_or_misspelt_flag_is_refused(tiny_model_dir, pairs_file, tmp_path, capsys):
    """argparse would take --learning_rat as --learning_rate; a typo must not train silently."""
    with pytest.raises(SystemExit) as stopped:
        train.main(train_args(tiny_model_dir, pairs_file, tmp_path / "run", "--learning_rat",
                              "1e-4"))
    assert stopped.value.code == 2
    assert "unrecognized arguments: --learning_rat" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("flags", "message"), [
    (["--max_new_tokens", "0"], "--max_new_tokens must be >= 1, got 0"),
    (["--top_p", "5"], "--top_p must be in (0, 1], got 5.0"),
    (["--top_p", "0"], "--top_p must be in (0, 1], got 0.0"),
    (["--temperature", "-1"], "--temperature must be >= 0 (0 = greedy), got -1.0"),
    (["--temperature", "nan"], "--temperature must be a finite number, got nan"),
])
def test_bad_chat_flag_is_named(capsys, flags, message):
    assert chat.main(["--base_model", "unused", *flags]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {message}\n"


def test_output_dir_that_is_a_file_or_not_writable(tiny_model_dir, pairs_file, tmp_path,
                                                   capsys, monkeypatch):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    assert train.main(train_args(tiny_model_dir, pairs_file, a_file)) == 2
    assert f"--output_dir '{a_file}' is a file, not a directory" in capsys.readouterr().err
    assert train.main(train_args(tiny_model_dir, pairs_file, a_file / "run")) == 2
    assert "is a file, so no directory can be made there" in capsys.readouterr().err
    assert a_file.read_text() == "keep me"
    # Root ignores permission bits, so a read-only location is simulated.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(tmp_path)
                        else real_access(path, mode))
    assert train.main(train_args(tiny_model_dir, pairs_file, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert f"'{tmp_path}' is not writable; choose a directory you can write to" in err
    no_traceback(err)


# -- models and adapters --------------------------------------------------------------------

def test_truncated_model_weights(tiny_model_dir, pairs_file, tmp_path, capsys):
    broken = tmp_path / "model"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert train.main(train_args(str(broken), pairs_file, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert f"could not load the model from '{broken}': a weights file is damaged or truncated" \
        in err and "copy or download the model again" in err
    no_traceback(err)


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, pairs_file, tmp_path_factory) -> str:
    """Two steps with a checkpoint at step 2."""
    out = tmp_path_factory.mktemp("finished")
    assert train.main(train_args(tiny_model_dir, pairs_file, out, "--max_steps", "2",
                                 "--save_steps", "2")) == 0
    return str(out)


def test_chat_with_an_adapter_of_another_base(finished_run, tmp_path, tiny_tokenizer, capsys):
    from dpo_core.testing import tiny_llama

    other = tmp_path / "wider"
    tiny_llama(vocab_size=len(tiny_tokenizer), hidden_size=32, num_layers=2,
               num_heads=4).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    args = ["--base_model", str(other), "--prompt", "hi", "--max_new_tokens", "2"]
    assert chat.main([*args, "--adapter_path", finished_run]) == 2
    err = capsys.readouterr().err
    assert f"the adapter in '{finished_run}' does not fit the base model '{other}'" in err
    assert "pass that model as --base_model" in err
    no_traceback(err)
    assert chat.main([*args, "--adapter_path", str(tmp_path / "nothing")]) == 2
    assert "holds no trained adapter (no adapter_config.json)" in capsys.readouterr().err


# -- checkpoints ----------------------------------------------------------------------------

def damage(checkpoint, name: str) -> None:
    path = os.path.join(checkpoint, name)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(b"{ garbage" if name.endswith(".json") else data[: len(data) // 2])


@pytest.mark.parametrize(("damaged", "extra", "message"), [
    ("trainer_state.json", (), "is damaged: trainer_state.json cannot be read"),
    ("optimizer.pt", (), "is damaged: optimizer.pt cannot be read"),
    ("adapter/adapter_model.safetensors", (), "is damaged: adapter_model.safetensors cannot"),
    (None, ("--lora_r", "8"), "was saved with --lora_r 16 (now 8); its adapter does not fit"),
    (None, ("--lora_target_modules", "q_proj"),
     "was saved with --lora_target_modules k_proj,o_proj,q_proj,v_proj (now q_proj)"),
])
def test_bad_checkpoint_is_named_and_touches_nothing(finished_run, tiny_model_dir, pairs_file,
                                                     tmp_path, capsys, damaged, extra, message):
    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    checkpoint = out / "checkpoint-2"
    if damaged:
        damage(checkpoint, damaged)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    args = train_args(tiny_model_dir, pairs_file, out, "--max_steps", "4", "--save_steps", "2",
                      "--resume_from_checkpoint", "latest", *extra)
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert f"error: checkpoint '{checkpoint}' {message}" in err, err
    no_traceback(err)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_disk_full_during_a_checkpoint_leaves_no_tmp(tiny_model_dir, pairs_file, tmp_path,
                                                     monkeypatch, capsys):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if str(f).endswith(os.path.join(".checkpoint-4.tmp", "optimizer.pt")):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                               "64 vs 0: No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    args = train_args(tiny_model_dir, pairs_file, out, "--max_steps", "6", "--save_steps", "2")
    assert train.main(args) == 1
    err = capsys.readouterr().err
    assert (f"error: could not write checkpoint '{out / 'checkpoint-4'}': no space left on "
            f"the device. Nothing partial was left behind; the last complete checkpoint is "
            f"{out / 'checkpoint-2'}.") in err
    assert "--resume_from_checkpoint latest" in err
    no_traceback(err)
    assert sorted(os.listdir(out)) == ["checkpoint-2", "train_log.jsonl", "training_config.json"]


# -- the error path itself ----------------------------------------------------------------

def test_unexpected_errors_are_one_message_unless_debug(capsys, monkeypatch):
    def buggy(argv):
        raise TypeError("unsupported operand\nsecond line")

    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert cli.run_command(buggy, []) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unexpected TypeError: unsupported operand\n")
    assert "--debug" in err and "second line" not in err
    no_traceback(err)
    with pytest.raises(TypeError):
        cli.run_command(buggy, ["--debug"])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(TypeError):
        cli.run_command(buggy, [])


def test_os_errors_name_the_path(capsys):
    def full(argv):
        raise OSError(28, "No space left on device", "/data/out/log")

    assert cli.run_command(full, []) == 1
    assert capsys.readouterr().err == ("error: no space left on the device (/data/out/log); "
                                       "free some space and run again\n")

    def forbidden(argv):
        raise PermissionError(13, "Permission denied", "/data/out")

    assert cli.run_command(forbidden, []) == 2
    assert capsys.readouterr().err == ("error: not allowed to write (/data/out): Permission "
                                       "denied; choose another location\n")


def test_help_imports_no_torch_and_a_run_no_bitsandbytes(tiny_model_dir, pairs_file, tmp_path):
    """-X importtime lists every module a process imports: `--help` needs no torch, and a
    run without 4-bit weights neither imports bitsandbytes nor prints warnings about it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for script in ("train.py", "chat.py"):
        shown = subprocess.run([sys.executable, "-X", "importtime", script, "--help"],
                               cwd=ROOT, env=env, capture_output=True, text=True, check=True)
        assert "--debug" in shown.stdout
        imported = {line.split("|")[-1].strip() for line in shown.stderr.splitlines()}
        assert "torch" not in imported and "transformers" not in imported
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, "-X", "importtime", "train.py",
                          *train_args(tiny_model_dir, pairs_file, out, "--max_steps", "1")],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in run.stderr.splitlines()
                if line.startswith("import time:")}
    assert "peft" in imported and not {m for m in imported if m.startswith("bitsandbytes.")}
    others = [line for line in run.stderr.splitlines() if not line.startswith("import time:")]
    assert not [line for line in others if "Warning" in line or "gemm_4bit" in line], others



def test_report_redraw_keeps_the_demos_before_after_panel(tmp_path, capsys):
    """`dpo-report demo_output` redraws the figure training drew: with the
    before/after panel (a 21-inch-wide figure) when metrics.json has one."""
    from dpo_core import run_files
    from dpo_core.cli import report_main
    from dpo_core.reporting import curves

    run = tmp_path / "demo_output"
    run.mkdir()
    (run / "train_log.jsonl").write_text(
        json.dumps({"step": 1, "split": "train", "loss": 0.69, "learning_rate": 1e-3}) + "\n")
    (run / "metrics.json").write_text(json.dumps({"before": {"accuracy": 0.5},
                                                  "after": {"accuracy": 0.9}}))
    widths = {}
    for name, argv in (("training", None), ("report", [str(run)])):
        if argv is None:
            curves.write_training_curves(str(run))
        else:
            assert report_main(argv) == 0
        header = (run / run_files.CURVES_FILE).read_bytes()[:24]
        widths[name] = int.from_bytes(header[16:20], "big")
    assert widths == {"training": 2100, "report": 2100}
    capsys.readouterr()


def test_unreachable_hub_fails_at_once_or_uses_the_cache(monkeypatch):
    """No minute of retries: one quick request decides (the client's own error classes count)."""
    import huggingface_hub

    from dpo_core.modeling import loading as model

    class ConnectError(Exception):  # what httpx raises, named as it names it
        pass

    def offline(self, name, **kwargs):
        raise ConnectError("[Errno -2] Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", offline)
    cached = {"org/cached": "/cache/org/cached/config.json"}
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda name, filename: cached.get(name))
    model._hub_state.cache_clear()
    with pytest.raises(model.ModelLoadError, match="could not reach the Hugging Face Hub to "
                       "download 'org/absent', and it is not in the local cache"):
        model.hub_access("org/absent")
    assert model.hub_access("org/cached") == {"local_files_only": True}
    model._hub_state.cache_clear()


# -- interruptions and runs without a training signal ---------------------------------------

def interrupting(call_number: int):
    """An objective factory whose objective sends this process a real SIGINT (Ctrl-C) during
    the given training micro-batch."""
    import signal

    from dpo_core.training.objective import PreferenceObjective

    calls = []

    class Interrupting(PreferenceObjective):
        def __call__(self, model, batch, reference=None):
            if torch.is_grad_enabled():
                calls.append(1)
                if len(calls) == call_number:
                    os.kill(os.getpid(), signal.SIGINT)
            return super().__call__(model, batch, reference)

    return Interrupting.from_config


def test_ctrl_c_stops_at_a_safe_point_saves_and_says_how_to_resume(
        tiny_model_dir, pairs_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = train_args(tiny_model_dir, pairs_file, out, "--max_steps", "5", "--save_steps", "0")
    monkeypatch.setattr(sys, "argv", ["train.py", *args])
    assert train.main(args, make_objective=interrupting(2)) == 130
    err = capsys.readouterr().err
    no_traceback(err)
    assert f"Stopped by Ctrl-C after step 2 of 5; saved {out / 'checkpoint-2'}." in err
    assert "--resume_from_checkpoint latest" in err and "python train.py --model_name" in err
    assert not (out / "metrics.json").exists()
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").open()
             if json.loads(line)["split"] == "train"]
    assert steps == [1, 2]
    monkeypatch.undo()
    assert train.main([*args, "--resume_from_checkpoint", "latest"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").open()
             if json.loads(line)["split"] == "train"]
    assert steps == [1, 2, 3, 4, 5]


def test_ctrl_c_without_save_on_interrupt_says_what_is_kept(tiny_model_dir, pairs_file, tmp_path,
                                                           monkeypatch, capsys):
    out = tmp_path / "run"
    args = train_args(tiny_model_dir, pairs_file, out, "--max_steps", "5", "--save_steps", "0",
                      "--no-save_on_interrupt")
    assert train.main(args, make_objective=interrupting(2)) == 130
    err = capsys.readouterr().err
    assert "Stopped by Ctrl-C after step 2 of 5; no checkpoint saved" in err
    no_traceback(err)
    assert not list(out.glob("checkpoint-*"))


def test_pairs_identical_after_truncation_are_refused_or_warned(tiny_model_dir, tmp_path,
                                                               capsys):
    # The replies differ only after a long shared beginning that --max_length cuts.
    shared = " ".join(["yes"] * 100)
    rows = [{"prompt": "q", "chosen": f"{shared} good", "rejected": f"{shared} bad"}] * 8
    rows = [dict(r, prompt=f"q {i}") for i, r in enumerate(rows)]
    path = tmp_path / "same_start.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert train.main(train_args(tiny_model_dir, str(path), out, "--max_steps", "1")) == 2
    err = capsys.readouterr().err
    assert "every training pair (6) is identical after truncation, so DPO has no gradient" in err
    assert "--max_length 64" in err
    no_traceback(err)
    mixed = rows + [{"prompt": f"p {i}", "chosen": "yes a", "rejected": "no b"} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in mixed))
    assert train.main(train_args(tiny_model_dir, str(path), out, "--max_steps", "1",
                                 "--eval_fraction", "0")) == 0
    printed = capsys.readouterr()
    assert "WARNING: 8 of 16 train pairs are identical after truncation" in printed.out + \
        printed.err


def test_a_run_with_zero_gradient_says_so(tiny_model_dir, pairs_file, tmp_path, capsys):
    from dpo_core.training.objective import PreferenceObjective

    class Flat(PreferenceObjective):  # a loss that does not depend on the weights
        def __call__(self, model, batch, reference=None):
            stats = super().__call__(model, batch, reference)
            return {**stats, "losses": stats["losses"] * 0}

    assert train.main(train_args(tiny_model_dir, pairs_file, tmp_path / "run",
                                 "--max_steps", "2"), make_objective=Flat.from_config) == 0
    printed = capsys.readouterr()
    assert "WARNING: all 2 optimizer steps had a zero gradient: the adapter did not change" \
        in printed.out + printed.err


def test_a_failed_restart_leaves_no_file_of_the_old_run(finished_run, tiny_model_dir, pairs_file,
                                                        tmp_path, monkeypatch, capsys):
    """--overwrite_output_dir, then a failure after setup: the old adapter, tokenizer, merged
    model, curves and samples are gone with the old log, so chat.py cannot load an adapter
    beside a config it does not belong to; a user's own file stays."""
    from dpo_core.training.objective import PreferenceObjective

    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    (out / "merged").mkdir()
    (out / "merged" / "model.safetensors").write_bytes(b"old")
    (out / "samples.md").write_text("old samples")
    (out / "notes.txt").write_text("mine")
    old_files = {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json",
                 "tokenizer_config.json", "metrics.json", "training_curves.png"}
    assert old_files <= set(os.listdir(out))

    class Crash(PreferenceObjective):
        def __call__(self, model, batch, reference=None):
            raise torch.OutOfMemoryError("CUDA out of memory")

    assert train.main(train_args(tiny_model_dir, pairs_file, out, "--max_steps", "2",
                                 "--overwrite_output_dir"), make_objective=Crash.from_config) == 1
    assert "out of device memory" in capsys.readouterr().err
    left = set(os.listdir(out))
    assert not left & (old_files | {"merged", "samples.md", "checkpoint-2", "README.md"}), left
    assert {"training_config.json", "notes.txt"} <= left
    assert chat.main(["--base_model", tiny_model_dir, "--adapter_path", str(out),
                      "--prompt", "hi"]) == 2
    assert "holds no trained adapter" in capsys.readouterr().err


def test_an_output_dir_holding_only_an_adapter_is_not_overwritten(finished_run, tiny_model_dir,
                                                                 pairs_file, tmp_path, capsys):
    out = tmp_path / "adapter_only"
    out.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(os.path.join(finished_run, name), out / name)
    assert train.main(train_args(tiny_model_dir, pairs_file, out)) == 2
    assert "holds a trained adapter; pass --overwrite_output_dir" in capsys.readouterr().err


def test_no_samples_without_an_eval_set_is_said(tiny_model_dir, pairs_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(train_args(tiny_model_dir, pairs_file, out, "--max_steps", "1",
                                 "--eval_fraction", "0", "--num_sample_prompts", "2")) == 0
    assert ("No samples.md: its prompts come from the eval set, and this run has none "
            "(--eval_fraction 0 and no --eval_dataset).") in capsys.readouterr().out
    assert not (out / "samples.md").exists()
