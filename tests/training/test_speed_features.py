"""Speed and memory flags change how fast training runs, never what it computes.

Prefix sharing and precomputed reference log-probs must reproduce the standard path's
training run; the reference cache must be reused when nothing changed and rebuilt when
anything did; length grouping must visit every pair once per epoch, deterministically; and
gradient checkpointing must give the same gradients as keeping the activations.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import traceback

import pytest
import torch
from accelerate import Accelerator
from conftest import ROOT, learnable_pairs, read_log, train_args
from torch.utils._python_dispatch import TorchDispatchMode

import train
from dpo_core.config.fields import build_parser
from dpo_core.config.train import TrainConfig
from dpo_core.data.batches import (
    MicroBatchStream,
    PreferenceCollator,
    epoch_order,
    length_sorted_order,
    pair_lengths,
)
from dpo_core.data.pairs import PreferencePair
from dpo_core.data.tokenization import TokenizedPair, tokenize_pairs
from dpo_core.errors import ConfigError
from dpo_core.forward.logps import concatenated_forward
from dpo_core.modeling.adapters import add_lora
from dpo_core.modeling.loading import load_base_model, resolve_gradient_checkpointing
from dpo_core.training.objective import PreferenceObjective
from dpo_core.training.plan import covers_every_pair
from dpo_core.training.reference_logps import (
    PairWithReference,
    ReferenceLogpsCollator,
    with_reference_logps,
)

LOGGED = ("loss", "logps/chosen", "logps/rejected", "rewards/margins", "grad_norm")


def tokenized_pairs(tokenizer, num: int = 12) -> list:
    rows = learnable_pairs(num, seed=3)
    pairs = [PreferencePair(r["prompt"], " " + r["chosen"], " " + r["rejected"]) for r in rows]
    tokenized, dropped = tokenize_pairs(tokenizer, pairs, max_length=64, max_prompt_length=32,
                                        use_chat_template=True, disable=True)
    assert not dropped
    return tokenized


def lora_model(model, gradient_checkpointing: bool = False, quantized: bool = False):
    return add_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear",
                    gradient_checkpointing=gradient_checkpointing, quantized=quantized)


# ------------------------------------------------------------------ trainer runs


# 9 steps of 4 pairs: one epoch of the 36 training pairs (12 more are held out for eval).
ONE_EPOCH = ("--max_steps", "9")


@pytest.fixture(scope="module")
def standard_run(tiny_model_dir, pairs_file, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("standard")
    args = train_args(tiny_model_dir, pairs_file, out, *ONE_EPOCH, "--no-prefix_sharing",
                      "--no-precompute_ref_log_probs", "--no-padding_free")
    assert train.main(args) == 0
    return read_log(out)


@pytest.mark.parametrize("flags", [
    ("--prefix_sharing", "--no-precompute_ref_log_probs"),
    ("--no-prefix_sharing", "--precompute_ref_log_probs", "--ref_batch_size", "5"),
    ("--padding_free", "--no-prefix_sharing", "--no-precompute_ref_log_probs"),
    ("--padding_free", "--prefix_sharing", "--precompute_ref_log_probs"),
    # All unset: the reference is precomputed (the run trains on every pair) and prefix
    # sharing is used where it pays (these prompts are long next to their replies).
    ("--no-padding_free",),
    # Padding-free, prompts shared, reference precomputed.
    (),
], ids=["prefix_sharing", "precompute_ref_log_probs", "padding_free",
        "padding_free+prefix+precompute", "padded_defaults", "defaults"])
def test_speed_flags_reproduce_the_standard_run(standard_run, tiny_model_dir, pairs_file,
                                                tmp_path, flags):
    """Every logged train step (loss, log-probs, rewards, gradient norm) and the final
    evaluation match the standard path; the precomputed run caches train and eval values."""
    out = tmp_path / "run"
    assert train.main(train_args(tiny_model_dir, pairs_file, out, *ONE_EPOCH, *flags)) == 0
    log = read_log(out)
    assert [(r["split"], r["step"]) for r in log] == [(r["split"], r["step"])
                                                       for r in standard_run]
    for ours, expected in zip(log, standard_run, strict=True):
        for key in LOGGED:
            if key in expected:
                assert ours[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-5), key
    precomputed = "--no-precompute_ref_log_probs" not in flags
    assert (out / "reference_logps").is_dir() == precomputed
    if precomputed:
        cached = os.listdir(out / "reference_logps")
        assert len(cached) == 2 and all(name.endswith(".safetensors") for name in cached)


def test_padding_free_with_accumulation_reproduces_padded_steps(tiny_model_dir, pairs_file,
                                                                 tmp_path):
    """Three micro-batches per step, last one smaller: the same losses and gradient norms."""
    logs = []
    for flag in ("--no-padding_free", "--padding_free"):
        out = tmp_path / flag
        assert train.main(train_args(tiny_model_dir, pairs_file, out, "--max_steps", "3",
                                     "--gradient_accumulation_steps", "3", "--batch_size", "5",
                                     flag)) == 0
        logs.append([r for r in read_log(out) if r["split"] == "train"])
    assert len(logs[0]) == len(logs[1]) == 3
    for ours, expected in zip(logs[1], logs[0], strict=True):
        for key in ("loss", "grad_norm", "logps/chosen", "rewards/margins"):
            assert ours[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-5), key


def test_speed_defaults_and_bad_settings():
    config = TrainConfig()
    assert config.prefix_sharing is None and config.precompute_ref_log_probs is None
    assert config.padding_free is None
    # Unset, the precompute flag never conflicts with a loss that has no reference ...
    TrainConfig(loss_type="simpo").validate()
    # ... asked for explicitly, it does.
    with pytest.raises(ConfigError, match="precompute_ref_log_probs"):
        TrainConfig(loss_type="simpo", precompute_ref_log_probs=True).validate()
    with pytest.raises(ConfigError, match="--ref_batch_size"):
        TrainConfig(ref_batch_size=-1).validate()


def test_prefix_sharing_is_chosen_per_batch_where_it_saves_tokens(tiny_tokenizer, tiny_model,
                                                                   monkeypatch):
    from dpo_core.forward import prefix_sharing

    calls = []

    def spy(name: str):
        function = getattr(prefix_sharing, name)

        def recorded(model, batch, **options):
            calls.append(name)
            return function(model, batch, **options)

        return recorded

    for name in ("prefix_shared_token_logps", "concatenated_token_logps"):
        monkeypatch.setattr(prefix_sharing, name, spy(name))
    collator = PreferenceCollator(tiny_tokenizer.eos_token_id)
    long_prompts = collator(tokenized_pairs(tiny_tokenizer, 4))  # template + prompt > reply
    prompt, reply = [1] * 5, [7] * 20
    short_prompts = collator([TokenizedPair(prompt, reply, reply[:-1])] * 2)
    for batch, expected in ((long_prompts, "prefix_shared_token_logps"),
                            (short_prompts, "concatenated_token_logps")):
        chosen, rejected = prefix_sharing.prefix_sharing_when_it_pays(tiny_model, batch).sums()
        assert calls[-1] == expected
        reference = concatenated_forward(tiny_model, batch)
        torch.testing.assert_close(chosen, reference[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rejected, reference[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("settings, processes, covers", [
    ({"max_steps": 9, "batch_size": 4, "gradient_accumulation_steps": 1}, 1, True),
    ({"max_steps": 8, "batch_size": 4, "gradient_accumulation_steps": 1}, 1, False),
    ({"max_steps": 3, "batch_size": 2, "gradient_accumulation_steps": 3}, 2, True),
    ({"epochs": 1.0}, 1, True),
    ({"epochs": 0.5}, 1, False),
])
def test_reference_pass_only_when_every_pair_is_trained_on(settings, processes, covers):
    assert covers_every_pair(TrainConfig(**settings), 36, processes) == covers


# ------------------------------------------------------------------ reference cache


def test_precomputed_reference_equals_on_the_fly_and_cache_is_reused(
        tiny_tokenizer, tiny_model, tmp_path, capsys):
    model = lora_model(tiny_model)
    pairs = tokenized_pairs(tiny_tokenizer)
    objective = PreferenceObjective()
    collator = PreferenceCollator(tiny_tokenizer.eos_token_id)
    accelerator = Accelerator()
    options = dict(model=model, objective=objective, collator=collator, accelerator=accelerator,
                   batch_size=5, cache_dir=str(tmp_path / "cache"),
                   settings={"logps_fn": "concatenated_forward"}, show_progress=False)

    first = with_reference_logps(pairs, **options)
    assert not first.from_cache and os.path.isfile(first.cache_path)
    assert all(isinstance(p, PairWithReference) for p in first.pairs)
    assert [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in first.pairs] == [
        (p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs]

    # The adapter is switched off for the reference: train it away from zero first, so an
    # implementation that forgot to disable it would differ.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    batch = ReferenceLogpsCollator(collator)(first.pairs[:4])
    on_the_fly = PreferenceObjective().reference_logps(model, collator(pairs[:4]))
    torch.testing.assert_close(batch["reference_chosen_logps"], on_the_fly[0],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch["reference_rejected_logps"], on_the_fly[1],
                               rtol=1e-5, atol=1e-5)
    # ... and the objective uses the precomputed values instead of running the reference.
    stats = objective(model, batch)
    expected = objective(model, collator(pairs[:4]))
    torch.testing.assert_close(stats["losses"], expected["losses"], rtol=1e-5, atol=1e-6)

    # A trained adapter does not change the key: the second run (a restart) hits the cache.
    second = with_reference_logps(pairs, **options)
    assert second.from_cache and second.cache_path == first.cache_path
    assert [p.reference_chosen_logps for p in second.pairs] == [
        p.reference_chosen_logps for p in first.pairs]

    # A corrupt file is recomputed (and the same values written back).
    with open(first.cache_path, "wb") as f:
        f.write(b"not a safetensors file")
    capsys.readouterr()
    repaired = with_reference_logps(pairs, **options)
    assert not repaired.from_cache and "unreadable" in capsys.readouterr().out
    assert [p.reference_rejected_logps for p in repaired.pairs] == [
        p.reference_rejected_logps for p in first.pairs]
    assert with_reference_logps(pairs, **options).from_cache

    # Other data, other settings or other base weights: another key, a fresh pass.
    assert with_reference_logps(pairs[:-1], **options).cache_path != first.cache_path
    other = with_reference_logps(pairs, **{**options, "settings": {"logps_fn": "other"}})
    assert not other.from_cache and other.cache_path != first.cache_path
    with torch.no_grad():
        model.get_base_model().model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    changed = with_reference_logps(pairs, **options)
    assert not changed.from_cache and changed.cache_path != first.cache_path


def test_cache_entry_for_another_key_is_recomputed(tiny_tokenizer, tiny_model, tmp_path,
                                                   capsys):
    from safetensors.torch import save_file

    pairs = tokenized_pairs(tiny_tokenizer, num=4)
    options = dict(model=lora_model(tiny_model), objective=PreferenceObjective(),
                   collator=PreferenceCollator(tiny_tokenizer.eos_token_id),
                   accelerator=Accelerator(), batch_size=4, cache_dir=str(tmp_path),
                   settings={}, show_progress=False)
    first = with_reference_logps(pairs, **options)
    save_file({"reference_logps": torch.zeros(len(pairs), 2)}, first.cache_path,
              metadata={"key": "someone else's"})
    capsys.readouterr()
    again = with_reference_logps(pairs, **options)
    assert not again.from_cache and "other data or weights" in capsys.readouterr().out
    assert [p.reference_chosen_logps for p in again.pairs] == [
        p.reference_chosen_logps for p in first.pairs]


def test_reference_free_losses_refuse_a_reference_pass(tiny_tokenizer, tiny_model, tmp_path):
    with pytest.raises(ValueError, match="simpo"):
        with_reference_logps(tokenized_pairs(tiny_tokenizer, num=2), model=tiny_model,
                             objective=PreferenceObjective(loss_type="simpo"),
                             collator=PreferenceCollator(0), accelerator=Accelerator(),
                             batch_size=2, cache_dir=str(tmp_path), settings={})


# ------------------------------------------------------------------ length grouping


def test_length_grouped_order_is_a_deterministic_permutation_with_less_padding():
    generator = torch.Generator().manual_seed(7)
    lengths = torch.randint(5, 300, (203,), generator=generator).tolist()
    batch_size = 4

    def order(seed: int, grouped: bool = True) -> list[int]:
        return epoch_order(len(lengths), batch_size, torch.Generator().manual_seed(seed),
                           lengths if grouped else None)

    grouped = order(1)
    assert sorted(grouped) == list(range(len(lengths)))  # each pair exactly once
    assert order(1) == grouped and order(2) != grouped  # a function of the seed
    batches = [grouped[i:i + batch_size] for i in range(0, len(grouped), batch_size)]
    assert len(batches[-1]) == len(lengths) % batch_size  # the short batch stays last
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # longest batch first

    def padded_tokens(indices: list[int]) -> int:
        return sum(batch_size * max(lengths[i] for i in indices[j:j + batch_size])
                   for j in range(0, len(indices), batch_size))

    # Windows of 50 batches sorted by length: padding falls to under a tenth of shuffling's.
    waste_grouped = padded_tokens(grouped) - sum(lengths)
    waste_shuffled = padded_tokens(order(1, grouped=False)) - sum(lengths)
    assert 0 < waste_grouped < 0.1 * waste_shuffled
    # Plain shuffling is unchanged: the same permutation the trainer always used.
    assert order(1, grouped=False) == torch.randperm(
        len(lengths), generator=torch.Generator().manual_seed(1)).tolist()
    assert length_sorted_order([3, 9, 1, 9]) == [1, 3, 0, 2]


def test_grouped_stream_resumes_exactly_and_keeps_each_epoch(tiny_tokenizer):
    pairs = tokenized_pairs(tiny_tokenizer, num=11)
    lengths = pair_lengths(pairs, prefix_sharing=False)
    stream = MicroBatchStream(Accelerator(), pairs, batch_size=3,
                              collator=PreferenceCollator(tiny_tokenizer.eos_token_id), seed=5,
                              lengths=lengths)
    assert stream.batches_per_epoch == 4

    def chosen_rows(batches) -> list[tuple[int, ...]]:
        return [tuple(ids[mask.bool()].tolist()) for b in batches
                for ids, mask in zip(b["chosen_input_ids"], b["chosen_attention_mask"],
                                     strict=True)]

    full = [batch for batch, _ in zip(stream.iterate(0), range(12), strict=False)]
    resumed = [batch for batch, _ in zip(stream.iterate(5), range(7), strict=False)]
    assert chosen_rows(resumed) == chosen_rows(full[5:])
    every_pair = collections.Counter(tuple(p.prompt_ids + p.chosen_ids) for p in pairs)
    epochs = [chosen_rows(full[4 * e:4 * e + 4]) for e in range(3)]
    assert all(collections.Counter(epoch) == every_pair for epoch in epochs)
    assert epochs[0] != epochs[1]  # each epoch has its own order


# ------------------------------------------------------------------ gradient checkpointing


def lora_gradients(model, batch) -> dict[str, torch.Tensor]:
    model.train()
    PreferenceObjective()(model, batch)["losses"].sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir, tiny_tokenizer,
                                                         quantized):
    batch = PreferenceCollator(tiny_tokenizer.eos_token_id)(tokenized_pairs(tiny_tokenizer, 4))
    gradients = []
    for checkpointing in (False, True):
        base = load_base_model(tiny_model_dir, dtype=torch.float32, quantize_4bit=quantized)
        torch.manual_seed(0)
        model = lora_model(base, gradient_checkpointing=checkpointing, quantized=quantized)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():  # a non-zero adapter, so every LoRA weight gets a gradient
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.1, generator=generator)
        assert checkpointing == any(getattr(module, "gradient_checkpointing", False)
                                    for module in model.modules())
        gradients.append(lora_gradients(model, batch))
    without, with_checkpointing = gradients
    assert without.keys() == with_checkpointing.keys() and len(without) > 0
    for name, grad in without.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(with_checkpointing[name], grad, rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_unset_means_on_only_where_cuda_is(monkeypatch):
    parser = build_parser(TrainConfig, "", "")
    flags = {(): None, ("--gradient_checkpointing",): True,
             ("--no-gradient_checkpointing",): False}
    for argv, expected in flags.items():
        assert TrainConfig(**vars(parser.parse_args(argv))).gradient_checkpointing is expected
    for cuda in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        assert resolve_gradient_checkpointing(None) is cuda
        assert resolve_gradient_checkpointing(True) is True  # an explicit choice always wins
        assert resolve_gradient_checkpointing(False) is False


# ------------------------------------------------------------------ benchmark harness


def test_benchmark_smoke_run_writes_its_report(tmp_path):
    """Two variants: one of this checkout, and the standard path of the committed HEAD
    (`--baseline`), which must run from its own exported tree and give the same losses."""
    report_path = tmp_path / "bench.json"
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_dpo", "--preset", "tiny", "--steps", "2",
         "--repeats", "1", "--no_warmup", "--retries", "0", "--quiet_wait", "0",
         "--variants", "prefix+precompute", "--baseline", "HEAD",
         "--workdir", str(tmp_path / "work"), "--json", str(report_path),
         "--markdown", str(tmp_path / "bench.md")],
        cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert list(report["rows"]) == ["prefix+precompute", "baseline"]
    baseline = report["rows"]["baseline"]
    assert baseline["code"].startswith("baseline-")  # imported from the exported tree
    assert (tmp_path / "work" / baseline["code"] / "dpo_core" / "training" / "trainer.py").is_file()
    assert report["rows"]["prefix+precompute"]["code"] == "this checkout"
    assert not baseline["config"]["prefix_sharing"]
    assert baseline["settings_left_out"] == []  # HEAD knows every flag
    assert baseline["losses"] == pytest.approx(report["rows"]["prefix+precompute"]["losses"],
                                               abs=1e-5)
    row = report["rows"]["prefix+precompute"]
    assert row["config"]["prefix_sharing"] and row["config"]["precompute_ref_log_probs"]
    assert row["pairs"] == 2 * report["setup"]["batch_size"] and row["tokens"] > 0
    assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["seconds_median"])
    assert row["reference_pass_s_median"] > 0 and row["peak_memory_mb"] > 0
    assert 0 < row["mfu"] < 1 and report["matmul_peak_flops"] > 0
    # A zero-initialised adapter: policy == reference, so the first loss is ln 2.
    assert row["first_step"]["loss"] == pytest.approx(0.6931472, abs=1e-6)
    assert "| prefix+precompute |" in (tmp_path / "bench.md").read_text()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_benchmark_flop_count_matches_torch_flop_counter(monkeypatch, checkpointing):
    """The harness's MFU rests on `pair_train_flops`: its matmul part (everything but the
    attention term) must equal what torch's FlopCounterMode counts over one real step of the
    standard path: policy and reference forwards, backward, LoRA, LM head at label positions."""
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks import flops, synthetic
    from dpo_core.testing import tiny_llama

    shape = synthetic.MODEL_PRESETS["tiny"]
    base = tiny_llama(vocab_size=shape.vocab, hidden_size=shape.hidden,
                      num_layers=shape.layers, num_heads=shape.heads,
                      num_kv_heads=shape.kv_heads, intermediate_size=shape.intermediate)
    model = add_lora(base, r=synthetic.LORA_R, alpha=synthetic.LORA_ALPHA, dropout=0.0,
                     target_modules="all-linear", gradient_checkpointing=checkpointing,
                     quantized=False)
    segments = (6, 9, 9)  # equal response lengths: no padding, every token is counted
    generator = torch.Generator().manual_seed(0)
    pairs = [TokenizedPair(*(torch.randint(3, shape.vocab, (n,), generator=generator).tolist()
                             for n in segments)) for _ in range(3)]
    batch = PreferenceCollator(pad_token_id=0)(pairs)
    with FlopCounterMode(display=False) as counter:
        PreferenceObjective()(model, batch)["losses"].sum().backward()
    counted = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    matmul = sum(flops for op, flops in counted.items() if op in ("aten.mm", "aten.addmm"))

    per_pair = flops.pair_train_flops(shape, list(segments), prefix_shared=False,
                                          checkpointing=checkpointing, full_logits=False)
    attention = flops.attention_flops(shape, list(segments), prefix_shared=False)
    attention_terms = 5 * attention if checkpointing else 4 * attention
    assert matmul == 3 * (per_pair - attention_terms), counted


def test_profile_step_splits_the_step_time(tmp_path, monkeypatch):
    from benchmarks import profile_step

    # 2*M*N*K from the operand shapes; addmm's first operand is the bias, bmm's dim 0 a batch.
    assert profile_step._matmul_flops("aten::mm", [[3, 4], [4, 5]]) == 120
    assert profile_step._matmul_flops("aten::addmm", [[5], [3, 4], [4, 5]]) == 120
    assert profile_step._matmul_flops("aten::bmm", [[2, 3, 4], [2, 4, 5]]) == 240

    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.profile_step", "--preset", "tiny", "--steps", "1",
         "--workdir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    shares = [float(line.split(":")[1].split("%")[0]) for line in completed.stdout.splitlines()
              if line.startswith(("matrix multiplies:", "attention kernels:", "everything else:"))]
    assert len(shares) == 3 and all(share > 0 for share in shares)
    assert sum(shares) == pytest.approx(100, abs=0.2)


# ------------------------------------------------------------------ host syncs


class HostSyncs(TorchDispatchMode):
    """Counts the operations that make the host wait for the device on a GPU: reading a value
    (item, float, bool, ...), and ops whose output shape depends on values (nonzero, boolean
    indexing, unique). `Tensor.tolist` does not dispatch on CPU: `count_tolist` counts it."""

    VALUE_DEPENDENT = ("aten._local_scalar_dense", "aten.nonzero", "aten._unique2",
                       "aten.masked_select")

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func).rsplit(".", 1)[0] if str(func).count(".") > 1 else str(func)
        boolean_index = name == "aten.index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []) if
            i is not None)
        # torch's Adam keeps its step counts on the CPU (unless capturable): reading them
        # never waits for a GPU, so the optimizer's own reads are not counted.
        if (name in self.VALUE_DEPENDENT or boolean_index) and not any(
                "torch/optim/" in frame.filename for frame in traceback.extract_stack()):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("skip, reads", [("0", {}), ("1", {"tolist": 1})])
def test_a_padding_free_step_does_not_wait_for_the_device(tiny_model_dir, pairs_file, tmp_path,
                                                          monkeypatch, skip, reads):
    """Three micro-batches per step, defaults (padding-free, prompts shared, reference
    precomputed): the packed layout comes from the collator, token counts, loss and gradient
    norm stay on the device (read later, at a logging step), so the step never syncs with
    the host. With --skip_nonfinite_steps the step must decide before its update: it reads
    its loss and gradient norm together, one host sync."""
    from dpo_core.training import trainer as trainer_module

    original = trainer_module.Trainer._optimizer_step
    per_step = []

    def counted(self, batches, *args, **kwargs):
        # Collation happens on the CPU in the DataLoader, even with a GPU: not counted.
        drawn = iter([next(batches) for _ in range(self.config.gradient_accumulation_steps)])
        tolist = torch.Tensor.tolist
        calls = collections.Counter()

        def counting_tolist(tensor):
            calls["tolist"] += 1
            return tolist(tensor)

        monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
        with HostSyncs() as syncs:
            result = original(self, drawn, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, "tolist", tolist)
        per_step.append(dict(syncs.ops + calls))
        return result

    monkeypatch.setattr(trainer_module.Trainer, "_optimizer_step", counted)
    assert train.main(train_args(tiny_model_dir, pairs_file, tmp_path / "run", "--max_steps", "2",
                                 "--gradient_accumulation_steps", "3", "--batch_size", "3",
                                 "--logging_steps", "100", "--skip_nonfinite_steps", skip)) == 0
    assert per_step == [reads, reads]
