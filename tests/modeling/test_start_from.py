"""Starting DPO from what users have: a trained (SFT) LoRA adapter, or every weight of a small
model (full fine-tuning).

From an adapter, the policy trains that adapter and the reference is the adapter as loaded,
frozen, on the same base: at step 1 the policy is the SFT model (not the base), the loss is
exactly ln 2, and the reference does not move while the policy does.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from conftest import learnable_pairs, read_log, table_rows, train_args, train_records
from launching import BIN, free_port, launch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import chat
import train
from dpo_core.config.fields import build_parser, parse_config
from dpo_core.config.train import TrainConfig
from dpo_core.data.batches import PreferenceCollator
from dpo_core.data.pairs import PreferencePair
from dpo_core.data.tokenization import tokenize_pairs
from dpo_core.data.training_data import build_training_data
from dpo_core.errors import ConfigError, ModelLoadError
from dpo_core.forward.logps import concatenated_forward
from dpo_core.modeling import reference as reference_module
from dpo_core.modeling.adapters import (
    POLICY_ADAPTER,
    REFERENCE_ADAPTER,
    load_inference_model,
    load_trainable_adapter,
)
from dpo_core.modeling.loading import load_run_base_model, load_tokenizer, resolve_quantization
from dpo_core.modeling.reference import AdapterSwitched
from dpo_core.testing import random_lora_adapter, tiny_llama
from dpo_core.training import trainer
from dpo_core.training.objective import PreferenceObjective
from dpo_core.training.reference_logps import reference_cache_key, weights_fingerprint

SWITCHED = AdapterSwitched(reference=REFERENCE_ADAPTER, policy=POLICY_ADAPTER)


@pytest.fixture(scope="module")
def sft_adapter(tiny_model_dir, tmp_path_factory) -> str:
    return random_lora_adapter(tiny_model_dir, tmp_path_factory.mktemp("sft") / "adapter", seed=1)


def policy_from(model_dir: str, adapter: str) -> PeftModel:
    return load_trainable_adapter(AutoModelForCausalLM.from_pretrained(model_dir), adapter,
                                  gradient_checkpointing=False, quantized=False)


def preference_batch(tokenizer, num: int = 6) -> dict[str, torch.Tensor]:
    rows = learnable_pairs(num, seed=5)
    pairs = [PreferencePair(r["prompt"], " " + r["chosen"], " " + r["rejected"]) for r in rows]
    tokenized, _ = tokenize_pairs(tokenizer, pairs, max_length=64, max_prompt_length=32,
                                  use_chat_template=True, disable=True)
    return PreferenceCollator(tokenizer.eos_token_id)(tokenized)


def test_step_one_policy_is_the_sft_model_and_the_reference_stays_fixed(
        tiny_model_dir, tiny_tokenizer, sft_adapter):
    batch = preference_batch(tiny_tokenizer)
    model = policy_from(tiny_model_dir, sft_adapter)
    objective = PreferenceObjective()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(f".{POLICY_ADAPTER}." in n for n in trainable)

    # Independent: plain PEFT loading of the SFT adapter, and the bare base.
    with torch.no_grad():
        sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                        sft_adapter).eval()
        sft_logps = concatenated_forward(sft, batch)
        base_logps = concatenated_forward(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                          batch)
    stats = objective(model, batch, SWITCHED)
    for mine, sfts, bases in zip((stats["policy_chosen_logps"], stats["policy_rejected_logps"]),
                                 sft_logps, base_logps, strict=True):
        torch.testing.assert_close(mine, sfts, rtol=0, atol=1e-5)
        assert (mine - bases).abs().min() > 1e-2  # the base model is another network
    # Policy == reference, computed the same way: h = 0 exactly, loss ln 2 rounded once.
    assert torch.equal(stats["losses"], torch.full_like(stats["losses"], math.log(2)))
    assert torch.equal(stats["chosen_rewards"], torch.zeros_like(stats["chosen_rewards"]))
    assert torch.equal(stats["rejected_rewards"], torch.zeros_like(stats["rejected_rewards"]))

    reference_before = objective.reference_logps(model, batch, SWITCHED)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()
                     if f".{REFERENCE_ADAPTER}." in n}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        objective(model, batch, SWITCHED)["losses"].mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    # The reference pass switched adapters six times; the trainable set is unchanged.
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable
    assert model.active_adapter == POLICY_ADAPTER
    after = objective(model, batch, SWITCHED)
    reference_after = objective.reference_logps(model, batch, SWITCHED)
    for before, now in zip(reference_before, reference_after, strict=True):
        assert torch.equal(before, now)
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters()
               if f".{REFERENCE_ADAPTER}." in n)
    assert (after["policy_chosen_logps"] - sft_logps[0]).abs().max() > 1e-2
    assert after["losses"].mean() < math.log(2)


@pytest.mark.parametrize("hidden_size, num_layers, problem", [
    (48, 2, "size mismatch"),  # another width
    (64, 3, "adapter weights the base expects are not in it"),  # another depth
])
def test_adapter_of_another_base_is_refused(tiny_tokenizer, sft_adapter, hidden_size,
                                            num_layers, problem):
    other = tiny_llama(vocab_size=len(tiny_tokenizer), hidden_size=hidden_size,
                       num_layers=num_layers, num_heads=4)
    with pytest.raises(ModelLoadError, match=problem) as error:
        load_trainable_adapter(other, sft_adapter, gradient_checkpointing=False,
                               quantized=False)
    assert sft_adapter in str(error.value) and "does not fit" in str(error.value)


def test_adapter_for_modules_the_base_lacks_is_refused(tiny_tokenizer, tmp_path):
    # A GPT-2 shaped adapter (c_attn) on a Llama: another architecture.
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=64, n_layer=2,
                                      n_head=4))
    get_peft_model(gpt2, LoraConfig(r=2, target_modules=["c_attn"],
                                    task_type="CAUSAL_LM")).save_pretrained(tmp_path / "gpt2")
    llama = tiny_llama(vocab_size=len(tiny_tokenizer), hidden_size=64, num_layers=2,
                       num_heads=4)
    with pytest.raises(ModelLoadError, match="does not fit.*c_attn"):
        load_trainable_adapter(llama, str(tmp_path / "gpt2"), gradient_checkpointing=False,
                               quantized=False)


def test_cache_key_covers_the_starting_adapter_not_the_trained_one(
        tiny_model_dir, tiny_tokenizer, sft_adapter, tmp_path):
    batch_pairs = tokenize_pairs(tiny_tokenizer, [PreferencePair("a b", " yes", " no")],
                                 max_length=16, max_prompt_length=8, use_chat_template=False,
                                 disable=True)[0]
    model = policy_from(tiny_model_dir, sft_adapter)
    key = reference_cache_key(model, batch_pairs, {})
    # Training moves the policy adapter only: same reference, same key.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f"lora_B.{POLICY_ADAPTER}." in name:
                param.add_(1.0)
    assert reference_cache_key(model, batch_pairs, {}) == key
    # Another starting adapter on the same base: another reference, another key...
    other = random_lora_adapter(tiny_model_dir, tmp_path / "other", seed=2)
    assert reference_cache_key(policy_from(tiny_model_dir, other), batch_pairs, {}) != key
    # ...and the same one loaded again: the same key.
    assert weights_fingerprint(policy_from(tiny_model_dir, sft_adapter)) == \
        weights_fingerprint(model)


@pytest.mark.parametrize("settings, message", [
    ({"quantization": "4bit"}, "no gradient"),
    ({"adapter_path": "org/sft-adapter"}, "merge the adapter into its base first"),
    ({"merge_adapter": True}, "already saves the whole model"),
])
def test_full_finetuning_refuses_what_it_cannot_do(settings, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(finetuning_type="full", **settings).validate()


def test_full_finetuning_never_resolves_auto_to_4bit(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_quantization("auto") is True
    assert resolve_quantization("auto", full_finetuning=True) is False


# ------------------------------------------------------------------ train.py end to end

# 4 steps of 4 pairs reach 16 of the 36 training pairs: the reference is not precomputed
# unless asked, so it runs every step (switched adapter, or a frozen copy).
RUN = ("--max_steps", "4", "--save_steps", "2", "--save_total_limit", "0")


def assert_same_losses(out, reference) -> None:
    mine, theirs = train_records(out), train_records(reference)
    assert [r["step"] for r in mine] == [r["step"] for r in theirs]  # each step exactly once
    for a, b in zip(mine, theirs, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), a["step"]
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-6), a["step"]


def resume_copy(out, tmp_path, args: list[str]) -> str:
    """Resume a copy of the finished run `out` from its checkpoint-2 and run steps 3-4 again."""
    resumed = shutil.copytree(out, tmp_path / "resumed")
    assert train.main([*args, "--output_dir", str(resumed),
                       "--resume_from_checkpoint", str(resumed / "checkpoint-2")]) == 0
    return str(resumed)


@pytest.fixture(scope="module")
def adapter_run(tiny_model_dir, pairs_file, sft_adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("from_adapter")
    args = train_args(tiny_model_dir, pairs_file, out, *RUN, "--adapter_path", sft_adapter,
                      "--merge_adapter")
    assert train.main(args) == 0
    return str(out), args


def test_dpo_from_adapter_starts_at_ln2_and_saves_a_plain_adapter(adapter_run, tiny_model_dir,
                                                                  sft_adapter):
    out, _ = adapter_run
    steps = train_records(out)
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert steps[-1]["loss"] < steps[0]["loss"]
    # Only the trained copy is saved, under the adapter's own names: a plain PEFT adapter.
    assert not os.path.exists(os.path.join(out, REFERENCE_ADAPTER))
    trained = load_file(os.path.join(out, "adapter_model.safetensors"))
    started = load_file(os.path.join(sft_adapter, "adapter_model.safetensors"))
    assert trained.keys() == started.keys()
    assert any(not torch.equal(trained[k], started[k]) for k in started)
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                            out)(ids).logits
        # --merge_adapter merged the trained adapter into the base.
        merged = AutoModelForCausalLM.from_pretrained(os.path.join(out, "merged"))(ids).logits
        chat_model = load_inference_model(tiny_model_dir, out, dtype=torch.float32,
                                          quantize_4bit=False)
        torch.testing.assert_close(chat_model(ids).logits, adapted, rtol=0, atol=1e-6)
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    assert chat.main(["--base_model", tiny_model_dir, "--adapter_path", out, "--prompt", "hello",
                      "--temperature", "0", "--max_new_tokens", "3",
                      "--quantization", "none"]) == 0


def test_dpo_from_adapter_resumes_exactly(adapter_run, tmp_path):
    out, args = adapter_run
    resumed = resume_copy(out, tmp_path, args)
    assert_same_losses(resumed, out)
    final, expected = (load_file(os.path.join(d, "adapter_model.safetensors"))
                       for d in (resumed, out))
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], rtol=0, atol=1e-6)


def test_precomputed_reference_from_adapter_is_the_sft_model(tiny_model_dir, pairs_file,
                                                             sft_adapter, tmp_path):
    out = tmp_path / "precomputed"
    args = train_args(tiny_model_dir, pairs_file, out, "--max_steps", "1", "--adapter_path",
                      sft_adapter, "--precompute_ref_log_probs")
    assert train.main(args) == 0
    # Computed in other batches (other padding) than the policy's: equal to fp32 noise.
    step = train_records(out)[0]
    assert step["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert step["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    # The cached eval values are the SFT model's log-probs, computed here independently.
    caches = [load_file(out / "reference_logps" / name)["reference_logps"]
              for name in os.listdir(out / "reference_logps")]
    cached = next(values for values in caches if len(values) == 12)
    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                    sft_adapter).eval()
    chosen, rejected = run_logps(sft, tiny_model_dir, args)
    torch.testing.assert_close(cached, torch.stack([chosen, rejected], dim=1), rtol=0,
                               atol=1e-4)


def test_qlora_from_adapter(tiny_model_dir, pairs_file, sft_adapter, tmp_path):
    out = tmp_path / "qlora"
    assert train.main(train_args(tiny_model_dir, pairs_file, out, "--max_steps", "2",
                                 "--quantization", "4bit", "--adapter_path", sft_adapter)) == 0
    steps = train_records(out)
    # Both passes run the one 4-bit base with equal adapters: h = 0 exactly at step 1.
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert math.isfinite(steps[1]["loss"]) and steps[1]["grad_norm"] > 0
    trained = load_file(out / "adapter_model.safetensors")
    assert trained.keys() == load_file(os.path.join(sft_adapter,
                                                    "adapter_model.safetensors")).keys()


def full_weights(path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def run_logps(model: torch.nn.Module, model_dir: str,
              args: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected log-probs ([N] each) of the run's eval pairs under `model`, with
    the run's own data preparation."""
    config = parse_config(TrainConfig, build_parser(TrainConfig, ""), args)
    tokenizer = load_tokenizer(model_dir)
    data = build_training_data(config, tokenizer, use_chat_template=True, show_progress=False)
    with torch.no_grad():
        return concatenated_forward(model, PreferenceCollator(tokenizer.pad_token_id)(data.eval))


