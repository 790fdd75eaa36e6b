"""Shared fixtures: a locally trained tokenizer and tiny random models (no Hub access)."""

from __future__ import annotations

import json
import os
import random
import re

import pytest
import torch

from dpo_core.testing import (
    LLAMA3_SPLIT_PATTERN,
    templated_tokenizer,
    tiny_family,
    tiny_llama,
    train_tokenizer,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORDS = (
    "the a cat dog runs jumps over under happy sad quick brown fox lazy answer question "
    "what is why how one two three four five six seven eight nine ten yes no good bad "
    "hello world please thanks sure here you are"
).split()


def random_text(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


@pytest.fixture(scope="session", autouse=True)
def _few_threads():
    # The CI machine has two cores; tiny models run fastest without oversubscription.
    torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _datasets_cache(tmp_path_factory):
    """The tokenized cache's default home (under the datasets cache) in a session directory,
    for runs in this process and the processes they start: never the user's own cache."""
    import datasets

    path = tmp_path_factory.mktemp("hf_datasets_cache")
    patch = pytest.MonkeyPatch()
    patch.setattr(datasets.config, "HF_DATASETS_CACHE", path)
    patch.setenv("HF_DATASETS_CACHE", str(path))
    yield path
    patch.undo()


@pytest.fixture(scope="session", autouse=True)
def _console():
    """The package's messages on stdout, as every command sets them up (whichever test runs
    first)."""
    from dpo_core.console import configure_console

    configure_console()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Byte-level BPE with a Zephyr chat template and no pad token (like many chat models)."""
    rng = random.Random(0)
    texts = [random_text(rng, 12) for _ in range(2000)] + ["Human: Assistant: ? . , :"] * 50
    return train_tokenizer(texts, vocab_size=400)


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    """A 2-layer random Llama (fp32) sized to the tiny tokenizer."""
    return tiny_llama(vocab_size=len(tiny_tokenizer), hidden_size=64, num_layers=2, num_heads=4)


def write_jsonl(path, rows) -> str:
    import json

    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def learnable_pairs(num: int, seed: int = 0) -> list[dict]:
    """Standard rows where the chosen reply always starts with 'yes' and the rejected with
    'no': a preference a tiny model learns in a few steps."""
    rng = random.Random(seed)
    return [
        {
            "prompt": random_text(rng, rng.randint(3, 8)),
            "chosen": "yes " + random_text(rng, rng.randint(2, 5)),
            "rejected": "no " + random_text(rng, rng.randint(2, 5)),
        }
        for _ in range(num)
    ]


def preference_rows(num: int, seed: int = 0) -> list[dict]:
    """UltraFeedback rows (message lists, a system turn on some), plain-text rows and
    conversational rows, long enough that some are truncated."""
    rng = random.Random(seed)
    rows = []
    for i in range(num):
        prompt = random_text(rng, rng.randint(2, 30))
        chosen, rejected = (random_text(rng, rng.randint(1, 30)) for _ in range(2))
        if i % 3 == 0:
            turns = [{"role": "user", "content": prompt}]
            rows.append({"prompt": prompt,
                         "chosen": turns + [{"role": "assistant", "content": chosen}],
                         "rejected": turns + [{"role": "assistant", "content": rejected}]})
        elif i % 3 == 1:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        else:
            system = [{"role": "system", "content": "be brief"}] if i % 2 else []
            rows.append({"prompt": system + [{"role": "user", "content": prompt}],
                         "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": rejected})
    return rows


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> str:
    """A tiny Llama and its tokenizer saved like a Hub checkpoint, for the CLI tests."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama(vocab_size=len(tiny_tokenizer), hidden_size=64, num_layers=2, num_heads=4)
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def family_model_dir(tmp_path_factory, tiny_tokenizer):
    """family -> a directory holding that family's tiny model (`dpo_core.testing.tiny_family`)
    and the tiny tokenizer, saved like a Hub checkpoint; each built once per session."""
    made = {}

    def directory(family: str) -> str:
        if family not in made:
            path = tmp_path_factory.mktemp(family)
            tiny_family(family, vocab_size=len(tiny_tokenizer)).save_pretrained(path)
            tiny_tokenizer.save_pretrained(path)
            made[family] = str(path)
        return made[family]

    return directory


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory) -> str:
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", learnable_pairs(48))


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each in-process training run starts clean."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def train_args(model_dir: str, data: str, out, *extra: str) -> list[str]:
    """train.py arguments for a quick run on the tiny model: a quarter of the pairs held out,
    a record every step, no checkpoints or samples unless `extra` asks."""
    return [
        "--model_name", model_dir, "--dataset_name", data, "--output_dir", str(out),
        "--num_samples", "0", "--eval_fraction", "0.25", "--batch_size", "4",
        "--gradient_accumulation_steps", "1", "--learning_rate", "5e-3", "--warmup_steps", "0",
        "--logging_steps", "1", "--eval_steps", "0", "--save_steps", "0", "--max_length", "64",
        "--max_prompt_length", "32", "--no-gradient_checkpointing", "--num_sample_prompts", "0",
        *extra,
    ]


def table_rows(markdown: str) -> list[list[str]]:
    """Cells of the body rows of samples.md's table (escaped pipes stay inside a cell)."""
    rows = [line for line in markdown.splitlines() if line.startswith("| ")][2:]
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows]


def read_log(out) -> list[dict]:
    with open(os.path.join(out, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_records(out) -> list[dict]:
    return [r for r in read_log(out) if r["split"] == "train"]


# Published chat templates of model families with their special tokens (tests/fixtures).
with open(os.path.join(ROOT, "tests", "fixtures", "chat_templates.json")) as f:
    FAMILIES = json.load(f)["families"]


@pytest.fixture(scope="session")
def family_base_tokenizer():
    """Byte-level BPE split like Llama-3 / Qwen, with merges for runs of newlines."""
    rng = random.Random(1)
    texts = [random_text(rng, 12) for _ in range(1000)]
    texts += [random_text(rng, 3) + "\n\n" + random_text(rng, 3) + "\n" for _ in range(300)]
    return train_tokenizer(texts, vocab_size=400, chat_template=None,
                           split_pattern=LLAMA3_SPLIT_PATTERN)


def family_tokenizer(base, family: str, eos_token: str | None = None):
    """`base` with the family's special tokens, bos/eos and published template."""
    return templated_tokenizer(base, FAMILIES[family], eos_token)


# A run that DeepSpeed and several-machine runs must reproduce: 8 optimizer steps of 8 pairs
# (here one process, batch 4 x 2 micro-batches, padded; there 2 processes x batch 2 x 2), the
# gradient clipped at 0.3 (the first steps' norms are above it), a checkpoint every 2 steps,
# 2 samples, evaluation at the end. 36 training pairs make 9 micro-batches an epoch, so an
# epoch ends inside an accumulation window.
ENGINE_RUN = ("--max_steps", "8", "--gradient_accumulation_steps", "2", "--max_grad_norm", "0.3",
              "--save_steps", "2", "--num_sample_prompts", "2")


@pytest.fixture(scope="session")
def engine_reference(tiny_model_dir, pairs_file, tmp_path_factory) -> str:
    """ENGINE_RUN on one process (the output_dir)."""
    import train

    out = tmp_path_factory.mktemp("engine_reference")
    assert train.main(train_args(tiny_model_dir, pairs_file, out, *ENGINE_RUN, "--batch_size",
                                 "4", "--no-padding_free")) == 0
    return str(out)
