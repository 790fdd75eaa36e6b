"""`dpo-eval RUN_DIR`: the trained model of a run against the model it started from.

In order, with one model in memory at a time:
1. the policy replies to the prompts (its share of them under `accelerate launch`), and scores
   its replies (log pi);
2. inside the reference context, once: the reference's log-probs of the pairs, its replies to
   the same prompts (same seed), and its log-probs of the policy's replies (log pi_ref);
3. the policy pass over the pairs with the reference values: the training log's metrics;
4. the policy freed, each judge scores both replies to every prompt;
5. the main process gathers everything, computes the statistics and writes eval.json,
   eval_samples.md and eval.png (`dpo_core.reporting.eval_report`).
"""

from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass

import torch
from accelerate.utils import gather_object, set_seed

from dpo_core.config.evaluation import EvalConfig
from dpo_core.data.templates import Prompt
from dpo_core.data.training_data import tokenize_split
from dpo_core.evaluation.inputs import EvaluationInputs, evaluation_inputs, load_prompts
from dpo_core.evaluation.judges import (
    Judge,
    RewardModelJudge,
    check_reward_model,
    judge_summary,
    rule_judge,
)
from dpo_core.evaluation.models import RunModels, evaluation_precision, load_run_models
from dpo_core.evaluation.pairs import pair_metrics, reference_pair_logps
from dpo_core.evaluation.replies import reply_logps, reply_statistics
from dpo_core.evaluation.run import TrainedRun
from dpo_core.modeling.generation import GeneratedReply, generate
from dpo_core.reporting.eval_report import write_eval_outputs


@dataclass
class PromptOutcome:
    """One prompt's replies, the policy's log-ratio on its own reply, and the judges' scores
    ({judge: (reference score, policy score)})."""

    prompt: Prompt
    reference: GeneratedReply
    policy: GeneratedReply
    log_ratio: float
    scores: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)


def evaluate_run(settings: EvalConfig, run: TrainedRun) -> dict | None:
    """Evaluate `run` as `settings` say; the result (what eval.json holds) on the main process,
    None on the others."""
    dtype, quantize = evaluation_precision(run, settings.dtype, settings.quantization)
    # What can be wrong with the judges and the prompts file is said before the models load.
    rule = rule_judge(settings.judge) if settings.judge else None
    if settings.reward_model:
        check_reward_model(settings.reward_model, settings.trust_remote_code)
    prompts = load_prompts(settings.prompts) if settings.prompts else None
    models = load_run_models(run, dtype, quantize)
    accelerator = models.accelerator
    inputs = evaluation_inputs(settings, run, models.use_chat_template, prompts)
    pairs, outcomes = _measure(models, inputs, settings, run)
    del models  # the policy (and its reference) go before any judge model comes in
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if rule is not None:
        _score(rule, outcomes)
    if settings.reward_model:
        reward_model = RewardModelJudge.load(
            settings.reward_model, dtype=dtype, device=accelerator.device,
            batch_size=settings.batch_size, trust_remote_code=settings.trust_remote_code)
        _score(reward_model, outcomes)
    if accelerator.num_processes > 1:
        outcomes = gather_object(outcomes)
    if not accelerator.is_main_process:
        return None
    result = {
        "run_dir": run.directory,
        "reference": run.describe_reference(),
        "settings": dataclasses.asdict(settings),
        "run_plan": run.plan,
        "num_processes": accelerator.num_processes,
        "pairs": pairs and {"source": inputs.pairs_source, **pairs},
        "generation": _generation_summary(outcomes, inputs, settings) if outcomes else None,
        "judges": _judge_summaries(outcomes),
        "samples": [_sample_record(o) for o in outcomes],
    }
    write_eval_outputs(result, settings.destination)
    return result


