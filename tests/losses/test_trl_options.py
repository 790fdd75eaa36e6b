"""trl's other DPO options: LD-DPO's --ld_alpha and WPO's --use_weighting against hand-worked
float64 values and against trl 1.16's own `DPOTrainer._compute_loss` on the same token ids;
TR-DPO's reference update against trl's `SyncRefModelCallback`; the option checks."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from test_loss_train import LN2, lora, pair_batch, run_two_steps

from dpo_core.config.train import TrainConfig
from dpo_core.errors import ConfigError
from dpo_core.forward.logps import concatenated_token_logps
from dpo_core.losses.functions import length_desensitized_logps, wpo_weights
from dpo_core.losses.options import LossSettings
from dpo_core.losses.preference import preference_loss, preference_metrics
from dpo_core.modeling.reference import FrozenCopy, reference_sync
from dpo_core.testing import tiny_llama
from dpo_core.training.objective import PreferenceObjective

F64 = torch.float64


def tokens(*per_sequence: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(token log-probs [N], sequence index [N]) of the sequences given in order, interleaved
    the way a prefix-shared forward lists them (pair by pair, chosen then rejected), to show
    that only the order within a sequence matters."""
    num_pairs = len(per_sequence) // 2
    order = [s for b in range(num_pairs) for s in (b, num_pairs + b)]
    values = [v for s in order for v in per_sequence[s]]
    index = [s for s in order for _ in per_sequence[s]]
    return torch.tensor(values, dtype=F64), torch.tensor(index)


# ---------------------------------------------------------------- LD-DPO, by hand


def test_length_desensitized_logps_hand_worked():
    """Pair 0: chosen (-1, -2, -3), rejected (-4): both share 1 token; chosen is -1 + alpha
    (-2 - 3), rejected -4. Pair 1: chosen (-0.5), rejected (-1, -1): rejected's tail is its
    second token. alpha = 1 gives the plain sums, alpha = 0 cuts each reply to the shared
    length."""
    values, index = tokens([-1.0, -2.0, -3.0], [-0.5], [-4.0], [-1.0, -1.0])
    chosen, rejected = length_desensitized_logps(values, index, 2, 0.5)
    assert chosen.tolist() == pytest.approx([-3.5, -0.5], abs=1e-15)
    assert rejected.tolist() == pytest.approx([-4.0, -1.5], abs=1e-15)
    plain = length_desensitized_logps(values, index, 2, 1.0)
    assert [v.tolist() for v in plain] == [[-6.0, -0.5], [-4.0, -2.0]]
    cut = length_desensitized_logps(values, index, 2, 0.0)
    assert [v.tolist() for v in cut] == [[-1.0, -0.5], [-4.0, -1.0]]


def test_wpo_weights_hand_worked():
    """Pair 0: one chosen token of p = 1/2 from (1/2, 1/2): log p - log sum p^2 = 0, w = 1;
    one rejected token of p = 1/4 from (1/2, 1/4, 1/4): sum p^2 = 3/8, w = 2/3. Pair 1: two
    chosen tokens, p = 1/2 from (1/2, 1/2) and p = 1 from (1): mean(0, 0) = 0, w = 1; rejected
    p = 1/2 from (1/2, 1/4, 1/4): w = (1/2) / (3/8) = 4/3. Weights 2/3 and 4/3, detached."""
    values, index = tokens([math.log(1 / 2)], [math.log(1 / 2), 0.0], [math.log(1 / 4)],
                           [math.log(1 / 2)])
    values.requires_grad_(True)
    sum_sq = {math.log(1 / 2): math.log(1 / 2), 0.0: 0.0}
    log_sum_sq = torch.tensor([sum_sq.get(v, math.log(3 / 8)) for v in values.tolist()],
                              dtype=F64)
    log_sum_sq[index >= 2] = math.log(3 / 8)  # both rejected tokens: (1/2, 1/4, 1/4)
    weights = wpo_weights(values, log_sum_sq, index, 2)
    assert weights.tolist() == pytest.approx([2 / 3, 4 / 3], abs=1e-15)
    assert not weights.requires_grad


