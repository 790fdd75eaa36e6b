"""`dpo-eval`'s settings; kept apart from the evaluation code so that `dpo-eval --help` and flag
errors need no torch import."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

from dpo_core.config.fields import (
    DTYPE_NAMES,
    QUANTIZATION_MODES,
    check_finite,
    check_writable_dir,
)
from dpo_core.errors import ConfigError
from dpo_core.paths import looks_like_local_path
from dpo_core.setting import setting

RUN, DATA, GENERATION, JUDGES, OUTPUT = "run", "data", "generation", "judges", "output"

# --judge rule:MODULE:FUNCTION, FUNCTION(prompt, reply) -> score.
RULE_JUDGE_PREFIX = "rule:"


@dataclass
class EvalConfig:
    """Every `dpo-eval` setting, grouped as `--help` shows them."""

    HELP_GROUPS: ClassVar[tuple[str, ...]] = (RUN, DATA, GENERATION, JUDGES, OUTPUT)

    run_dir: str = setting(
        None, "A train.py --output_dir holding a finished run (its training_config.json with "
        "the run plan, and the adapter or the whole model).", RUN, positional=True)
    dtype: str | None = setting(
        None, "Compute dtype; unset (None): the run's.", RUN,
        choices=DTYPE_NAMES)
    quantization: str | None = setting(
        None, "4-bit base weights; unset (None): as the run loaded them.", RUN,
        choices=QUANTIZATION_MODES)
    # -- data -------------------------------------------------------------------------------
    eval_dataset: str | None = setting(
        None, "Preference pairs to evaluate on (any format train.py reads), instead of the "
        "eval split the run held out; their prompts are generated from too, unless --prompts.",
        DATA)
    prompts: str | None = setting(
        None, "Prompts to generate from: a .txt file (one prompt a line) or a JSON/JSONL/CSV/"
        "Parquet file with a 'prompt' column (text or messages). Alone, it skips the pair "
        "metrics (no dataset is read).", DATA)
    # -- generation -------------------------------------------------------------------------
    num_prompts: int = setting(
        64, "Prompts to generate from (the first ones; 0 = no generations).", GENERATION)
    max_new_tokens: int = setting(
        256, "Longest reply, in tokens; a reply cut here did not stop on its own.", GENERATION)
    temperature: float = setting(
        1.0, "Sampling temperature (0 = greedy). At 1 with --top_p 1 the replies are samples of "
        "the policy itself, as the KL estimate assumes.", GENERATION)
    top_p: float = setting(1.0, "Nucleus sampling threshold, in (0, 1].", GENERATION)
    seed: int = setting(42, "Seed of the sampling (the reference and the policy both start "
                        "from it).", GENERATION)
    batch_size: int = setting(
        16, "Prompts per generation batch, and replies per reward-model batch.", GENERATION)
    # -- judges -----------------------------------------------------------------------------
    reward_model: str | None = setting(
        None, "A reward model (AutoModelForSequenceClassification with one output, Hub id or "
        "local directory) scoring every reply with its own tokenizer and chat template: win "
        "rate of the policy over the reference, and the length-controlled win rate.", JUDGES)
    judge: str | None = setting(
        None, "rule:MODULE:FUNCTION, a Python function (prompt, reply) -> score (a bool or a "
        "number), for tasks with a checkable answer; e.g. "
        "rule:dpo_core.demo.task:follows_rule.", JUDGES)
    trust_remote_code: bool = setting(
        False, "Run modelling code shipped with the reward model.", JUDGES)
    # -- output -----------------------------------------------------------------------------
    output_dir: str | None = setting(
        None, "Where eval.json, eval_samples.md and eval.png go; unset (None): RUN_DIR.", OUTPUT)
    debug: bool = setting(False, "Show the full traceback of an error (also DPO_DEBUG=1).",
                          OUTPUT)

    @property
    def destination(self) -> str:
        return self.output_dir or self.run_dir

    @property
    def judged(self) -> bool:
        return bool(self.reward_model or self.judge)

    def validate(self) -> None:
        """Raise ConfigError naming the flag for settings that cannot work."""
        check_finite(self)
        checks = [
            (self.num_prompts >= 0, "--num_prompts must be >= 0 (0 = no generations)"),
            (self.max_new_tokens >= 1, "--max_new_tokens must be >= 1"),
            (self.temperature >= 0, "--temperature must be >= 0 (0 = greedy)"),
            (0 < self.top_p <= 1, "--top_p must be in (0, 1]"),
            (self.batch_size >= 1, "--batch_size must be >= 1"),
            (not (self.judged and self.num_prompts == 0),
             "--reward_model and --judge score generated replies: --num_prompts must be >= 1"),
            (not (self.prompts and not self.eval_dataset and self.num_prompts == 0),
             "--prompts with --num_prompts 0 and no --eval_dataset leaves nothing to evaluate"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.judge is not None and (not self.judge.startswith(RULE_JUDGE_PREFIX)
                                       or self.judge.count(":") != 2):
            raise ConfigError(f"--judge must be rule:MODULE:FUNCTION (e.g. "
                              f"rule:dpo_core.demo.task:follows_rule), got {self.judge!r}")
        for flag in ("eval_dataset", "prompts", "reward_model"):
            value = getattr(self, flag)
            if value and looks_like_local_path(value) and not os.path.exists(value):
                raise ConfigError(f"--{flag}: path {value!r} does not exist")
        if self.prompts and not os.path.isfile(self.prompts):
            raise ConfigError(f"--prompts: {self.prompts!r} is not a file")
        check_writable_dir("--output_dir", self.destination)
