"""TR-DPO's moving reference (--sync_ref_model): with LoRA a second adapter mixed toward the
policy adapter, with QLoRA the same, with full fine-tuning a frozen copy. With alpha 1 the
reference equals the policy right after each sync, so the next step's loss is ln 2; a resume
restores the reference exactly; two processes make the run of one."""

from __future__ import annotations

import math
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from conftest import train_args, train_records
from launching import BIN, assert_same_run, free_port, launch
from peft import PeftModel
from safetensors.torch import load_file
from test_start_from import preference_batch
from transformers import AutoModelForCausalLM

import train
from dpo_core.config.train import TrainConfig
from dpo_core.errors import CheckpointError, ConfigError
from dpo_core.forward.logps import concatenated_token_logps
from dpo_core.modeling.adapters import (
    POLICY_ADAPTER,
    REFERENCE_ADAPTER,
    add_lora,
    add_reference_adapter,
    load_trainable_adapter,
)
from dpo_core.modeling.backends import check_backend
from dpo_core.modeling.reference import (
    AdapterSwitched,
    adapter_disabled,
    reference_sync,
    starting_model_for,
)
from dpo_core.testing import random_lora_adapter
from dpo_core.training.checkpoint import REFERENCE_FILE
from dpo_core.training.objective import PreferenceObjective

LN2 = math.log(2)
SWITCHED = AdapterSwitched(reference=REFERENCE_ADAPTER, policy=POLICY_ADAPTER)
# alpha 1 every 2 steps: the reference is the policy of step 2 during steps 3 and 4.
HARD_SYNC = ("--sync_ref_model", "--ref_model_mixup_alpha", "1", "--ref_model_sync_steps", "2")
RUN = ("--max_steps", "4", "--save_steps", "3", "--max_grad_norm", "0", *HARD_SYNC)


def policy_with_reference(model):
    """A fresh LoRA policy on every linear layer, and its reference adapter."""
    return add_reference_adapter(add_lora(model, r=4, alpha=8, dropout=0.0,
                                          target_modules="all-linear",
                                          gradient_checkpointing=False, quantized=False))


def adapter_weights(model, adapter: str) -> dict[str, torch.Tensor]:
    """The LoRA factors of `adapter`, keyed by the policy's names."""
    return {name.replace(f".{adapter}.", f".{POLICY_ADAPTER}."): weight.detach().clone()
            for name, weight in model.named_parameters() if f".{adapter}." in name}


# ---------------------------------------------------------------- the reference adapter


def test_reference_adapter_starts_as_the_base_model_and_stays_frozen(tiny_tokenizer,
                                                                     tiny_model):
    """A fresh policy adapter's frozen copy: equal factors, no gradient, and (B = 0) the
    reference pass through it is the base model's, bit for bit, before and after switching."""
    model = policy_with_reference(tiny_model)
    assert adapter_weights(model, REFERENCE_ADAPTER).keys() == adapter_weights(
        model, POLICY_ADAPTER).keys()
    for name, weight in adapter_weights(model, REFERENCE_ADAPTER).items():
        assert torch.equal(weight, adapter_weights(model, POLICY_ADAPTER)[name])
    batch = preference_batch(tiny_tokenizer)
    objective = PreferenceObjective()
    with torch.no_grad():
        switched = objective.reference_logps(model, batch, SWITCHED)
        base = objective.reference_logps(model, batch, adapter_disabled)
    for a, b in zip(switched, base, strict=True):
        assert torch.equal(a, b)
    trainable = {name for name, w in model.named_parameters() if w.requires_grad}
    assert trainable and all(f".{POLICY_ADAPTER}." in name for name in trainable)