def test_pair_weights_scale_every_term_and_are_required_exactly_with_use_weighting():
    """sigmoid + 0.5 bco_pair at c = r = 0 (ln 2 + 0.5 * 2 ln 2) under pair weights (1/2, 2):
    the total and each logged term scale by the pair's weight; the rewards do not."""
    settings = LossSettings(loss_type="sigmoid,bco_pair", loss_weights="1,0.5",
                            use_weighting=True)
    zero = torch.zeros(2, dtype=F64)
    args = (zero, zero, zero, zero)
    lengths = {"chosen_lengths": torch.ones(2), "rejected_lengths": torch.ones(2)}
    weights = torch.tensor([0.5, 2.0], dtype=F64)
    terms = preference_loss(settings, *args, **lengths, pair_weights=weights)
    assert terms.losses.tolist() == pytest.approx([LN2, 4 * LN2], abs=1e-15)
    assert terms.components["bco_pair"].tolist() == pytest.approx([LN2, 4 * LN2], abs=1e-15)
    assert terms.chosen_rewards.tolist() == [0.0, 0.0]
    metrics = preference_metrics(terms.losses, terms.chosen_rewards, terms.rejected_rewards,
                                 zero, zero, wpo_weights=weights)
    assert metrics["wpo_weight"].item() == pytest.approx(1.25)
    with pytest.raises(ValueError, match="pass pair_weights"):
        preference_loss(settings, *args, **lengths)
    with pytest.raises(ValueError, match="pass pair_weights"):
        preference_loss(LossSettings(), *args, **lengths, pair_weights=weights)


@pytest.mark.parametrize("options, message", [
    ({"ld_alpha": 1.5}, "--ld_alpha must be in [0, 1]"),
    ({"ld_alpha": 0.5, "loss_type": "sigmoid,sft"}, "--ld_alpha does not apply to --loss_type sft"),
    ({"ld_alpha": 0.5, "loss_type": "rpo"}, "--ld_alpha does not apply to --loss_type rpo"),
    ({"use_weighting": True, "loss_type": "aot"}, "--use_weighting weighs each pair's loss"),
])
def test_options_that_cannot_work_are_refused(options, message):
    with pytest.raises(ConfigError) as error:
        LossSettings(**options)
    assert message in str(error.value)


# ---------------------------------------------------------------- against trl 1.16


@pytest.fixture()
def policy(tiny_model):
    """A LoRA policy whose adapter is not zero, so policy and reference differ."""
    model = lora(tiny_model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.5)
    return model


