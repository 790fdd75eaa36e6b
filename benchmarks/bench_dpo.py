"""DPO training speed and memory: this project's trainer, flag by flag, side by side with trl.

Builds a randomly initialised Llama of a preset shape and synthetic preference data with
controlled prompt and response lengths, then trains a fixed number of steps with LoRA r 16 on
all linear layers, once per variant, each variant in a fresh subprocess (so peak memory is that
variant's own). Every variant runs the real training code: `dpo_core.trainer.train` with a
`TrainConfig`, or trl's `DPOTrainer` for `--compare trl`. In each subprocess a one-step run
warms up first and is not measured; then `--repeats` measured runs, reported as medians.

    python benchmarks/bench_dpo.py --preset cpu-small --data short --compare trl \\
        --json bench.json --markdown bench.md --plot bench.png

What the numbers mean: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from any directory
    sys.path.insert(0, str(ROOT))

SEED = 42
LEARNING_RATE = 5e-5
BETA = 0.1
LORA_R, LORA_ALPHA = 16, 32


@dataclass(frozen=True)
class ModelShape:
    """A Llama shape. The tokenizer may have fewer ids than `vocab` (spare rows are never
    used); the LM head still costs `vocab` columns, which is what matters for speed."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tokenizer_vocab: int

    @property
    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of every linear layer of one decoder block."""
        kv = self.hidden // self.heads * self.kv_heads
        h, i = self.hidden, self.intermediate
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]

    @property
    def body_params(self) -> int:
        """Matmul weights of the decoder blocks (no embeddings, no LM head)."""
        return self.layers * sum(a * b for a, b in self.linears)

    @property
    def head_params(self) -> int:
        return self.hidden * self.vocab

    def lora_params(self, r: int) -> int:
        """LoRA weights on every linear of the blocks ('all-linear' leaves the LM head out)."""
        return self.layers * sum(r * (a + b) for a, b in self.linears)

    @property
    def total_params(self) -> int:
        return self.body_params + 2 * self.head_params  # + embeddings, untied


MODEL_PRESETS = {
    "tiny": ModelShape(64, 2, 4, 4, 256, 512, tokenizer_vocab=512),
    "cpu-small": ModelShape(256, 4, 4, 4, 688, 8000, tokenizer_vocab=8000),
    "cpu-medium": ModelShape(512, 10, 8, 8, 1376, 16000, tokenizer_vocab=8000),
    "tinyllama": ModelShape(2048, 22, 32, 4, 5632, 32000, tokenizer_vocab=8000),
}
# pairs, max_length, batch size per preset (each can be overridden on the command line).
RUN_DEFAULTS = {
    "tiny": (8, 64, 2),
    "cpu-small": (32, 256, 4),
    "cpu-medium": (32, 256, 4),
    "tinyllama": (16, 1024, 4),
}
# Mean prompt and response lengths as fractions of max_length; each pair draws its lengths
# within +-LENGTH_SPREAD of the mean, so the longest pair still fits (no truncation).
DATA_PRESETS = {"short": (0.1875, 0.6875), "prompt-heavy": (0.625, 0.25)}
LENGTH_SPREAD = 0.1

# name -> (trainer, settings). "ours" settings are TrainConfig fields.
VARIANTS = {
    "standard": ("ours", {"prefix_sharing": False, "precompute_ref_log_probs": False,
                          "gradient_checkpointing": False}),
    "prefix": ("ours", {"prefix_sharing": True, "precompute_ref_log_probs": False,
                        "gradient_checkpointing": False}),
    "precompute": ("ours", {"prefix_sharing": False, "precompute_ref_log_probs": True,
                            "gradient_checkpointing": False}),
    "prefix+precompute": ("ours", {"prefix_sharing": True, "precompute_ref_log_probs": True,
                                   "gradient_checkpointing": False}),
    "checkpointing": ("ours", {"prefix_sharing": False, "precompute_ref_log_probs": False,
                               "gradient_checkpointing": True}),
    "prefix+precompute+checkpointing": ("ours", {"prefix_sharing": True,
                                                 "precompute_ref_log_probs": True,
                                                 "gradient_checkpointing": True}),
    "grouped": ("ours", {"prefix_sharing": True, "precompute_ref_log_probs": True,
                         "gradient_checkpointing": False, "group_by_length": True}),
    # TrainConfig's own defaults for every speed flag, gradient checkpointing included.
    "defaults": ("ours", {}),
    # The speed flags at their defaults (decided at run time), gradient checkpointing off.
    "auto": ("ours", {"gradient_checkpointing": False}),
    "trl": ("trl", {"gradient_checkpointing": False}),
    "trl+checkpointing": ("trl", {"gradient_checkpointing": True}),
}
DEFAULT_VARIANTS = "standard,prefix,precompute,prefix+precompute,auto,checkpointing,defaults"
# Variants that must reproduce the standard path's losses (same batches, same math).
EXACT_VARIANTS = ("prefix", "precompute", "prefix+precompute", "checkpointing",
                  "prefix+precompute+checkpointing", "defaults", "auto")


# ------------------------------------------------------------------ synthetic model and data

ONSETS = "b c d f g h j k l m n p r s t v w z br ch cr dr fl gr kl pl pr sh st str th tr".split()
VOWELS = "a e i o u ai ea ie oo ou".split()
CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng"]


class WordSource:
    """Pseudo-words with Zipf-like frequencies: varied enough to train a BPE of 8000 ids."""

    def __init__(self, seed: int, lexicon_size: int):
        self.rng = random.Random(seed)
        words = {self._word() for _ in range(lexicon_size)}
        self.words = sorted(words)
        self.rng.shuffle(self.words)
        total, cumulative = 0.0, []
        for rank in range(len(self.words)):
            total += 1.0 / (rank + 10)
            cumulative.append(total)
        self.cumulative = cumulative

    def _word(self) -> str:
        syllables = self.rng.choice([1, 1, 2, 2, 2, 3, 3, 4])
        return "".join(self.rng.choice(ONSETS) + self.rng.choice(VOWELS) + self.rng.choice(CODAS)
                       for _ in range(syllables))

    def sample(self, count: int) -> list[str]:
        return self.rng.choices(self.words, cum_weights=self.cumulative, k=count)


def _text_of_tokens(source: WordSource, tokenizer, target: int) -> str:
    """Words joined by spaces, about `target` tokens long (a leading space: byte-level BPE
    then splits prompt and response at the word boundary, in every tokenizer alike)."""
    words, count = [], 0
    while count < target:
        word = source.sample(1)[0]
        words.append(word)
        count += len(tokenizer(" " + word, add_special_tokens=False)["input_ids"])
    return " " + " ".join(words)


def build_assets(preset: str, data: str, num_pairs: int, max_length: int, workdir: Path) -> dict:
    """Tokenizer + random model saved like a Hub checkpoint, and a JSONL of pairs (cached)."""
    from dpo_core.tiny import tiny_llama, train_tokenizer

    shape = MODEL_PRESETS[preset]
    model_dir = workdir / f"model-{preset}"
    # Enough distinct words and text for the tokenizer to learn its whole vocabulary.
    lexicon_size = 10 * shape.tokenizer_vocab
    if not (model_dir / "config.json").is_file():
        source = WordSource(SEED, lexicon_size)
        texts = [" ".join(source.sample(40)) for _ in range(shape.tokenizer_vocab * 5 // 2)]
        tokenizer = train_tokenizer(texts, vocab_size=shape.tokenizer_vocab)
        model = tiny_llama(vocab_size=shape.vocab, hidden_size=shape.hidden,
                           num_layers=shape.layers, num_heads=shape.heads,
                           num_kv_heads=shape.kv_heads, intermediate_size=shape.intermediate,
                           max_position_embeddings=max(2048, max_length), seed=SEED)
        partial = Path(tempfile.mkdtemp(dir=workdir))
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        os.replace(partial, model_dir)
        del model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data_path = workdir / f"pairs-{preset}-{data}-{num_pairs}x{max_length}.jsonl"
    if not data_path.is_file():
        prompt_frac, response_frac = DATA_PRESETS[data]
        source = WordSource(SEED + 1, lexicon_size)
        rng = random.Random(SEED + 2)

        def length(fraction: float) -> int:
            spread = 1 + rng.uniform(-LENGTH_SPREAD, LENGTH_SPREAD)
            return max(1, round(fraction * max_length * spread))

        rows = []
        for _ in range(num_pairs):
            # The response gets its EOS from the trainer; leave one token for it.
            prompt = _text_of_tokens(source, tokenizer, length(prompt_frac)).lstrip()
            chosen = _text_of_tokens(source, tokenizer, length(response_frac) - 1)
            rejected = _text_of_tokens(source, tokenizer, length(response_frac) - 1)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        with open(data_path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return {"model_dir": str(model_dir), "data_path": str(data_path)}


# ------------------------------------------------------------------ hardware and FLOPs


def matmul_peak_flops(dtype_name: str, device: str) -> float:
    """Best FLOP/s of large square matmuls in `dtype` on `device` (what MFU is relative to)."""
    import torch

    dtype = getattr(torch, dtype_name)
    sizes = (8192,) if device == "cuda" else (1024, 2048)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        timings = []
        while len(timings) < 4 or (len(timings) < 20 and sum(timings) < 1.0):
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            a @ b
            if device == "cuda":
                torch.cuda.synchronize()
            timings.append(time.perf_counter() - started)
        best = max(best, 2 * n**3 / min(timings[1:]))  # the first call warms up
    return best


def attention_flops(shape: ModelShape, segments: list[int], prefix_shared: bool) -> float:
    """Forward attention FLOPs (QK^T and PV, causal: only the visible half) of one pair.

    segments = (P, C, R). Standard: two rows of P + C and P + R tokens. Prefix-shared: one row,
    where chosen and rejected tokens each see the prompt and their own response only.
    """
    p, c, r = segments
    if prefix_shared:
        visible = p * p / 2 + c * p + c * c / 2 + r * p + r * r / 2
    else:
        visible = (p + c) ** 2 / 2 + (p + r) ** 2 / 2
    return 4 * shape.layers * shape.hidden * visible


def forward_rows(segments: list[int], *, prefix_shared: bool,
                 full_logits: bool) -> tuple[int, int]:
    """(tokens fed to the model, positions whose logits are computed) for one pair."""
    p, c, r = segments
    tokens = p + c + r if prefix_shared else 2 * p + c + r
    return tokens, tokens if full_logits else c + r


def reference_flops(shape: ModelShape, segments: list[int], *, prefix_shared: bool,
                    full_logits: bool) -> float:
    """FLOPs of one pair's reference forward (adapter off, so no LoRA): 2 per block weight per
    token, 2 per LM-head weight per position whose logits are computed, causal attention."""
    tokens, logit_rows = forward_rows(segments, prefix_shared=prefix_shared,
                                      full_logits=full_logits)
    return (2 * shape.body_params * tokens + 2 * shape.head_params * logit_rows
            + attention_flops(shape, segments, prefix_shared))


def pair_train_flops(shape: ModelShape, segments: list[int], *, prefix_shared: bool,
                     checkpointing: bool, full_logits: bool, reference: bool = True) -> float:
    """FLOPs one pair costs in LoRA-DPO training, counted as the implementation performs them.

    Per token of the forward rows: policy forward 2N, backward to the inputs 2N (frozen base
    weights need no weight gradient), reference forward 2N (`reference_flops`; left out with
    reference=False, for a precomputed reference) -> 6N for N block weights; LoRA adds 2
    (forward) + 4 (backward: input and weight gradients) per adapter weight; the LM head
    counts at the positions whose logits are computed (label positions here, every position
    in trl); attention is counted causally, forward + 2x backward + reference forward.
    Gradient checkpointing recomputes the policy forward of the blocks once more (all but its
    last matmul). Nothing before the first block needs a gradient, so its q, k and v
    projections (base and LoRA A) skip the backward to their input, unless checkpointing
    (peft then makes the embeddings' output require grad). tests/test_speed_features.py
    checks this count against torch's FlopCounterMode.
    """
    tokens, logit_rows = forward_rows(segments, prefix_shared=prefix_shared,
                                      full_logits=full_logits)
    body, lora = shape.body_params, shape.lora_params(LORA_R)
    attention = attention_flops(shape, segments, prefix_shared)
    flops = 4 * body * tokens + 6 * lora * tokens + 4 * shape.head_params * logit_rows
    flops += 3 * attention
    if checkpointing:
        # torch's non-reentrant recompute stops once it has every tensor backward needs,
        # which comes just before each block's last LoRA B matmul (down_proj's).
        flops += 2 * (body + lora - shape.layers * LORA_R * shape.hidden) * tokens + attention
    else:
        qkv = shape.linears[:3]
        flops -= 2 * tokens * sum(a * b + LORA_R * a for a, b in qkv)
    if reference:
        flops += reference_flops(shape, segments, prefix_shared=prefix_shared,
                                 full_logits=full_logits)
    return flops


def machine_description() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                   if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__}
    import transformers

    info["transformers"] = transformers.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        info["trl"] = None
    return info


# ------------------------------------------------------------------ one variant (subprocess)


def _reset_accelerate() -> None:
    """Accelerate keeps process-wide singletons; each in-process training run starts clean."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def _run_ours(spec: dict, output_dir: str, steps: int) -> dict:
    from dpo_core.config import TrainConfig
    from dpo_core.model import resolve_gradient_checkpointing
    from dpo_core.trainer import train

    config = TrainConfig(
        model_name=spec["model_dir"], dataset_name=spec["data_path"], output_dir=output_dir,
        overwrite_output_dir=True, num_samples=0, eval_fraction=0.0, seed=SEED,
        max_length=spec["max_length"], max_prompt_length=spec["max_length"] - 1,
        chat_template="none", quantization="none", dtype=spec["dtype"],
        lora_r=LORA_R, lora_alpha=LORA_ALPHA, lora_target_modules="all-linear",
        batch_size=spec["batch_size"], gradient_accumulation_steps=1, max_steps=steps,
        learning_rate=LEARNING_RATE, warmup_steps=0, beta=BETA, logging_steps=1,
        eval_steps=0, save_steps=0, num_sample_prompts=0, report_to="none",
        **spec["settings"])
    metrics = train(config)
    with open(os.path.join(output_dir, "train_log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    steps_log = [record for record in log if record["split"] == "train"]
    return {
        "seconds": metrics["train_runtime_s"] + metrics["reference_pass_s"],
        "reference_pass_s": metrics["reference_pass_s"],
        "losses": [record["loss"] for record in steps_log],
        "first_step": {key: steps_log[0][key] for key in ("loss", "logps/chosen",
                                                          "logps/rejected")},
        "config": {"prefix_sharing": config.prefix_sharing,
                   "precompute_ref_log_probs": config.precompute_ref_log_probs,
                   "gradient_checkpointing": resolve_gradient_checkpointing(
                       config.gradient_checkpointing),
                   "group_by_length": config.group_by_length},
    }


def _run_trl(spec: dict, output_dir: str, steps: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    with open(spec["data_path"]) as f:
        rows = [json.loads(line) for line in f]
    # Our trainer's first-epoch order, so step k trains on the same pairs in both.
    dataset = Dataset.from_list([rows[i] for i in spec["trl_row_order"]])
    dtype = getattr(torch, spec["dtype"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype,
                                                 attn_implementation="sdpa")
    args = DPOConfig(
        output_dir=output_dir, per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1, max_steps=steps, learning_rate=LEARNING_RATE,
        lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", beta=BETA, loss_type=["sigmoid"], max_length=spec["max_length"],
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
        gradient_checkpointing=spec["settings"]["gradient_checkpointing"],
        bf16=dtype == torch.bfloat16, use_cpu=not torch.cuda.is_available(),
        train_sampling_strategy="sequential", seed=SEED, disable_tqdm=True,
        dataloader_num_workers=0)
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.05,
                      target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset,
                         processing_class=tokenizer, peft_config=lora)
    result = trainer.train()
    steps_log = [record for record in trainer.state.log_history if "loss" in record]
    return {
        "seconds": result.metrics["train_runtime"],
        "reference_pass_s": 0.0,
        "losses": [record["loss"] for record in steps_log],
        "first_step": {key: steps_log[0][key] for key in ("loss", "logps/chosen",
                                                          "logps/rejected")},
        "config": dict(spec["settings"]),
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM starts afresh at exec;
    ru_maxrss would carry over the parent's peak into a subprocess."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    scale = 2**20 if sys.platform == "darwin" else 2**10  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


class ContentionMeter:
    """Share of the machine's CPU time that OTHER processes used while it ran: on a shared
    machine a busy neighbour can slow a multi-threaded run several times over, and this says
    when it happened. (busy time of all CPUs - this process's CPU time) / (wall x CPUs);
    steal time (other virtual machines) counts as busy."""

    def __enter__(self) -> ContentionMeter:
        import psutil

        self.process = psutil.Process()
        self.start = (time.perf_counter(), self._busy(), self._own())
        return self

    def __exit__(self, *exc) -> None:
        wall, busy, own = (now - then for now, then in zip(
            (time.perf_counter(), self._busy(), self._own()), self.start, strict=True))
        self.others = max(0.0, busy - own) / (wall * (os.cpu_count() or 1))

    @staticmethod
    def _busy() -> float:
        import psutil

        times = psutil.cpu_times()
        return sum(times) - times.idle - getattr(times, "iowait", 0.0) - getattr(
            times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)

    def _own(self) -> float:
        times = self.process.cpu_times()
        return times.user + times.system


def worker(spec_path: str) -> None:
    """Run one variant: a one-step warm-up run, then one measured run; write the results."""
    import psutil
    import torch

    with open(spec_path) as f:
        spec = json.load(f)
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    run = _run_trl if spec["trainer"] == "trl" else _run_ours
    if spec["trainer"] == "trl":
        import trl  # noqa: F401  (imported before the baseline, like our modules)
    from dpo_core import trainer  # noqa: F401

    baseline_rss = psutil.Process().memory_info().rss
    cuda = torch.cuda.is_available()
    scratch = Path(spec["workdir"]) / "runs" / spec["variant"]
    for steps in ([1] if spec["warmup"] else []) + [spec["steps"]]:
        output_dir = scratch / f"run-{steps}"
        shutil.rmtree(output_dir, ignore_errors=True)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with ContentionMeter() as contention:
            result = run(spec, str(output_dir), steps)
        _reset_accelerate()
        shutil.rmtree(output_dir, ignore_errors=True)
    result["contention"] = contention.others
    with open(spec["result_path"], "w") as f:
        json.dump({"run": result, "peak_rss_mb": peak_rss_mb(),
                   "baseline_rss_mb": baseline_rss / 2**20,
                   "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None},
                  f)


# ------------------------------------------------------------------ orchestration


def visiting_order(model_dir: str, data_path: str, max_length: int, batch_size: int) -> dict:
    """Our trainer's tokenized pairs in the order its first epoch visits them, and the row of
    the data file each one came from (so trl can be fed the same batches)."""
    import torch

    from dpo_core.batching import epoch_order
    from dpo_core.config import TrainConfig
    from dpo_core.data import PreferencePair
    from dpo_core.model import load_tokenizer
    from dpo_core.tokenization import tokenize_pair
    from dpo_core.trainer import prepare_data

    config = TrainConfig(model_name=model_dir, dataset_name=data_path, num_samples=0,
                         eval_fraction=0.0, seed=SEED, max_length=max_length,
                         max_prompt_length=max_length - 1, chat_template="none",
                         num_sample_prompts=0)
    tokenizer = load_tokenizer(model_dir)
    pairs, _, _ = prepare_data(config, tokenizer, show_progress=False)
    order = epoch_order(len(pairs), batch_size, torch.Generator().manual_seed(SEED))
    row_of = {}
    with open(data_path) as f:
        for index, line in enumerate(f):
            row = json.loads(line)
            tokenized = tokenize_pair(
                tokenizer, PreferencePair(row["prompt"], row["chosen"], row["rejected"]),
                max_length=max_length, max_prompt_length=max_length - 1,
                use_chat_template=False)
            row_of[(tuple(tokenized.prompt_ids), tuple(tokenized.chosen_ids),
                    tuple(tokenized.rejected_ids))] = index
    visited = [pairs[i] for i in order]
    return {
        "segments": [[len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)]
                     for p in visited],
        "rows": [row_of[(tuple(p.prompt_ids), tuple(p.chosen_ids), tuple(p.rejected_ids))]
                 for p in visited],
    }


def wait_until_quiet(max_busy: float, timeout_s: float) -> float:
    """Wait (at most `timeout_s`) until the CPUs are less than `max_busy` busy over one second
    (this process idles meanwhile, so the load is other processes'); return the last reading."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while True:
        busy = psutil.cpu_percent(interval=1.0) / 100
        if busy <= max_busy or time.monotonic() >= deadline:
            return busy
        time.sleep(4.0)


def run_variant(name: str, base_spec: dict, workdir: Path) -> dict:
    trainer, settings = VARIANTS[name]
    spec = {**base_spec, "variant": name, "trainer": trainer, "settings": settings,
            "result_path": str(workdir / f"result-{name}.json")}
    spec_path = workdir / f"spec-{name}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run([sys.executable, __file__, "--worker", str(spec_path)],
                               env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"variant {name} failed:\n{completed.stdout[-3000:]}\n"
                           f"{completed.stderr[-5000:]}")
    return json.loads(Path(spec["result_path"]).read_text())


def uses_prefix_sharing(setting: bool | None, batch: list[list[int]]) -> bool:
    """Whether our trainer runs this batch of (P, C, R) pairs prefix-shared: always, never, or
    (unset) by the trainer's own rule, `prefix_sharing_pays`."""
    import torch

    from dpo_core.logps import prefix_sharing_pays

    if setting is not None:
        return setting
    prompt, chosen, rejected = torch.tensor(batch).T
    return prefix_sharing_pays(prompt, prompt + chosen, prompt + rejected)


def summarise(name: str, results: list[dict], visited: dict, steps: int, batch_size: int,
              shape: ModelShape, peak_flops: float) -> dict:
    """Medians over the measured runs (one per round), throughput, FLOP/s and MFU from them;
    peak memory is the largest of the rounds."""
    trainer, _ = VARIANTS[name]
    runs = [result["run"] for result in results]
    config = runs[0]["config"]
    num_pairs = steps * batch_size
    segments = [visited["segments"][i % len(visited["segments"])] for i in range(num_pairs)]
    tokens = sum(2 * p + c + r for p, c, r in segments)
    # A precomputed reference is one pass over the distinct pairs, however many epochs follow.
    precomputed = runs[0]["reference_pass_s"] > 0
    flops, prefix_batches = 0.0, 0
    for start in range(0, num_pairs, batch_size):
        batch = segments[start:start + batch_size]
        prefix_shared = uses_prefix_sharing(config.get("prefix_sharing", False), batch)
        prefix_batches += prefix_shared
        flops += sum(pair_train_flops(
            shape, s, prefix_shared=prefix_shared,
            checkpointing=config["gradient_checkpointing"], full_logits=trainer == "trl",
            reference=not precomputed)
            for s in batch)
        if precomputed:  # the first epoch's visits: each distinct pair once
            first_visits = batch[:max(0, len(visited["segments"]) - start)]
            flops += sum(reference_flops(shape, s, prefix_shared=prefix_shared, full_logits=False)
                         for s in first_visits)
    seconds = statistics.median(run["seconds"] for run in runs)
    achieved = flops / seconds
    peak_cuda = [r["peak_cuda_mb"] for r in results if r["peak_cuda_mb"] is not None]
    return {
        "variant": name, "trainer": trainer, "config": config,
        "prefix_shared_batches": prefix_batches,
        "seconds_median": seconds, "seconds_runs": [run["seconds"] for run in runs],
        "contention_runs": [run["contention"] for run in runs],
        "reference_pass_s_median": statistics.median(run["reference_pass_s"] for run in runs),
        "pairs_per_s": num_pairs / seconds, "tokens_per_s": tokens / seconds,
        "tokens": tokens, "pairs": num_pairs,
        "flops_per_s": achieved, "mfu": achieved / peak_flops if peak_flops else None,
        "peak_memory_mb": max(peak_cuda) if peak_cuda else max(r["peak_rss_mb"] for r in results),
        "peak_memory_kind": "cuda max_memory_allocated" if peak_cuda else "RSS (VmHWM)",
        "baseline_rss_mb": statistics.median(r["baseline_rss_mb"] for r in results),
        "first_step": runs[0]["first_step"],
        "losses": runs[0]["losses"],
    }


def compare(rows: dict[str, dict]) -> dict:
    """Agreement checks and speed-ups: exact variants vs standard, ours vs trl."""
    checks = {}
    standard = rows.get("standard")
    if standard:
        for name in EXACT_VARIANTS:
            if name in rows:
                diff = max(abs(a - b) for a, b in zip(rows[name]["losses"], standard["losses"],
                                                      strict=True))
                checks[f"{name} vs standard: max |loss diff| over all steps"] = diff
    ratios = {}
    for name, row in rows.items():
        if standard and name != "standard" and row["trainer"] == "ours":
            ratios[f"{name} / standard tokens/s"] = row["tokens_per_s"] / standard["tokens_per_s"]
    pairings = [("standard", "trl"), ("checkpointing", "trl+checkpointing"),
                ("defaults", "trl+checkpointing"), ("auto", "trl"), ("prefix+precompute", "trl"),
                ("prefix+precompute+checkpointing", "trl+checkpointing")]
    for ours, theirs in pairings:
        if ours in rows and theirs in rows:
            a, b = rows[ours], rows[theirs]
            ratios[f"{ours} / {theirs} tokens/s"] = a["tokens_per_s"] / b["tokens_per_s"]
            ratios[f"{ours} / {theirs} peak memory"] = a["peak_memory_mb"] / b["peak_memory_mb"]
            for key in ("loss", "logps/chosen", "logps/rejected"):
                checks[f"{ours} vs {theirs}: first-step {key} diff"] = abs(
                    a["first_step"][key] - b["first_step"][key])
            checks[f"{ours} vs {theirs}: max |loss diff| over all steps"] = max(
                abs(x - y) for x, y in zip(a["losses"], b["losses"], strict=True))
    return {"checks": checks, "ratios": ratios}


def format_table(rows: dict[str, dict]) -> str:
    header = ("| variant | pairs/s | tokens/s | x standard | peak MB | GFLOP/s | MFU | "
              "first-step loss | ref pass s | runs: s (others' CPU) |")
    lines = [header, "|" + "---|" * 10]
    standard = rows.get("standard")
    for name, row in rows.items():
        speedup = f"{row['tokens_per_s'] / standard['tokens_per_s']:.2f}" if standard else "-"
        runs = ", ".join(f"{s:.2f} ({100 * c:.0f}%)"
                         for s, c in zip(row["seconds_runs"], row["contention_runs"], strict=True))
        mfu = f"{100 * row['mfu']:.0f}%" if row["mfu"] is not None else "-"
        lines.append(
            f"| {name} | {row['pairs_per_s']:.2f} | {row['tokens_per_s']:.0f} | {speedup} | "
            f"{row['peak_memory_mb']:.0f} | {row['flops_per_s'] / 1e9:.1f} | {mfu} | "
            f"{row['first_step']['loss']:.6f} | {row['reference_pass_s_median']:.2f} | "
            f"{runs} |")
    return "\n".join(lines)


def plot(rows: dict[str, dict], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    colors = ["tab:gray" if rows[n]["trainer"] == "trl" else "tab:blue" for n in names]
    fig, (ax_speed, ax_memory) = plt.subplots(1, 2, figsize=(11, 0.45 * len(names) + 1.6))
    ax_speed.barh(names, [rows[n]["tokens_per_s"] for n in names], color=colors)
    ax_speed.set_xlabel("tokens/s (prompt+chosen + prompt+rejected), median")
    ax_memory.barh(names, [rows[n]["peak_memory_mb"] for n in names], color=colors)
    ax_memory.set_xlabel(f"peak memory, MB ({rows[names[0]]['peak_memory_kind']})")
    ax_memory.set_yticklabels([])
    for ax in (ax_speed, ax_memory):
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_report(report: dict) -> str:
    setup = report["setup"]
    lines = [
        f"### {setup['preset']} / {setup['data']}: {setup['pairs']} pairs, max_length "
        f"{setup['max_length']}, batch {setup['batch_size']}, {setup['steps']} steps, "
        f"{setup['dtype']}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cpu_count']} cores, torch "
        f"{report['machine']['torch']} ({report['machine']['torch_threads']} threads)"
        + (f", GPU {report['machine']['gpu']}" if report["machine"].get("gpu") else "")
        + f"; measured matmul peak {report['matmul_peak_flops'] / 1e9:.1f} GFLOP/s "
          f"({setup['dtype']}).",
        "",
        f"Data: mean prompt {setup['mean_prompt_tokens']:.0f} tokens, mean response "
        f"{setup['mean_response_tokens']:.0f} tokens; {setup['tokens']} DPO tokens per run. "
        f"Model: {setup['total_params'] / 1e6:.1f}M parameters "
        f"({setup['matmul_params'] / 1e6:.1f}M in matmuls).",
        "",
        format_table(report["rows"]),
        "",
    ]
    lines += [f"- {key}: {value:.3g}" for key, value in report["ratios"].items()]
    lines += [f"- check, {key}: {value:.2e}" for key, value in report["checks"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(MODEL_PRESETS), default="cpu-small")
    parser.add_argument("--data", choices=list(DATA_PRESETS), default="short")
    parser.add_argument("--pairs", type=int, help="pairs in the data (preset default)")
    parser.add_argument("--max_length", type=int, help="tokens per sequence (preset default)")
    parser.add_argument("--batch_size", type=int, help="pairs per step (preset default)")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: one epoch)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds; each runs every variant once in a fresh process")
    parser.add_argument("--max_contention", type=float, default=0.1,
                        help="redo a run if other processes used more than this share of the "
                             "CPUs meanwhile (default 0.1)")
    parser.add_argument("--retries", type=int, default=2, help="redos per run (default 2)")
    parser.add_argument("--quiet_wait", type=float, default=120,
                        help="before each run, wait up to this many seconds for the CPUs to be "
                             "less busy than --max_contention (default 120)")
    parser.add_argument("--no_warmup", action="store_true",
                        help="skip the unmeasured one-step run before the measured ones "
                             "(smoke tests only: first-call costs then count)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--compare", choices=["trl"], help="add trl's DPOTrainer (GC off and on)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "dpo-bench"))
    parser.add_argument("--json", help="write every number here")
    parser.add_argument("--markdown", help="write the table and checks here (markdown)")
    parser.add_argument("--plot", help="write a PNG of tokens/s and peak memory per variant")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0

    import torch

    default_pairs, default_length, default_batch = RUN_DEFAULTS[args.preset]
    pairs = args.pairs or default_pairs
    max_length = args.max_length or default_length
    batch_size = args.batch_size or default_batch
    steps = args.steps or max(1, pairs // batch_size)
    cuda = torch.cuda.is_available()
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if cuda else "float32")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.compare == "trl":
        variants += [v for v in ("trl", "trl+checkpointing") if v not in variants]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"Building {args.preset} model and {args.data} data in {workdir} ...", flush=True)
    assets = build_assets(args.preset, args.data, pairs, max_length, workdir)
    visited = visiting_order(assets["model_dir"], assets["data_path"], max_length, batch_size)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if cuda else "cpu"
    peak = matmul_peak_flops(dtype, device)
    base_spec = {**assets, "max_length": max_length, "batch_size": batch_size, "steps": steps,
                 "warmup": not args.no_warmup, "dtype": dtype,
                 "threads": args.threads,
                 "workdir": str(workdir), "trl_row_order": visited["rows"]}
    shape = MODEL_PRESETS[args.preset]
    # Rounds: every variant once per round, so a change in machine load hits all alike. A run
    # during which other processes used more than --max_contention of the CPUs is redone (up
    # to --retries times); the least disturbed attempt counts.
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for round_index in range(args.repeats):
        for name in variants:
            attempts = []
            while len(attempts) <= args.retries:
                wait_until_quiet(args.max_contention, args.quiet_wait)
                attempts.append(run_variant(name, base_spec, workdir))
                run = attempts[-1]["run"]
                print(f"  round {round_index + 1}/{args.repeats} {name}: {run['seconds']:.2f} s,"
                      f" other processes used {100 * run['contention']:.0f}% of the CPUs",
                      flush=True)
                if run["contention"] <= args.max_contention:
                    break
            results[name].append(min(attempts, key=lambda a: a["run"]["contention"]))
        peak = max(peak, matmul_peak_flops(dtype, device))
    rows = {name: summarise(name, results[name], visited, steps, batch_size, shape, peak)
            for name in variants}

    segments = visited["segments"]
    report = {
        "command": "python benchmarks/bench_dpo.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "machine": machine_description(),
        "matmul_peak_flops": peak,
        "setup": {"preset": args.preset, "data": args.data, "pairs": pairs,
                  "max_length": max_length, "batch_size": batch_size, "steps": steps,
                  "repeats": args.repeats, "dtype": dtype, "shape": asdict(shape),
                  "matmul_params": shape.body_params + shape.head_params,
                  "total_params": shape.total_params,
                  "lora_params": shape.lora_params(LORA_R),
                  "mean_prompt_tokens": statistics.mean(s[0] for s in segments),
                  "mean_response_tokens": statistics.mean((s[1] + s[2]) / 2 for s in segments),
                  "tokens": rows[variants[0]]["tokens"]},
        "rows": rows,
        **compare(rows),
    }
    print()
    print(format_table(rows))
    for key, value in {**report["ratios"], **report["checks"]}.items():
        print(f"{key}: {value:.4g}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(markdown_report(report))
    if args.plot:
        plot(rows, f"{args.preset} / {args.data}, {pairs} pairs x {max_length} tokens, "
                   f"batch {batch_size}", args.plot)
    failed = [k for k, v in report["checks"].items() if "first-step loss" in k and v > 1e-4]
    return 1 if failed or any(not math.isfinite(r["tokens_per_s"]) for r in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
