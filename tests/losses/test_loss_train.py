"""The trl loss family, ORPO, CPO, mixtures and f-divergence through the real objective and
through `train.py` end to end (2 steps each on the tiny model).

Step 1 trains a zero-initialised adapter: the policy is the reference, every log-ratio is 0,
so each reference-based loss has the closed-form value docs/losses.md states.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import learnable_pairs, read_log, train_args

import train
from dpo_core.config.train import TrainConfig
from dpo_core.data.batches import PreferenceCollator
from dpo_core.data.pairs import PreferencePair
from dpo_core.data.tokenization import tokenize_pairs
from dpo_core.forward.logps import concatenated_token_logps
from dpo_core.modeling.adapters import add_lora
from dpo_core.training.metrics import merged_metrics
from dpo_core.training.objective import PreferenceObjective
from dpo_core.training.plan import resolve_precompute

LN2 = math.log(2)
TWO_STEPS = ("--max_steps", "2")


def pair_batch(tokenizer, num: int = 6) -> dict[str, torch.Tensor]:
    rows = learnable_pairs(num, seed=5)
    pairs = [PreferencePair(r["prompt"], " " + r["chosen"], " " + r["rejected"]) for r in rows]
    tokenized, dropped = tokenize_pairs(tokenizer, pairs, max_length=64, max_prompt_length=32,
                                        use_chat_template=True, disable=True)
    assert not dropped
    return PreferenceCollator(tokenizer.eos_token_id)(tokenized)


def lora(model):
    return add_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear",
                    gradient_checkpointing=False, quantized=False)


def chosen_cross_entropy(model, batch) -> torch.Tensor:
    """trl's NLL: cross-entropy over every chosen response token of the batch, computed from
    the logits with torch's own loss (not with dpo_core.forward.logps)."""
    logits = model(input_ids=batch["chosen_input_ids"],
                   attention_mask=batch["chosen_attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["chosen_labels"][:, 1:].flatten(),
                           ignore_index=-100)


# ------------------------------------------------------------------ the objective on a model


@pytest.mark.parametrize("loss_type", ["sft", "rpo", "cpo"])
def test_pooled_nll_equals_torch_cross_entropy_over_chosen_tokens(tiny_tokenizer, tiny_model,
                                                                  loss_type):
    """The default --nll_normalization tokens is trl's cross-entropy; 'pairs' differs when
    the chosen responses differ in length."""
    model = lora(tiny_model)
    batch = pair_batch(tiny_tokenizer)
    lengths = (batch["chosen_labels"] != -100).sum(-1)
    assert len(set(lengths.tolist())) > 1  # else both normalisations would agree
    with torch.no_grad():
        nll = chosen_cross_entropy(model, batch)
        sft = PreferenceObjective(loss_type="sft")(model, batch)["losses"].mean()
        pairs = PreferenceObjective(loss_type="sft", nll_normalization="pairs")(
            model, batch)["losses"].mean()
        alpha = 0.7
        combined = PreferenceObjective(loss_type=loss_type, rpo_alpha=alpha, cpo_alpha=alpha)(
            model, batch)["losses"].mean()
        preference = PreferenceObjective(loss_type="sigmoid", reference_free=loss_type == "cpo")(
            model, batch)["losses"].mean()
    torch.testing.assert_close(sft, nll, rtol=1e-5, atol=1e-6)
    assert abs(pairs.item() - nll.item()) > 1e-4
    expected = nll if loss_type == "sft" else preference + alpha * nll
    torch.testing.assert_close(combined, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_type, forwards", [
    ("sigmoid", 2), ("aot", 2), ("sft", 1), ("orpo", 1), ("cpo", 1), ("simpo", 1),
    ("cpo,sft", 1), ("sigmoid,sft", 2),
])
def test_reference_free_losses_run_no_reference_pass(tiny_tokenizer, tiny_model, loss_type,
                                                     forwards):
    calls = []

    def counting_forward(model, batch, **options):
        calls.append(torch.is_grad_enabled())
        return concatenated_token_logps(model, batch, **options)

    objective = PreferenceObjective(loss_type=loss_type, token_logps_fn=counting_forward,
                                    beta=2.0)
    assert objective.uses_reference == (forwards == 2)
    stats = objective(lora(tiny_model), pair_batch(tiny_tokenizer))
    assert len(calls) == forwards and calls[0]  # the policy pass, with grad
    assert torch.isfinite(stats["losses"]).all()


@pytest.mark.parametrize("loss_type, precompute", [
    ("sigmoid", True), ("sigmoid,sft", True), ("sft", False), ("orpo", False), ("cpo", False),
    ("simpo,sft", False),
])
def test_reference_cache_only_for_losses_with_a_reference(loss_type, precompute):
    """A full epoch would precompute (and cache) reference log-probs unless no term uses them."""
    config = TrainConfig(loss_type=loss_type, epochs=1)
    objective = PreferenceObjective.from_config(config, concatenated_token_logps)
    assert resolve_precompute(config, objective.uses_reference, 36, 1) == precompute