def test_soft_sync_mixes_each_lora_factor_and_round_trips(tiny_model):
    """ref <- alpha * policy + (1 - alpha) * ref for every A and B factor (alpha 0.25), not
    for their product: B_ref A_ref is then not the mix of the two adapters' B A. The state a
    checkpoint saves restores the reference exactly; another adapter's state is refused."""
    model = policy_with_reference(tiny_model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.requires_grad:
                weight.add_(torch.randn(weight.shape, generator=generator))
    sync = reference_sync(TrainConfig(sync_ref_model=True, ref_model_mixup_alpha=0.25), model,
                          SWITCHED)
    assert len(sync.weights) == len(adapter_weights(model, POLICY_ADAPTER)) > 0
    before, policy = adapter_weights(model, REFERENCE_ADAPTER), adapter_weights(model,
                                                                               POLICY_ADAPTER)
    saved = sync.state_dict()
    sync()
    after = adapter_weights(model, REFERENCE_ADAPTER)
    for name in before:
        torch.testing.assert_close(after[name], 0.75 * before[name] + 0.25 * policy[name],
                                   rtol=0, atol=1e-7)
    a, b = (name for name in sorted(after) if "q_proj" in name and "layers.0" in name)
    product = after[b] @ after[a]  # B A of the mixed reference
    mixed = 0.75 * before[b] @ before[a] + 0.25 * policy[b] @ policy[a]
    assert (product - mixed).abs().max() > 1e-3
    sync.load_state_dict(saved, "checkpoint-x")
    for name, weight in adapter_weights(model, REFERENCE_ADAPTER).items():
        assert torch.equal(weight, before[name])
    with pytest.raises(CheckpointError, match="moving reference of other weights"):
        sync.load_state_dict({k: v for k, v in list(saved.items())[1:]}, "checkpoint-x")


def test_the_start_is_the_sft_adapter_read_again_after_the_reference_moved(
        tiny_model_dir, tiny_tokenizer, tmp_path):
    """DPO from an SFT adapter with --sync_ref_model: once the reference adapter has moved,
    the starting model (samples.md's "before") is the adapter read from disk again, equal to
    the SFT model itself; afterwards only the policy and reference adapters remain, the
    policy active."""
    sft = random_lora_adapter(tiny_model_dir, tmp_path / "sft", seed=1)
    config = TrainConfig(model_name=tiny_model_dir, adapter_path=sft, sync_ref_model=True,
                         ref_model_mixup_alpha=1.0)
    model = load_trainable_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), sft,
                                   gradient_checkpointing=False, quantized=False)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.requires_grad:  # the policy trained ...
                weight.add_(0.1)
    reference_sync(config, model, SWITCHED)()  # ... and the reference followed it
    start = starting_model_for(config, model, None, SWITCHED)
    batch = preference_batch(tiny_tokenizer)
    objective = PreferenceObjective()
    sft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                          sft)
    with torch.no_grad():
        moved = objective.reference_logps(model, batch, SWITCHED)
        started = objective.reference_logps(model, batch, start)
        expected = objective.sequence_logps(concatenated_token_logps(sft_model, batch))
    for got, want, other in zip(started, expected, moved, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert (other - want).abs().max() > 1e-3
    assert set(model.peft_config) == {POLICY_ADAPTER, REFERENCE_ADAPTER}
    assert model.active_adapter == POLICY_ADAPTER


# ---------------------------------------------------------------- train.py end to end


class Watching(PreferenceObjective):
    """Records, at every training call (one per step here), how far the reference adapter
    is from the policy adapter, and the reference's factors."""

    calls: list[tuple[float, dict[str, torch.Tensor]]] = []

    def __call__(self, model, batch, reference=None):
        if torch.is_grad_enabled():
            ref = adapter_weights(model, REFERENCE_ADAPTER)
            policy = adapter_weights(model, POLICY_ADAPTER)
            gap = max((ref[n] - policy[n]).abs().max().item() for n in ref)
            Watching.calls.append((gap, ref))
        return super().__call__(model, batch, reference)


def watched_run(args: list[str]) -> list[tuple[float, dict[str, torch.Tensor]]]:
    Watching.calls = []
    assert train.main(args, make_objective=Watching.from_config) == 0
    return Watching.calls


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, pairs_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("tr_dpo")
    args = train_args(tiny_model_dir, pairs_file, out, *RUN)
    return str(out), args, watched_run(args)


def test_hard_sync_puts_the_reference_on_the_policy_and_the_loss_back_to_ln2(lora_run):
    """Steps 1 and 3 start with the reference equal to the policy (a copy, then the sync after
    step 2): loss ln 2, rewards 0. Steps 2 and 4 see a policy that moved since."""
    out, _, calls = lora_run
    gaps = [gap for gap, _ in calls]
    assert gaps[0] == gaps[2] == 0.0 and gaps[1] > 0 and gaps[3] > 0
    losses = [r["loss"] for r in train_records(out)]
    assert losses[0] == pytest.approx(LN2, abs=1e-6) and losses[2] == pytest.approx(LN2,
                                                                                      abs=1e-6)
    assert abs(losses[1] - LN2) > 1e-3 and abs(losses[3] - LN2) > 1e-3
    assert train_records(out)[2]["rewards/margins"] == pytest.approx(0.0, abs=1e-7)
    saved = load_file(os.path.join(out, "checkpoint-3", REFERENCE_FILE))
    reference_at_step_3 = calls[2][1]
    assert len(saved) == len(reference_at_step_3)
    for name, weight in saved.items():
        policy_name = name.replace(f".{REFERENCE_ADAPTER}.", f".{POLICY_ADAPTER}.")
        assert torch.equal(weight, reference_at_step_3[policy_name])
    # The saved adapter is the policy's alone.
    assert not any(REFERENCE_ADAPTER in k
                   for k in load_file(os.path.join(out, "adapter_model.safetensors")))


def test_resume_restores_the_reference_exactly(lora_run, tmp_path):
    out, args, calls = lora_run
    resumed = shutil.copytree(out, tmp_path / "resumed")
    again = watched_run([*args, "--output_dir", str(resumed), "--resume_from_checkpoint",
                         str(resumed / "checkpoint-3")])
    assert len(again) == 1  # step 4
    for name, weight in again[0][1].items():
        assert torch.equal(weight, calls[3][1][name]), name
    mine, theirs = train_records(resumed)[-1], train_records(out)[-1]
    assert (mine["step"], mine["loss"], mine["grad_norm"]) == (4, theirs["loss"],
                                                               theirs["grad_norm"])


def test_resume_without_sync_ref_model_is_refused(lora_run, tmp_path, capsys):
    out, args, _ = lora_run
    copy = shutil.copytree(out, tmp_path / "copy")
    plain = [a for a in args if a not in HARD_SYNC[:1]]
    assert train.main([*plain, "--output_dir", str(copy), "--resume_from_checkpoint",
                       str(copy / "checkpoint-3")]) == 2
    assert "was trained from --sync_ref_model True (now False)" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_match_one(lora_run, tmp_path):
    """`accelerate launch`, 2 CPU processes x 2 pairs against the 1 x 4 run: each process
    moves its own reference adapter, and they stay the one of the single process."""
    out, args, _ = lora_run
    ddp = tmp_path / "ddp"
    launch([os.path.join(BIN, "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port())],
           [*args, "--output_dir", str(ddp), "--batch_size", "2"], tmp_path)
    assert_same_run(ddp, out)
    assert train_records(ddp)[2]["loss"] == pytest.approx(LN2, abs=1e-6)


@pytest.mark.parametrize("start", ["qlora", "full", "sft adapter"])
def test_every_kind_of_reference_moves(start, tiny_model_dir, pairs_file, tmp_path):
    """QLoRA (the reference adapter on the 4-bit base), full fine-tuning (a frozen copy) and
    DPO from an SFT adapter (its frozen copy moves; samples.md's "before" reads the adapter
    from disk again): after the sync of step 2 the loss is ln 2 again."""
    flags = {"qlora": ["--quantization", "4bit"], "full": ["--finetuning_type", "full"],
             "sft adapter": ["--adapter_path",
                             random_lora_adapter(tiny_model_dir, tmp_path / "sft", seed=1),
                             "--num_sample_prompts", "1"]}[start]
    out = tmp_path / "run"
    assert train.main(train_args(tiny_model_dir, pairs_file, out, "--max_steps", "3",
                                 *HARD_SYNC, *flags)) == 0
    losses = [r["loss"] for r in train_records(out)]
    assert losses[0] == pytest.approx(LN2, abs=1e-5) and abs(losses[1] - LN2) > 1e-3
    assert losses[2] == pytest.approx(LN2, abs=1e-6)
    assert (start == "sft adapter") == (out / "samples.md").exists()


@pytest.mark.parametrize("flags, message", [
    (["--precompute_ref_log_probs"], "reference log-probs computed before it would go stale"),
    (["--reference_free"], "this run uses none (--reference_free)"),
    (["--loss_type", "sft"], "this run uses none (--loss_type sft)"),
    (["--ref_model_mixup_alpha", "0"], "--ref_model_mixup_alpha must be in (0, 1]"),
])
def test_what_cannot_move_is_refused(flags, message, tiny_model_dir, pairs_file, tmp_path,
                                     capsys):
    args = train_args(tiny_model_dir, pairs_file, tmp_path / "x", "--sync_ref_model", *flags)
    assert train.main(args) == 2
    assert message in capsys.readouterr().err


def test_fsdp_is_refused_naming_the_flag():
    """The moving reference is checkpointed whole, not sharded: FSDP asks to drop it."""
    fsdp2 = SimpleNamespace(distributed_type=DistributedType.FSDP,
                            fsdp_plugin=SimpleNamespace(fsdp_version=2, use_orig_params=True))
    with pytest.raises(ConfigError, match="no --sync_ref_model .its moving reference is "
                                          "mixed and checkpointed whole"):
        check_backend(TrainConfig(sync_ref_model=True), fsdp2, quantize=False)
