"""dpo-eval's numbers against hand computations: reply lengths, repeats, win rates and their
intervals, the length-controlled win rate, a reply's log-prob and where a reply stops."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_core.demo import make_prompt, model_dir
from dpo_core.evaluation.judges import RewardModelJudge, judge_summary
from dpo_core.evaluation.replies import reply_logps, reply_statistics
from dpo_core.evaluation.statistics import (
    length_controlled_win_rate,
    length_summary,
    repeated_ngram_rate,
    wilson_interval,
    wins,
)
from dpo_core.modeling.generation import GeneratedReply, generate
from dpo_core.testing import tiny_llama


def test_length_summary_is_mean_median_and_interpolated_90th_percentile():
    # Sorted 1 2 3 4 10: the 90th percentile sits 0.6 of the way from 4 to 10.
    assert length_summary([10, 1, 3, 2, 4]) == pytest.approx(
        {"mean": 4.0, "median": 3.0, "p90": 7.6})
    assert length_summary([5]) == {"mean": 5.0, "median": 5.0, "p90": 5.0}


def test_repeated_ngram_rate_counts_repeats_within_each_reply():
    # Bigrams of 1 2 1 2 1 2: (1,2) (2,1) (1,2) (2,1) (1,2) -> 5, of which 3 repeat one before.
    assert repeated_ngram_rate([[1, 2, 1, 2, 1, 2]], 2) == pytest.approx(3 / 5)
    # Repeats are per reply: the same bigram in two replies is no repeat; a short reply has
    # no 4-grams and adds nothing.
    assert repeated_ngram_rate([[1, 2], [1, 2], [7]], 2) == 0.0
    assert repeated_ngram_rate([[5, 5, 5, 5, 5], [1, 2]], 4) == pytest.approx(1 / 2)
    assert repeated_ngram_rate([[1, 2]], 4) == 0.0


def test_reply_statistics_of_known_replies():
    replies = [GeneratedReply("a", [9], [1, 2, 3], 2), GeneratedReply("b", [9], [4] * 5, None),
               GeneratedReply("c", [9], [], 2)]
    stats = reply_statistics(replies)
    assert stats["length_mean"] == pytest.approx(8 / 3)
    assert stats["length_median"] == 3 and stats["length_p90"] == pytest.approx(4.6)
    assert stats["stopped"] == pytest.approx(2 / 3)
    assert stats["repeated_4gram_rate"] == pytest.approx(1 / 2)  # 4 4 4 4 4: 2 4-grams, 1 repeat
    assert replies[0].scored_ids == [1, 2, 3, 2] and replies[1].scored_ids == [4] * 5


def test_wilson_interval_matches_the_formula_by_hand():
    # p = 0.5, n = 100: centre 0.5, half-width z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/(4 n^2)).
    z = 1.959963984540054
    half = z / (1 + z * z / 100) * math.sqrt(0.25 / 100 + z * z / 40000)
    low, high = wilson_interval(0.5, 100)
    assert (low, high) == pytest.approx((0.5 - half, 0.5 + half))
    assert (low, high) == pytest.approx((0.40383, 0.59617), abs=1e-5)
    # All wins: the interval stays inside [0, 1] and below 1 at its lower end.
    low, high = wilson_interval(1.0, 10)
    assert high == pytest.approx(1.0) and low == pytest.approx(10 / (10 + z * z))


def test_length_controlled_win_rate_of_a_hand_solved_case():
    # Longer policy replies (d = +4) win 3 of 4, shorter ones (d = -4) win 2 of 4. std(d) = 4,
    # so x = +-tanh(1), and the fit solves sigmoid(a + b t) = 3/4, sigmoid(a - b t) = 1/2:
    # a = ln(3)/2, b = ln(3)/(2 t). The length-controlled rate is sigmoid(a) = sqrt3/(1+sqrt3).
    outcomes = [1, 1, 1, 0, 1, 1, 0, 0]
    differences = [4, 4, 4, 4, -4, -4, -4, -4]
    rate, coefficient = length_controlled_win_rate(outcomes, differences)
    assert rate == pytest.approx(math.sqrt(3) / (1 + math.sqrt(3)), abs=1e-4)
    assert coefficient == pytest.approx(math.log(3) / (2 * math.tanh(1)), abs=1e-3)
    assert np.mean(outcomes) == 0.625  # the plain rate, which the length advantage inflates


def test_length_controlled_win_rate_without_length_information_is_the_win_rate():
    # Same length difference everywhere: no slope can be fitted; ties count half.
    rate, coefficient = length_controlled_win_rate([1, 0.5, 0, 1], [3, 3, 3, 3])
    assert rate == pytest.approx(0.625, abs=1e-4) and coefficient == 0.0
    # Every reply wins: finite, and near 1.
    rate, _ = length_controlled_win_rate([1, 1, 1], [1, 2, 3])
    assert 0.99 < rate <= 1.0


def test_wins_and_judge_summary_count_ties_as_half():
    assert wins([2, 1, 3], [1, 1, 5]).tolist() == [1.0, 0.5, 0.0]
    summary = judge_summary([0, 1, 1, 0], [1, 1, 0, 1], [5, 5, 5, 5], [6, 6, 6, 6])
    assert (summary["wins"], summary["ties"], summary["losses"]) == (2, 1, 1)
    assert summary["win_rate"] == 0.625
    assert summary["win_rate_ci95"] == pytest.approx(list(wilson_interval(0.625, 4)))
    assert summary["reference_mean"] == 0.5 and summary["policy_mean"] == 0.75
    assert summary["lc_win_rate"] == pytest.approx(0.625, abs=1e-4)


def test_reply_logps_are_the_sum_of_the_replies_token_log_probs():
    """Batched and padded, against log_softmax of the full logits of each row alone."""
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=50, hidden_size=32, num_heads=2).eval()
    replies = [GeneratedReply("", [3, 4, 5, 6], [7, 8], 2),
               GeneratedReply("", [9], [10, 11, 12, 13], None),
               GeneratedReply("", [14, 15], [], 2)]
    values = reply_logps(model, replies, pad_token_id=0, batch_size=3)
    for reply, value in zip(replies, values, strict=True):
        ids = torch.tensor([reply.prompt_ids + reply.scored_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].double(), -1)
        start = len(reply.prompt_ids)
        expected = sum(logprobs[start - 1 + i, token].item()
                       for i, token in enumerate(reply.scored_ids))
        assert value == pytest.approx(expected, abs=1e-4)


@pytest.fixture(scope="module")
def demo_model():
    return (AutoModelForCausalLM.from_pretrained(model_dir()).eval(),
            AutoTokenizer.from_pretrained(model_dir()))


def test_generated_replies_say_whether_they_stopped(demo_model):
    """The bundled demo model ends each reply with its end-of-turn token: within 16 new tokens
    every reply stops on its own; cut at 3 none does, and the reply is those 3 tokens."""
    model, tokenizer = demo_model
    prompts = [make_prompt(12, 34), make_prompt(56, 78), make_prompt(10, 99)]
    whole = generate(model, tokenizer, prompts, max_new_tokens=16)
    assert all(r.stopped for r in whole)
    # The sum, right or cut short (the base model does both): "A + B = ..." either way.
    assert [r.text.split(" = ")[0] for r in whole] == ["12 + 34", "56 + 78", "10 + 99"]
    cut = generate(model, tokenizer, prompts, max_new_tokens=3)
    assert not any(r.stopped for r in cut)
    assert all(len(r.reply_ids) == 3 for r in cut)
    assert [r.reply_ids for r in cut] == [r.reply_ids[:3] for r in whole]


def test_a_reward_model_reads_prompt_and_reply_as_one_conversation(tiny_tokenizer):
    """With its chat template (the reply as the assistant's turn), or, without one, as
    "role: content" lines ending with the reply."""
    prompts = ["hi there", [{"role": "system", "content": "be brief"},
                            {"role": "user", "content": "yes or no"}]]
    templated = RewardModelJudge("rm", None, tiny_tokenizer, batch_size=2)
    assert templated.texts(prompts, ["hello", "no"]) == [
        "<|user|>\nhi there</s>\n<|assistant|>\nhello</s>\n",
        "<|system|>\nbe brief</s>\n<|user|>\nyes or no</s>\n<|assistant|>\nno</s>\n"]
    plain = copy.deepcopy(tiny_tokenizer)
    plain.chat_template = None
    assert RewardModelJudge("rm", None, plain, batch_size=2).texts(prompts, ["hello", "no"]) == [
        "user: hi there\nassistant: hello", "system: be brief\nuser: yes or no\nassistant: no"]