def test_mixture_stats_carry_each_term_into_the_metrics(tiny_tokenizer, tiny_model):
    model = lora(tiny_model)
    batch = pair_batch(tiny_tokenizer)
    objective = PreferenceObjective(loss_type="sigmoid,bco_pair,sft",
                                    loss_weights="0.8,0.2,1.0")
    with torch.no_grad():
        stats = objective(model, batch)
        nll = chosen_cross_entropy(model, batch).item()
    # Split in two "micro-batches" as the trainer would log them: still the pair means.
    halves = [{k: v[:3].detach() for k, v in stats.items()},
              {k: v[3:].detach() for k, v in stats.items()}]
    metrics = merged_metrics(halves)
    # A zero-initialised adapter: sigmoid ln 2, bco_pair 2 ln 2, sft the chosen NLL.
    assert metrics["loss/sigmoid"] == pytest.approx(LN2, abs=1e-6)
    assert metrics["loss/bco_pair"] == pytest.approx(2 * LN2, abs=1e-6)
    assert metrics["loss/sft"] == pytest.approx(nll, rel=1e-5)
    assert metrics["loss"] == pytest.approx(0.8 * LN2 + 0.2 * 2 * LN2 + nll, rel=1e-5)


# ------------------------------------------------------------------ train.py end to end

# --loss_type: (extra flags, loss at step 1 with beta 0.1) - docs/losses.md's values.
STEP_ONE = {
    "exo_pair": (["--label_smoothing", "0.001"], -LN2 - 0.5 * math.log(0.001 * 0.999)),
    "nca_pair": ([], 2 * LN2),
    "bco_pair": ([], 2 * LN2),
    "sppo_hard": ([], 2 * (0.5 / 0.1) ** 2),
    "aot": (["--label_smoothing", "0.1"], LN2),
    "aot_unpaired": ([], LN2),
    "apo_zero": ([], 1.0),
    "apo_down": ([], 1.0),
    "discopop": ([], (1 + LN2) / 2),
    "sigmoid_norm": ([], LN2),
    "sigmoid": (["--f_divergence_type", "alpha_divergence", "--f_alpha_divergence_coef", "0.3"],
                LN2),
    "ipo": (["--f_divergence_type", "js_divergence"], (1 / (2 * 0.1)) ** 2),
}


def run_two_steps(tiny_model_dir, pairs_file, out, *flags) -> list[dict]:
    assert train.main(train_args(tiny_model_dir, pairs_file, out, *TWO_STEPS, *flags)) == 0
    log = read_log(out)
    assert [(r["split"], r["step"]) for r in log] == [("train", 1), ("train", 2), ("eval", 2)]
    assert all(math.isfinite(v) for r in log for k, v in r.items() if k != "split")
    return log


@pytest.mark.parametrize("loss_type", list(STEP_ONE))
def test_reference_losses_train_with_their_step_one_value(tiny_model_dir, pairs_file, tmp_path,
                                                          loss_type):
    flags, first_loss = STEP_ONE[loss_type]
    log = run_two_steps(tiny_model_dir, pairs_file, tmp_path / "run", "--loss_type", loss_type,
                        *flags)
    assert log[0]["loss"] == pytest.approx(first_loss, rel=1e-5)
    assert log[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert log[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert log[1]["loss"] != log[0]["loss"]  # the first update changed the policy


@pytest.mark.parametrize("loss_type, flags", [
    ("sft", []), ("orpo", ["--orpo_alpha", "0.5"]), ("cpo", []),
])
def test_reference_free_losses_train_end_to_end(tiny_model_dir, pairs_file, tmp_path,
                                                loss_type, flags):
    out = tmp_path / "run"
    log = run_two_steps(tiny_model_dir, pairs_file, out, "--loss_type", loss_type, *flags)
    first = log[0]
    assert first["loss"] > 0.5  # each carries the chosen NLL of an untrained tiny model
    assert not (out / "reference_logps").exists()
    for record in log:
        if loss_type == "orpo":  # 0.5 x the mean per-token log-prob: above the summed one
            assert record["logps/chosen"] < record["rewards/chosen"] / 0.5 < 0
        else:  # beta x the summed policy log-prob: no reference
            assert record["rewards/chosen"] == pytest.approx(0.1 * record["logps/chosen"],
                                                             rel=1e-5)


def test_mixture_logs_every_term(tiny_model_dir, pairs_file, tmp_path):
    log = run_two_steps(tiny_model_dir, pairs_file, tmp_path / "run", "--loss_type",
                        "sigmoid,bco_pair,sft", "--loss_weights", "0.8,0.2,1.0")
    for record in log:
        terms = [record[f"loss/{name}"] for name in ("sigmoid", "bco_pair", "sft")]
        assert record["loss"] == pytest.approx(
            0.8 * terms[0] + 0.2 * terms[1] + terms[2], rel=1e-5)
    assert log[0]["loss/sigmoid"] == pytest.approx(LN2, rel=1e-5)
    assert log[0]["loss/bco_pair"] == pytest.approx(2 * LN2, rel=1e-5)


@pytest.mark.parametrize("flags, message", [
    (["--loss_type", "exo_pair"], "--loss_type exo_pair needs --label_smoothing > 0"),
    (["--loss_type", "sigmoid,simpo"], "add --reference_free"),
    (["--loss_type", "sigmoid,sft", "--loss_weights", "0.8"],
     "--loss_weights gives 1 weights for 2 loss types"),
    (["--loss_type", "bco_pair", "--f_divergence_type", "forward_kl"],
     "--f_divergence_type forward_kl does not apply to --loss_type bco_pair"),
    (["--loss_type", "orpo", "--precompute_ref_log_probs"],
     "--loss_type orpo uses no reference model: drop --precompute_ref_log_probs"),
    (["--loss_type", "sigmoid,kto"], "unknown --loss_type 'kto'"),
])
def test_invalid_combinations_stop_before_loading(tiny_model_dir, pairs_file, tmp_path, capsys,
                                                  flags, message):
    args = train_args(tiny_model_dir, pairs_file, tmp_path / "x", *TWO_STEPS, *flags)
    assert train.main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before anything was written
