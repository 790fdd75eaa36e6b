"""Preference accuracy on held-out pairs, before (the reference) and after (the trained model).

After training, every metric the training log reports for its eval split (`loss`,
`rewards/accuracies`, `rewards/margins`, ...), computed by the run's own objective, forward
path and batch size: on the run's eval split they are the numbers of its last eval record.
Before and after, what needs no reference: the share of pairs whose chosen reply gets the higher
log-prob, summed (`logps_accuracy`) and per token (`length_normalised_accuracy`). Before
training the policy is the reference, so the implicit rewards are all 0: not reported.

The reference's log-probs are computed first, in one pass inside the reference context (so a
fully fine-tuned run reads its starting model once), and ride in the batches of the policy pass
as precomputed values, as in training with --precompute_ref_log_probs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dpo_core.data.batches import eval_loader
from dpo_core.data.tokenization import TokenizedPair
from dpo_core.evaluation.models import RunModels
from dpo_core.training.metrics import merged_metrics
from dpo_core.training.objective import evaluate_pairs
from dpo_core.training.reference_logps import (
    PairsWithReference,
    ReferenceLogpsCollator,
    compute_reference_logps,
)


def reference_pair_logps(models: RunModels, reference_model: torch.nn.Module,
                         pairs: Sequence[TokenizedPair], batch_size: int) -> torch.Tensor:
    """[N, 2] (chosen, rejected) log-probs of `pairs` under `reference_model` (the network the
    reference context gave), by the run's forward path; every process takes part."""
    return compute_reference_logps(
        reference_model, pairs, logps=models.objective.logps,
        collator=models.forward.collator(models.pad_token_id), accelerator=models.accelerator,
        batch_size=batch_size)


def preference_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Share of pairs whose chosen score is strictly higher (ties fail, as trl counts)."""
    return (chosen > rejected).float().mean().item()


def logps_metrics(chosen: torch.Tensor, rejected: torch.Tensor, chosen_lengths: torch.Tensor,
                  rejected_lengths: torch.Tensor) -> dict[str, float]:
    """What a model's own log-probs say about [N] pairs: the two accuracies and the means."""
    return {
        "logps_accuracy": preference_accuracy(chosen, rejected),
        "length_normalised_accuracy": preference_accuracy(chosen / chosen_lengths,
                                                          rejected / rejected_lengths),
        "logps/chosen": chosen.mean().item(),
        "logps/rejected": rejected.mean().item(),
    }


def pair_metrics(models: RunModels, pairs: Sequence[TokenizedPair],
                 reference_logps: torch.Tensor, batch_size: int,
                 group_by_length: bool) -> dict:
    """{"num_pairs", "before": {...}, "after": {...}} (module docstring) from the policy pass
    over `pairs` with their `reference_pair_logps`, batched as the run's evaluation was
    (`batch_size`, longest first with `group_by_length`)."""
    collator = ReferenceLogpsCollator(models.forward.collator(models.pad_token_id))
    lengths = models.forward.pair_lengths(pairs) if group_by_length else None
    loader = eval_loader(models.accelerator, PairsWithReference(pairs, reference_logps), batch_size,
                         collator, lengths)
    stats = evaluate_pairs(models.objective, models.model, loader, models.reference,
                           models.accelerator)
    lengths = (stats["chosen_lengths"].float(), stats["rejected_lengths"].float())
    before = logps_metrics(stats["reference_chosen_logps"], stats["reference_rejected_logps"],
                           *lengths)
    after = logps_metrics(stats["policy_chosen_logps"], stats["policy_rejected_logps"], *lengths)
    return {"num_pairs": len(pairs), "before": before,
            "after": {**after, **merged_metrics([stats])}}