def _measure(models: RunModels, inputs: EvaluationInputs, settings: EvalConfig,
             run: TrainedRun) -> tuple[dict | None, list[PromptOutcome]]:
    """Steps 1-3 of the module docstring: (pair metrics or None, this process's outcomes)."""
    accelerator, tokenizer = models.accelerator, models.tokenizer
    main = accelerator.is_main_process
    pairs = (tokenize_split(run.config, tokenizer, inputs.pairs, "eval", models.use_chat_template,
                            show_progress=main) if inputs.pairs else [])
    pair_batch_size = (run.plan.get("eval_batch_size") or run.config.eval_batch_size
                       or run.config.batch_size)
    with accelerator.split_between_processes(inputs.prompts) as share:
        prompts = list(share)
    options = {"use_chat_template": models.use_chat_template,
               "max_new_tokens": settings.max_new_tokens, "batch_size": settings.batch_size,
               "do_sample": settings.temperature > 0, "temperature": settings.temperature,
               "top_p": settings.top_p}

    def replies(model: torch.nn.Module, whose: str) -> list[GeneratedReply]:
        set_seed(settings.seed)  # both networks sample from the same random stream
        return generate(model, tokenizer, prompts, **options,
                        progress=f"Replies of the {whose}" if main and prompts else None)

    def logps(model: torch.nn.Module, of: list[GeneratedReply]) -> list[float]:
        return reply_logps(model, of, models.pad_token_id, settings.batch_size)

    policy = replies(models.model, "policy")
    policy_logps = logps(models.model, policy)
    with torch.no_grad(), models.reference(models.model) as reference_model:
        models.forward.prepare(reference_model)  # a reloaded starting model runs the same path
        reference_values = (reference_pair_logps(models, reference_model, pairs, pair_batch_size)
                            if pairs else None)
        reference = replies(reference_model, "reference")
        reference_logps = logps(reference_model, policy)
    metrics = (pair_metrics(models, pairs, reference_values, pair_batch_size,
                            run.config.group_by_length) if pairs else None)
    outcomes = [PromptOutcome(prompt, ref, pol, pol_logp - ref_logp)
                for prompt, ref, pol, pol_logp, ref_logp
                in zip(prompts, reference, policy, policy_logps, reference_logps, strict=True)]
    return metrics, outcomes


def _score(judge: Judge, outcomes: list[PromptOutcome]) -> None:
    """Both replies to every prompt, scored by `judge` into `outcomes`."""
    if not outcomes:
        return
    prompts = [o.prompt for o in outcomes]
    reference = judge.score(prompts, [o.reference.text for o in outcomes])
    policy = judge.score(prompts, [o.policy.text for o in outcomes])
    for outcome, pair in zip(outcomes, zip(reference, policy, strict=True), strict=True):
        outcome.scores[judge.name] = pair


def _generation_summary(outcomes: list[PromptOutcome], inputs: EvaluationInputs,
                        settings: EvalConfig) -> dict:
    decoding = ("greedy" if settings.temperature == 0 else
                f"sampled (temperature {settings.temperature:g}, top_p {settings.top_p:g}, "
                f"seed {settings.seed})")
    return {
        "source": inputs.prompts_source,
        "num_prompts": len(outcomes),
        "decoding": decoding,
        "max_new_tokens": settings.max_new_tokens,
        "reference": reply_statistics([o.reference for o in outcomes]),
        "policy": reply_statistics([o.policy for o in outcomes]),
        "kl_estimate": sum(o.log_ratio for o in outcomes) / len(outcomes),
    }


def _judge_summaries(outcomes: list[PromptOutcome]) -> dict[str, dict]:
    names = list(outcomes[0].scores) if outcomes else []
    return {name: judge_summary([o.scores[name][0] for o in outcomes],
                                [o.scores[name][1] for o in outcomes],
                                [len(o.reference.reply_ids) for o in outcomes],
                                [len(o.policy.reply_ids) for o in outcomes])
            for name in names}


def _sample_record(outcome: PromptOutcome) -> dict:
    return {
        "prompt": outcome.prompt,
        "reference_reply": outcome.reference.text,
        "policy_reply": outcome.policy.text,
        "reference_tokens": len(outcome.reference.reply_ids),
        "policy_tokens": len(outcome.policy.reply_ids),
        "reference_stopped": outcome.reference.stopped,
        "policy_stopped": outcome.policy.stopped,
        "log_ratio": outcome.log_ratio,
        "scores": {name: {"reference": ref, "policy": pol}
                   for name, (ref, pol) in outcome.scores.items()},
    }