def test_ld_alpha_and_use_weighting_equal_trl_compute_loss(tiny_tokenizer, policy, tmp_path):
    """trl 1.16's DPOTrainer (the PEFT policy; reference: adapter off) and this objective on
    the same token ids: the same loss with --ld_alpha, with --use_weighting and with both
    (pairs of unequal reply lengths, so LD's tail and WPO's weights both matter)."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    batch = pair_batch(tiny_tokenizer)
    lengths = [(batch[f"{side}_labels"] != -100).sum(-1) for side in ("chosen", "rejected")]
    assert bool((lengths[0] != lengths[1]).any())
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2
    args = trl.DPOConfig(output_dir=str(tmp_path), beta=0.5, ld_alpha=0.5, use_weighting=True,
                         report_to="none", use_cpu=True, bf16=False)
    tiny_tokenizer = copy.deepcopy(tiny_tokenizer)
    trainer = trl.DPOTrainer(model=policy, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tiny_tokenizer)
    # trl takes a given adapter for a starting (SFT) one and copies it as its reference ("ref");
    # without that copy its reference is the adapter switched off, as ours.
    policy.delete_adapter("ref")
    examples = [
        {"prompt_ids": ids[mask & (labels == -100)].tolist(),
         "chosen_ids": ids[labels != -100].tolist(),
         "rejected_ids": rej_ids[rej_labels != -100].tolist()}
        for ids, mask, labels, rej_ids, rej_labels in zip(
            batch["chosen_input_ids"], batch["chosen_attention_mask"].bool(),
            batch["chosen_labels"], batch["rejected_input_ids"], batch["rejected_labels"],
            strict=True)]
    trl_batch = DataCollatorForPreference(pad_token_id=tiny_tokenizer.eos_token_id)(examples)
    for ld_alpha, use_weighting in [(0.5, False), (None, True), (0.5, True)]:
        trainer.ld_alpha, trainer.use_weighting = ld_alpha, use_weighting
        with torch.no_grad():
            expected = trainer._compute_loss(policy, trl_batch, return_outputs=False)
            ours = PreferenceObjective(beta=0.5, ld_alpha=ld_alpha, use_weighting=use_weighting)(
                policy, batch)["losses"].mean()
            plain = PreferenceObjective(beta=0.5)(policy, batch)["losses"].mean()
        assert abs(ours.item() - plain.item()) > 1e-3  # the option changes the loss
        torch.testing.assert_close(ours, expected.float(), rtol=1e-5, atol=1e-6)


def test_reference_sync_equals_trl_sync_ref_model_callback():
    """TR-DPO's update of a full model (`reference_sync` of a frozen copy) against trl's own
    callback, soft and hard: bit for bit."""
    pytest.importorskip("trl")
    from trl.trainer.callbacks import SyncRefModelCallback

    policy = tiny_llama(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, seed=1)
    start = tiny_llama(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, seed=2)
    for alpha in (0.3, 1.0):
        ours, theirs = copy.deepcopy(start), copy.deepcopy(start)
        config = TrainConfig(finetuning_type="full", sync_ref_model=True,
                             ref_model_mixup_alpha=alpha)
        reference_sync(config, policy, FrozenCopy(ours))()
        SyncRefModelCallback._sync_target_model(policy, theirs, alpha)
        for (name, mine), trls in zip(ours.named_parameters(), theirs.parameters(), strict=True):
            assert torch.equal(mine, trls), name
        if alpha == 1.0:
            assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), policy.parameters(),
                                                         strict=True))


def test_ld_alpha_applies_to_the_reference_too(tiny_tokenizer, policy):
    """trl weighs the reference's log-probs as the policy's: with the adapter switched off the
    reference pass gives the LD sums of the base model's tokens."""
    batch = pair_batch(tiny_tokenizer)
    objective = PreferenceObjective(beta=0.1, ld_alpha=0.25)
    with torch.no_grad(), policy.disable_adapter():
        base = concatenated_token_logps(policy, batch)
        expected = length_desensitized_logps(base.logps, base.sequence_index, base.num_pairs,
                                             0.25)
    with torch.no_grad():
        got = objective.reference_logps(policy, batch)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------- train.py end to end


def test_use_weighting_two_steps(tiny_model_dir, pairs_file, tmp_path):
    """Step 1: every pair's DPO loss is ln 2, so the batch loss is ln 2 times the mean WPO
    weight, which is logged (also for evaluation)."""
    log = run_two_steps(tiny_model_dir, pairs_file, tmp_path / "run", "--use_weighting")
    assert 0 < log[0]["wpo_weight"] != 1
    assert log[0]["loss"] == pytest.approx(LN2 * log[0]["wpo_weight"], rel=1e-5)
    assert "wpo_weight" in log[-1] and log[1]["loss"] != log[0]["loss"]


def test_ld_alpha_offloading_and_rounding_two_steps(tiny_model_dir, pairs_file, tmp_path):
    """LD-DPO in the loop (policy and reference weighted alike: ln 2 at step 1), with padded
    rows rounded to 16 and --activation_offloading, which the run plan records as off on a
    CPU-only machine (nothing to move)."""
    out = tmp_path / "run"
    log = run_two_steps(tiny_model_dir, pairs_file, out, "--ld_alpha", "0.5",
                        "--pad_to_multiple_of", "16", "--activation_offloading",
                        "--no-padding_free")
    assert log[0]["loss"] == pytest.approx(LN2, abs=1e-6) and log[1]["loss"] != log[0]["loss"]
    config = json.loads((out / "training_config.json").read_text())
    assert config["activation_offloading"] is True
    assert config["run_plan"]["activation_offloading"] is False