def eval_chosen_logps(model_dir: str, args: list[str]) -> float:
    """Mean chosen log-prob of the run's eval pairs under the model saved in `model_dir`."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return run_logps(model, model_dir, args)[0].mean().item()


def test_full_finetuning_two_steps_saves_a_loadable_trained_model(tiny_model_dir, pairs_file,
                                                                  tmp_path):
    out = tmp_path / "full"
    # Precomputed reference (the default for full fine-tuning when every pair is trained on;
    # asked for here to keep the run at two steps); one sample reloads the starting model.
    args = train_args(tiny_model_dir, pairs_file, out, "--finetuning_type", "full",
                      "--max_steps", "2", "--precompute_ref_log_probs", "--learning_rate",
                      "1e-3", "--num_sample_prompts", "1")
    assert train.main(args) == 0
    steps = train_records(out)
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert steps[1]["loss"] < steps[0]["loss"]
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    before, after = full_weights(tiny_model_dir), full_weights(out)
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before)  # every weight trained (norms and embeddings too)
    # The saved model gives the trained model's numbers: the final evaluation's log-probs.
    final_eval = [r for r in read_log(out) if r["split"] == "eval"][-1]
    assert eval_chosen_logps(str(out), args) == pytest.approx(final_eval["logps/chosen"],
                                                              abs=1e-4)
    assert eval_chosen_logps(tiny_model_dir, args) != pytest.approx(
        final_eval["logps/chosen"], abs=1e-2)
    assert (out / "samples.md").is_file()


def test_full_finetuning_reads_the_starting_model_once_after_training(
        tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    """With precomputed reference log-probs full fine-tuning keeps no second model: the
    evaluation hook's "before" and the samples' base column share one read from disk."""
    loads = []

    def counted_load(*args, **kwargs):
        loads.append(args)
        return load_run_base_model(*args, **kwargs)

    monkeypatch.setattr(reference_module, "load_run_base_model", counted_load)

    def weight_sum(model, tokenizer) -> dict:
        return {"weight_sum": sum(p.double().sum().item() for p in model.parameters())}

    args = train_args(tiny_model_dir, pairs_file, tmp_path / "full", "--finetuning_type",
                      "full", "--max_steps", "2", "--precompute_ref_log_probs",
                      "--learning_rate", "1e-3", "--num_sample_prompts", "2")
    metrics = trainer.train(parse_config(TrainConfig, build_parser(TrainConfig, ""), args),
                            evaluation_hook=weight_sum)
    assert len(loads) == 1
    starting = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert metrics["before"] == pytest.approx(weight_sum(starting, None), rel=1e-12)
    trained = AutoModelForCausalLM.from_pretrained(str(tmp_path / "full"))
    assert metrics["after"] == pytest.approx(weight_sum(trained, None), rel=1e-9)
    assert metrics["after"] != pytest.approx(metrics["before"], rel=1e-6)
    assert len(table_rows((tmp_path / "full" / "samples.md").read_text())) == 2


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, pairs_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("full_frozen_copy")
    args = train_args(tiny_model_dir, pairs_file, out, *RUN, "--finetuning_type", "full",
                      "--learning_rate", "1e-3")
    assert train.main(args) == 0
    return str(out), args


def test_full_finetuning_with_a_frozen_reference_copy_resumes_exactly(full_run, tmp_path):
    out, args = full_run
    steps = train_records(out)
    # The frozen copy runs the same network as the policy at step 1: h = 0 exactly.
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert sorted(os.listdir(os.path.join(out, "checkpoint-2"))) == [
        "model", "optimizer.pt", "rng_state_0.pt", "trainer_state.json"]
    resumed = resume_copy(out, tmp_path, args)
    assert_same_losses(resumed, out)
    final, expected = full_weights(resumed), full_weights(out)
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], rtol=0, atol=1e-6)


def test_checkpoint_of_the_other_kind_is_refused(full_run, tiny_model_dir, pairs_file,
                                                 tmp_path, capsys):
    out, _ = full_run
    copy = shutil.copytree(out, tmp_path / "lora_resume")
    args = train_args(tiny_model_dir, pairs_file, copy, *RUN, "--resume_from_checkpoint",
                      str(copy / "checkpoint-2"))
    assert train.main(args) == 2
    assert "holds no LoRA adapter" in capsys.readouterr().err


def test_resume_from_another_start_is_refused(adapter_run, tiny_model_dir, pairs_file,
                                              tmp_path, capsys):
    """A checkpoint of DPO from an SFT adapter, resumed without it: the reference would be
    the bare base, not the SFT model the checkpoint trained against. Refused, nothing
    touched."""
    out, _ = adapter_run
    copy = shutil.copytree(out, tmp_path / "no_adapter")
    before = sorted(p.name for p in copy.iterdir())
    args = train_args(tiny_model_dir, pairs_file, copy, *RUN, "--resume_from_checkpoint",
                      str(copy / "checkpoint-2"))
    assert train.main(args) == 2
    err = capsys.readouterr().err
    saved = json.loads((copy / "checkpoint-2" / "trainer_state.json").read_text())
    assert saved["started_from"]["--adapter_path"] is not None
    assert (f"was trained from --adapter_path {saved['started_from']['--adapter_path']!r} "
            "(now None); its weights and its reference belong to that start") in err
    assert sorted(p.name for p in copy.iterdir()) == before
    assert len(train_records(copy)) == 4  # the log was not truncated


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["adapter", "full"])
def test_two_processes_match_one(kind, adapter_run, full_run, tmp_path):
    """`accelerate launch` with 2 CPU processes x 2 pairs against the 1 x 4 pairs run above:
    the switched reference adapter and the full model's gradients are shared alike."""
    out, args = adapter_run if kind == "adapter" else full_run
    ddp = tmp_path / "ddp"
    launch([os.path.join(BIN, "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port())],
           [*args, "--output_dir", str(ddp), "--batch_size", "2"], tmp_path)
    mine, theirs = train_records(ddp), train_records(out)
    assert [r["step"] for r in mine] == [1, 2, 3, 4]
    for a, b in zip(mine, theirs, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), a["step"]
    if kind == "adapter":
        final, expected = (load_file(os.path.join(d, "adapter_model.safetensors"))
                           for d in (ddp, out))
    else:
        final, expected = full_weights(ddp), full_weights(out)
    assert final.keys() == expected.keys()
    for name in expected:
        # As in test_distributed: Adam amplifies fp32 round-off in near-zero gradients.
        torch.testing.assert_close(final[name], expected[name], rtol=1e-4, atol=1e-5)
