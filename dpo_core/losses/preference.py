"""The loss of one micro-batch: the loss (or weighted mixture) the settings name, and its metrics.

`preference_loss` looks each loss up in `dpo_core.losses.options.LOSSES` and calls its function
in `dpo_core.losses.functions` with the arguments that function names: the log-probs and
lengths, and the options under their flag names (`beta`, `label_smoothing`, `rpo_alpha`, ...),
plus the row's fixed arguments. Nothing is validated per call beyond the tensors' shapes: the
options were checked when `LossSettings` was built. The two options that need the response
tokens themselves are applied by the caller, from `TokenLogps` (`dpo_core.forward`):
`--ld_alpha` to the log-probs passed in (`functions.length_desensitized_logps`), and
`--use_weighting` as `pair_weights` (`functions.wpo_weights`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import NamedTuple

from torch import Tensor

from dpo_core.losses import functions
from dpo_core.losses.options import LOSSES, REFERENCE_FREE_LOSSES, LossSettings


class LossTerms(NamedTuple):
    """What ``preference_loss`` returns, each [B]: the weighted total (with grad), the
    rewards of the first loss type (detached) and, for a mixture, each term without its
    ``loss_weights`` factor (with the WPO pair weight, when on)."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    components: dict[str, Tensor]


# The options a loss function may name, beside the tensors and `f_divergence`.
_OPTION_NAMES = ("beta", "label_smoothing", "rpo_alpha", "simpo_gamma", "discopop_tau",
                 "nll_normalization", "orpo_alpha", "cpo_alpha")


@functools.cache
def _loss_function(name: str) -> tuple[Callable, tuple[str, ...]]:
    """The function computing loss `name`, and the names of its parameters."""
    function = getattr(functions, LOSSES[name].function)
    return function, tuple(inspect.signature(function).parameters)


def _one_loss(name: str, arguments: dict) -> tuple[Tensor, Tensor, Tensor]:
    """Loss `name` of the batch: its function, given the `arguments` it names."""
    function, parameters = _loss_function(name)
    given = {**arguments, **LOSSES[name].fixed}
    return function(**{p: given[p] for p in parameters if p in given})


def preference_loss(
    settings: LossSettings,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    *,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    pair_weights: Tensor | None = None,
) -> LossTerms:
    """The loss (or weighted mixture of losses) that ``settings`` names, on one micro-batch.

        loss = sum_k weight_k * loss_k      (per pair; trl's ``loss_weights``, default 1)
        loss = w * sum_k weight_k * loss_k  (with --use_weighting: w = ``pair_weights``)

    Args:
        settings: the loss options (a ``TrainConfig`` is one).
        policy_*_logps: [B] summed response log-probs under the policy.
        reference_*_logps: [B] the same under the reference, or both None for reference-free
            training (treated as 0). simpo, orpo and cpo take no reference: passing one is an
            error.
        chosen_lengths, rejected_lengths: [B] response token counts (labels != -100), used by
            the length-normalised losses and the NLL terms.
        pair_weights: [B] WPO weights (``functions.wpo_weights``), given exactly when
            ``settings.use_weighting``; they scale every term of a pair (its components too).
    Returns: ``LossTerms``; the rewards are those of the first loss type of a mixture.
    """
    if settings.use_weighting != (pair_weights is not None):
        raise ValueError("pass pair_weights (dpo_core.losses.functions.wpo_weights) exactly "
                         f"when use_weighting is on (it is {settings.use_weighting})")
    if (reference_chosen_logps is None) != (reference_rejected_logps is None):
        raise ValueError("pass both reference log-probs (chosen and rejected) or neither")
    reference_free = reference_chosen_logps is None
    free = [n for n in settings.loss_types if n in REFERENCE_FREE_LOSSES]
    if free and not reference_free:
        raise ValueError(f"loss_type {', '.join(free)} is reference-free: do not compute or "
                         "pass reference log-probs")
    shapes = {
        "policy_chosen_logps": policy_chosen_logps.shape,
        "policy_rejected_logps": policy_rejected_logps.shape,
        "chosen_lengths": chosen_lengths.shape,
        "rejected_lengths": rejected_lengths.shape,
    }
    if not reference_free:
        shapes["reference_chosen_logps"] = reference_chosen_logps.shape
        shapes["reference_rejected_logps"] = reference_rejected_logps.shape
    if pair_weights is not None:
        shapes["pair_weights"] = pair_weights.shape
    if len(set(shapes.values())) != 1 or policy_chosen_logps.dim() != 1:
        raise ValueError(f"preference_loss needs 1-D tensors of one shape [B], got {shapes}")

    arguments = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
        "reference_chosen_logps": reference_chosen_logps,
        "reference_rejected_logps": reference_rejected_logps,
        "chosen_lengths": chosen_lengths,
        "rejected_lengths": rejected_lengths,
        **{name: getattr(settings, name) for name in _OPTION_NAMES},
        "f_divergence": functions.FDivergence(settings.f_divergence_type,
                                              settings.f_alpha_divergence_coef),
    }
    terms = [_one_loss(name, arguments) for name in settings.loss_types]
    _, chosen_rewards, rejected_rewards = terms[0]
    scale = 1.0 if pair_weights is None else pair_weights.detach()
    total = sum(weight * losses for weight, (losses, _, _)
                in zip(settings.weights, terms, strict=True)) * scale
    components = ({} if len(terms) == 1 else
                  {name: (losses * scale).detach() for name, (losses, _, _)
                   in zip(settings.loss_types, terms, strict=True)})
    return LossTerms(total, chosen_rewards, rejected_rewards, components)


def preference_metrics(
    losses: Tensor,
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    wpo_weights: Tensor | None = None,
    **component_losses: Tensor,
) -> dict[str, Tensor]:
    """Batch means under the names trl and torchtune log, as detached 0-dim float32 tensors.

    They stay tensors (not floats) so the trainer can gather them across processes before
    logging; each is the mean over this micro-batch, and the trainer averages them over
    gradient-accumulation micro-batches and processes.

        loss                mean per-example loss (the weighted sum for a mixture)
        loss/<type>         a mixture's terms, unweighted (passed as keyword "loss/<type>")
        rewards/chosen      mean chosen reward (see each loss for what its reward is)
        rewards/rejected    mean rejected reward
        rewards/accuracies  fraction of pairs with chosen reward strictly > rejected (ties fail)
        rewards/margins     mean(chosen reward - rejected reward)
        logps/chosen        mean summed log-prob of the chosen response under the policy
        logps/rejected      the same for the rejected response
        wpo_weight          mean WPO pair weight (with --use_weighting only)

    Args: all inputs [B].
    """
    chosen_rewards = chosen_rewards.detach().float()
    rejected_rewards = rejected_rewards.detach().float()
    return {
        "loss": losses.detach().float().mean(),
        **{name: values.detach().float().mean() for name, values in component_losses.items()},
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": policy_chosen_logps.detach().float().mean(),
        "logps/rejected": policy_rejected_logps.detach().float().mean(),
        **({} if wpo_weights is None else {"wpo_weight": wpo_weights.detach().float().mean()}),
    }
