"""What `dpo-eval` evaluates on: preference pairs (the run's held-out eval split, or
`--eval_dataset`) and prompts to generate from (those pairs' prompts, or `--prompts`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dpo_core.config.evaluation import EvalConfig
from dpo_core.data.pairs import PreferencePair, to_prompt
from dpo_core.data.sources import load_rows, read_utf8
from dpo_core.data.templates import Prompt, pair_view
from dpo_core.data.training_data import load_eval_pairs, load_run_pairs
from dpo_core.errors import DataError, EvaluationError
from dpo_core.evaluation.run import TrainedRun


@dataclass(frozen=True)
class EvaluationInputs:
    """The pairs (possibly none) and the prompts (possibly none), each with where it came
    from, in words."""

    pairs: list[PreferencePair]
    pairs_source: str | None
    prompts: list[Prompt]
    prompts_source: str | None


def evaluation_inputs(settings: EvalConfig, run: TrainedRun, use_chat_template: bool,
                      prompts: list[Prompt] | None = None) -> EvaluationInputs:
    """--eval_dataset's pairs, or the run's eval split unless --prompts alone is given; the
    first --num_prompts of `prompts` (--prompts' `load_prompts`), else of those pairs' prompts
    (as the model saw them)."""
    pairs, pairs_source = [], None
    if settings.eval_dataset:
        pairs = load_eval_pairs(settings.eval_dataset, run.config.seed, skip_bad_rows=False)
        pairs_source = settings.eval_dataset
    elif not settings.prompts:
        pairs = load_run_pairs(run.config)[1]
        pairs_source = "the run's eval split"
        if not pairs:
            raise EvaluationError(
                f"{run.directory}: the run held out no eval pairs (--eval_fraction 0 and no "
                "--eval_dataset); pass --eval_dataset FILE or --prompts FILE")
    if prompts is not None:
        prompts_source = settings.prompts
    else:
        prompts = [pair_view(pair, use_chat_template)[0] for pair in pairs]
        prompts_source = pairs_source
    return EvaluationInputs(pairs, pairs_source, prompts[:settings.num_prompts], prompts_source)


def load_prompts(path: str) -> list[Prompt]:
    """The prompts of a .txt file (one a line, blank lines skipped) or of a data file's
    'prompt' column (text or messages, each checked as a pair's prompt is); DataError naming
    the file (and row) when there are none or one is malformed."""
    if Path(path).suffix.lower() == ".txt":
        prompts = [line.strip() for line in read_utf8(Path(path)).splitlines() if line.strip()]
    else:
        source = load_rows(path)
        if "prompt" not in source.columns:
            raise DataError(f"{path}: no column 'prompt' (columns: "
                            f"{', '.join(source.columns) or 'none'})")
        indices = list(range(len(source)))
        prompts = [to_prompt(row.get("prompt"), f"{path}: {source.location(i)}")
                   for i, row in zip(indices, source.take(indices), strict=True)]
    if not prompts:
        raise DataError(f"{path}: no prompts in the file")
    return prompts
