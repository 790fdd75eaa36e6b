"""`dpo-eval` end to end on a tiny trained run: the pair metrics are the training log's, the
replies, judges and files agree with what each sample says, a policy equal to its reference
measures as such, two processes give the one-process results, and bad input gets one message."""

from __future__ import annotations

import json
import os
import shutil
import statistics

import pytest
import torch
from conftest import read_log, table_rows, train_args, write_jsonl
from launching import accelerate_launch, launch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForSequenceClassification,
)

import train
from dpo_core.cli import eval_main, report_main
from dpo_core.data.batches import PreferenceCollator
from dpo_core.data.tokenization import tokenize_pairs
from dpo_core.data.training_data import load_run_pairs
from dpo_core.evaluation.run import read_run
from dpo_core.forward.logps import concatenated_forward
from dpo_core.modeling.loading import load_tokenizer
from dpo_core.reporting.eval_report import format_eval_table

WORDS_JUDGE = "rule:test_dpo_eval:reply_words"
REPLIES = ("--num_prompts", "6", "--max_new_tokens", "8", "--batch_size", "4")


def reply_words(prompt, reply: str) -> int:
    """A judge with a known answer: more words is better."""
    return len(reply.split())


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, pairs_file, tmp_path_factory) -> str:
    """Three steps on the tiny Llama: 36 training pairs, 12 held out."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    out = tmp_path_factory.mktemp("trained")
    assert train.main(train_args(tiny_model_dir, pairs_file, out, "--max_steps", "3")) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()
    return str(out)


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """A tiny random sequence classifier with one output, and the tiny tokenizer."""
    tokenizer = load_tokenizer(tiny_model_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("reward-model")
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def copy_run(run: str, to) -> str:
    return str(shutil.copytree(run, to, ignore=shutil.ignore_patterns("eval*")))


def read_eval(directory) -> dict:
    with open(os.path.join(directory, "eval.json")) as f:
        return json.load(f)


@torch.no_grad()
def base_model_accuracy(tiny_model_dir: str, run: str) -> tuple[float, float]:
    """The starting model's own log-prob accuracy on the run's eval split (summed, per token),
    computed here from a fresh copy of it with the plain padded forward."""
    config = read_run(run).config
    tokenizer = load_tokenizer(tiny_model_dir)
    pairs, _ = tokenize_pairs(tokenizer, load_run_pairs(config)[1], max_length=config.max_length,
                              max_prompt_length=config.max_prompt_length,
                              use_chat_template=True, disable=True)
    batch = PreferenceCollator(tokenizer.pad_token_id)(pairs)
    chosen, rejected = concatenated_forward(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), batch)
    chosen_lengths = torch.tensor([len(p.chosen_ids) for p in pairs])
    rejected_lengths = torch.tensor([len(p.rejected_ids) for p in pairs])
    return ((chosen > rejected).float().mean().item(),
            (chosen / chosen_lengths > rejected / rejected_lengths).float().mean().item())


def test_eval_reproduces_the_runs_eval_and_judges_every_reply(
        trained_run, reward_model_dir, tiny_model_dir, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path / "run")
    assert eval_main([run, *REPLIES, "--judge", WORDS_JUDGE,
                      "--reward_model", reward_model_dir]) == 0
    result = read_eval(run)

    # The pair metrics after training are the run's own last eval record.
    final = [r for r in read_log(run) if r["split"] == "eval"][-1]
    after, before = result["pairs"]["after"], result["pairs"]["before"]
    assert result["pairs"]["num_pairs"] == 12
    for key, value in final.items():
        if key not in ("step", "split"):
            assert after[key] == pytest.approx(value, abs=1e-5), key
    # Before training: the starting model's own preference, computed independently.
    assert (before["logps_accuracy"], before["length_normalised_accuracy"]) == pytest.approx(
        base_model_accuracy(tiny_model_dir, run))

    # Replies: the summary is the samples' own numbers.
    samples, generation = result["samples"], result["generation"]
    assert len(samples) == generation["num_prompts"] == 6
    for who in ("reference", "policy"):
        lengths = [s[f"{who}_tokens"] for s in samples]
        assert generation[who]["length_mean"] == pytest.approx(statistics.mean(lengths))
        assert generation[who]["length_median"] == pytest.approx(statistics.median(lengths))
        assert max(lengths) <= 8
        assert generation[who]["stopped"] == pytest.approx(
            sum(s[f"{who}_stopped"] for s in samples) / 6)
    assert generation["kl_estimate"] == pytest.approx(
        statistics.mean(s["log_ratio"] for s in samples))
    assert any(s["policy_reply"] != s["reference_reply"] for s in samples)

    # The rule judge: each reply's word count, and the win rate they make.
    words = [(len(s["reference_reply"].split()), len(s["policy_reply"].split()))
             for s in samples]
    assert [(s["scores"][WORDS_JUDGE]["reference"], s["scores"][WORDS_JUDGE]["policy"])
            for s in samples] == words
    judged = result["judges"][WORDS_JUDGE]
    assert judged["win_rate"] == pytest.approx(
        sum(1.0 if p > r else 0.5 if p == r else 0.0 for r, p in words) / 6)
    assert judged["win_rate_ci95"][0] <= judged["win_rate"] <= judged["win_rate_ci95"][1]

    # The reward model: each reply alone (no padding) through the classifier gives the score
    # it got in its batch.
    name = f"reward_model:{reward_model_dir}"
    classifier = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(reward_model_dir)
    for sample in samples:
        for who in ("reference", "policy"):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": sample["prompt"]},
                 {"role": "assistant", "content": sample[f"{who}_reply"]}], tokenize=False)
            with torch.no_grad():
                score = classifier(**tokenizer(text, add_special_tokens=False,
                                               return_tensors="pt")).logits[0, 0].item()
            assert sample["scores"][name][who] == pytest.approx(score, abs=1e-4)
    assert 0 <= result["judges"][name]["lc_win_rate"] <= 1

    # The files, the printed table, and dpo-report showing the same table.
    with open(os.path.join(run, "eval_samples.md")) as f:
        rows = table_rows(f.read())
    assert len(rows) == 6 and all(len(row) == 8 for row in rows)
    with open(os.path.join(run, "eval.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    table = format_eval_table(result)
    assert table in capsys.readouterr().out
    assert report_main([run]) == 0
    assert table in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["full fine-tuning", "starting adapter"])
def test_the_reference_is_the_one_the_run_used(kind, trained_run, tiny_model_dir, pairs_file,
                                               tmp_path):
    """Full fine-tuning (the starting model reloaded) and DPO from an adapter (its frozen copy
    switched in): the pair metrics are the run's last eval record, and "before" is the
    starting point's: the base model, or the starting adapter's trained model."""
    flags = (["--finetuning_type", "full", "--learning_rate", "1e-4"] if kind == "full fine-tuning"
             else ["--adapter_path", trained_run])
    out = tmp_path / "run"
    assert train.main(train_args(tiny_model_dir, pairs_file, out, "--max_steps", "2",
                                 *flags)) == 0
    assert eval_main([str(out), "--num_prompts", "0"]) == 0
    result = read_eval(out)
    final = [r for r in read_log(out) if r["split"] == "eval"][-1]
    after, before = result["pairs"]["after"], result["pairs"]["before"]
    for key, value in final.items():
        if key not in ("step", "split"):
            assert after[key] == pytest.approx(value, abs=1e-5), key
    if kind == "full fine-tuning":
        assert (before["logps_accuracy"], before["length_normalised_accuracy"]) == \
            pytest.approx(base_model_accuracy(tiny_model_dir, str(out)))
    else:
        started = [r for r in read_log(trained_run) if r["split"] == "eval"][-1]
        assert (before["logps/chosen"], before["logps/rejected"]) == pytest.approx(
            (started["logps/chosen"], started["logps/rejected"]), abs=1e-5)
    assert result["generation"] is None and result["samples"] == []


def test_a_policy_equal_to_its_reference_measures_as_its_reference(trained_run, tmp_path):
    """The adapter's B matrices zeroed: the policy is the base model. Sampled from the same
    seed, both give the same replies, every log-ratio is 0 and the judge sees only ties.
    --prompts alone: its prompts (text and messages), no pair metrics."""
    run = copy_run(trained_run, tmp_path / "run")
    weights = os.path.join(run, "adapter_model.safetensors")
    adapter = load_file(weights)
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in adapter.items()},
              weights)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "the quick brown fox"},
        {"prompt": [{"role": "system", "content": "be brief"},
                    {"role": "user", "content": "what is one and two"}]}])
    out = tmp_path / "out"
    assert eval_main([run, "--prompts", prompts, "--max_new_tokens", "8", "--temperature", "1",
                      "--judge", WORDS_JUDGE, "--output_dir", str(out)]) == 0
    result = read_eval(out)
    assert result["pairs"] is None
    assert [s["prompt"] for s in result["samples"]] == [
        "the quick brown fox", [{"role": "system", "content": "be brief"},
                                {"role": "user", "content": "what is one and two"}]]
    for sample in result["samples"]:
        assert sample["policy_reply"] == sample["reference_reply"]
        assert sample["log_ratio"] == pytest.approx(0.0, abs=1e-5)
    assert result["judges"][WORDS_JUDGE]["ties"] == 2
    assert result["judges"][WORDS_JUDGE]["win_rate"] == 0.5
    assert not os.path.exists(os.path.join(run, "eval.json"))  # --output_dir, not RUN_DIR


@pytest.mark.slow
def test_two_processes_give_the_one_process_results(trained_run, tmp_path):
    """accelerate launch, 2 CPU processes: the prompts are split and gathered back in order,
    the pairs are shared out; greedy replies one prompt at a time (no padding) are the same
    tokens as in one process."""
    flags = ["--num_prompts", "5", "--max_new_tokens", "6", "--temperature", "0",
             "--batch_size", "1"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert eval_main([trained_run, *flags, "--output_dir", str(one)]) == 0
    launch([*accelerate_launch("ddp.yaml"), "-m"],
           [trained_run, *flags, "--output_dir", str(two)], tmp_path, script="dpo_core.evaluate")
    single, double = read_eval(one), read_eval(two)
    assert (single["num_processes"], double["num_processes"]) == (1, 2)
    for key, value in single["pairs"]["after"].items():
        assert double["pairs"]["after"][key] == pytest.approx(value, abs=1e-5), key
    assert double["pairs"]["num_pairs"] == 12
    assert [(s["prompt"], s["reference_reply"], s["policy_reply"]) for s in double["samples"]] \
        == [(s["prompt"], s["reference_reply"], s["policy_reply"]) for s in single["samples"]]
    assert [s["log_ratio"] for s in double["samples"]] == pytest.approx(
        [s["log_ratio"] for s in single["samples"]], abs=1e-4)


def no_plan(run: str, model: str, tmp_path) -> list[str]:
    copy = copy_run(run, tmp_path / "old")
    path = os.path.join(copy, "training_config.json")
    with open(path) as f:
        recorded = json.load(f)
    del recorded["run_plan"]
    with open(path, "w") as f:
        json.dump(recorded, f)
    return [copy]


def empty_prompts(run: str, model: str, tmp_path) -> list[str]:
    (tmp_path / "prompts.txt").write_text("")
    return [run, "--prompts", str(tmp_path / "prompts.txt")]


# case: ((run dir, the causal LM it trained, tmp_path) -> argv, what stderr says)
BAD_INPUT = {
    "run dir without a plan": (no_plan, "has no run plan ('run_plan')"),
    "not a run dir": (lambda run, model, tmp_path: [str(tmp_path)],
                      "no training_config.json here; pass the --output_dir of a train.py run"),
    "reward model that is not a sequence classifier": (
        lambda run, model, tmp_path: [run, "--reward_model", model],
        "is a LlamaForCausalLM, not a sequence classifier"),
    "empty prompts file": (empty_prompts, "prompts.txt: the file is empty"),
    "judge module that does not import": (
        lambda run, model, tmp_path: [run, "--judge", "rule:no_such_module:score"],
        "--judge rule:no_such_module:score: cannot import 'no_such_module'"),
    "judge that is not rule:MODULE:FUNCTION": (
        lambda run, model, tmp_path: [run, "--judge", "my_module.score"],
        "--judge must be rule:MODULE:FUNCTION"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_gets_one_message(case, trained_run, tiny_model_dir, tmp_path, capsys):
    arguments, expected = BAD_INPUT[case]
    assert eval_main(arguments(trained_run, tiny_model_dir, tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert not os.path.exists(os.path.join(trained_run, "eval.json"))
