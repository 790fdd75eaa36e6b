"""The preference-loss family: DPO and its common variants, written out by hand.

Every loss takes per-sequence log-probabilities (sums over the response tokens, shape [B])
and returns ``(losses, chosen_rewards, rejected_rewards)``, each of shape [B]. The losses are
per example; the caller takes the mean. The rewards are ``beta`` times the log-ratio the loss
itself compares (``log pi - log pi_ref``, per token where the loss normalises by length), and
they are detached: they are for logging and accuracy only, never for gradients.

Notation used in the docstrings, per example:
    pc, pr   policy log-probs of the chosen / rejected response
    rc, rr   reference log-probs of the chosen / rejected response (0 when reference-free)
    lc, lr   response lengths in tokens (labels != -100)
    h        = (pc - rc) - (pr - rr), the DPO logit; beta * h is the implicit reward margin
    eps      = label_smoothing
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge", "rpo", "simpo")

# Losses whose formula has a label-noise term; any other loss would silently ignore it.
_LOSSES_WITH_LABEL_SMOOTHING = ("sigmoid", "robust", "rpo")


def _log_ratio(policy_logps: Tensor, reference_logps: Tensor | None,
               lengths: Tensor | None = None) -> Tensor:
    """log pi(y|x) - log pi_ref(y|x) for one side of the pair, shape [B].

    A ``None`` reference counts as 0 (reference-free). With ``lengths`` [B] the ratio is per
    response token, which is the same as dividing each sequence's log-prob by its length.
    """
    ratio = policy_logps if reference_logps is None else policy_logps - reference_logps
    if lengths is None:
        return ratio
    if bool((lengths < 1).any()):
        raise ValueError(
            f"response lengths must be >= 1 token to length-normalise, got {lengths.tolist()}"
        )
    return ratio / lengths


def _detached_rewards(beta: float, chosen_ratios: Tensor,
                      rejected_ratios: Tensor) -> tuple[Tensor, Tensor]:
    return beta * chosen_ratios.detach(), beta * rejected_ratios.detach()


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sigmoid DPO (Rafailov et al. 2023, arXiv:2305.18290), with conservative DPO for eps > 0.

        loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)

    eps = 0 is DPO: the negative log-likelihood of the Bradley-Terry preference under the
    implicit reward beta * log(pi / pi_ref). eps > 0 is cDPO (Mitchell 2023, "A note on DPO
    with noisy preferences"): each label is taken to be flipped with probability eps, so the
    loss stops pushing once beta * h reaches log((1 - eps) / eps). eps must be in [0, 0.5).

    Worked example: pc - rc = ln 3, pr - rr = 0, beta = 1, eps = 0 gives h = ln 3,
    sigmoid(ln 3) = 3/4, loss = ln(4/3) ~ 0.2877. When policy == reference, h = 0 and the
    loss is ln 2 for any beta and eps.

    Uses ``F.logsigmoid``, which is exact for huge |beta * h| where log(sigmoid(.)) gives -inf.

    Args: the four log-probs are [B] (the references may be None: reference-free).
    Returns: (losses, chosen_rewards, rejected_rewards), each [B]; rewards are
    beta * (policy - reference), detached.
    """
    chosen_ratios = _log_ratio(policy_chosen_logps, reference_chosen_logps)
    rejected_ratios = _log_ratio(policy_rejected_logps, reference_rejected_logps)
    logits = beta * (chosen_ratios - rejected_ratios)
    losses = (
        -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    )
    return (losses, *_detached_rewards(beta, chosen_ratios, rejected_ratios))


def robust_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    beta: float,
    label_smoothing: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO", arXiv:2403.00409).

        loss = ((1 - eps) * -log sigmoid(beta * h) - eps * -log sigmoid(-beta * h)) / (1 - 2 eps)

    eps is the assumed rate of flipped labels. The loss is an unbiased estimate of the DPO loss
    on clean labels: (1 - eps) * loss(h) + eps * loss(-h) = -log sigmoid(beta * h). Unlike cDPO
    it can be negative. eps = 0 is plain DPO; eps must be in [0, 0.5).

    Worked example: beta * h = ln 3, eps = 1/4: ((3/4) ln(4/3) - (1/4) ln 4) / (1/2)
    = (3/2) ln(4/3) - (1/2) ln 4 ~ -0.2616.

    Shapes and rewards as in ``dpo_loss``.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust loss needs label_smoothing in [0, 0.5), got {label_smoothing}")
    chosen_ratios = _log_ratio(policy_chosen_logps, reference_chosen_logps)
    rejected_ratios = _log_ratio(policy_rejected_logps, reference_rejected_logps)
    logits = beta * (chosen_ratios - rejected_ratios)
    losses = (
        -(1.0 - label_smoothing) * F.logsigmoid(logits) + label_smoothing * F.logsigmoid(-logits)
    ) / (1.0 - 2.0 * label_smoothing)
    return (losses, *_detached_rewards(beta, chosen_ratios, rejected_ratios))


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from
    Human Preferences", arXiv:2310.12036), on length-normalised log-ratios.

        h_norm = (pc - rc) / lc - (pr - rr) / lr
        loss   = (h_norm - 1 / (2 * beta)) ** 2

    A squared loss pulls the margin to a finite target instead of pushing it to infinity, so
    IPO does not overfit deterministic preferences the way DPO can. The per-token
    normalisation (as in trl) keeps the target meaningful whatever the response lengths.

    Worked example: beta = 0.5 (target 1), pc - rc = 12 over 4 tokens (3 per token),
    pr - rr = -2 over 2 tokens (-1 per token): h_norm = 4, loss = (4 - 1)^2 = 9.

    Args: log-probs [B] (references may be None), lengths [B] (>= 1).
    Returns: (losses, chosen_rewards, rejected_rewards), each [B]; rewards are
    beta * (per-token log-ratio), detached, so their margin is what the loss compares.
    """
    chosen_ratios = _log_ratio(policy_chosen_logps, reference_chosen_logps, chosen_lengths)
    rejected_ratios = _log_ratio(policy_rejected_logps, reference_rejected_logps, rejected_lengths)
    losses = (chosen_ratios - rejected_ratios - 1.0 / (2.0 * beta)) ** 2
    return (losses, *_detached_rewards(beta, chosen_ratios, rejected_ratios))


def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """SLiC-style hinge loss (Zhao et al. 2023, "SLiC-HF", arXiv:2305.10425).

        loss = relu(1 - beta * h)

    Pairs whose reward margin beta * h already exceeds 1 give zero loss and zero gradient;
    1 / beta is the log-ratio margin SLiC calls delta.

    Worked example: beta = 0.5, h = 1 gives relu(0.5) = 0.5; h = 4 gives relu(-1) = 0.

    Shapes and rewards as in ``dpo_loss``.
    """
    chosen_ratios = _log_ratio(policy_chosen_logps, reference_chosen_logps)
    rejected_ratios = _log_ratio(policy_rejected_logps, reference_rejected_logps)
    losses = torch.relu(1.0 - beta * (chosen_ratios - rejected_ratios))
    return (losses, *_detached_rewards(beta, chosen_ratios, rejected_ratios))


def rpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    chosen_lengths: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    rpo_alpha: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """RPO: DPO plus an NLL term on the chosen response (Pang et al. 2024, "Iterative
    Reasoning Preference Optimization", arXiv:2404.19733).

        loss = dpo_loss(...) + rpo_alpha * (-pc / lc)

    The NLL term keeps the chosen response's likelihood from falling while the margin grows
    (plain DPO can lower both log-probs). It is the mean per-token NLL of the chosen response,
    as trl computes it (the paper divides by the whole sequence length, prompt included).

    Worked example: beta = 1, h = ln 3, rpo_alpha = 0.5, pc = -6 over 3 tokens:
    ln(4/3) + 0.5 * 2 ~ 1.2877.

    Args: log-probs [B] (references may be None), chosen_lengths [B] (>= 1).
    Returns: as ``dpo_loss``; the rewards are DPO's (the NLL term is not a reward).
    """
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps, beta, label_smoothing,
    )
    chosen_nll = -_log_ratio(policy_chosen_logps, None, chosen_lengths)
    return losses + rpo_alpha * chosen_nll, chosen_rewards, rejected_rewards


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float,
    simpo_gamma: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward", arXiv:2405.14734).

        loss = -log sigmoid(beta * pc / lc - beta * pr / lr - gamma)

    The reward is beta times the mean per-token log-prob: no reference model at all.
    ``simpo_gamma`` is the paper's gamma, the target reward margin itself. (trl's CPOTrainer
    takes gamma / beta instead, ``simpo_gamma`` there = gamma / beta here.) The paper tunes
    beta in about 2 to 10 and gamma in about 0.3 to 1.6: far larger than DPO's usual beta.

    Worked example: beta = 2, gamma = 0.5, pc = -4 over 4 tokens (-1 per token), pr = -5
    over 4 tokens (-1.25 per token): 2 * 0.25 - 0.5 = 0, loss = ln 2; rewards -2 and -2.5.

    Args: policy log-probs [B], lengths [B] (>= 1).
    Returns: (losses, chosen_rewards, rejected_rewards), each [B]; rewards are
    beta * logp / length, detached.
    """
    chosen_per_token = _log_ratio(policy_chosen_logps, None, chosen_lengths)
    rejected_per_token = _log_ratio(policy_rejected_logps, None, rejected_lengths)
    losses = -F.logsigmoid(beta * (chosen_per_token - rejected_per_token) - simpo_gamma)
    return (losses, *_detached_rewards(beta, chosen_per_token, rejected_per_token))


def validate_loss_options(
    loss_type: str,
    *,
    reference_free: bool,
    label_smoothing: float,
    beta: float,
    rpo_alpha: float = 1.0,
    simpo_gamma: float = 0.5,
    precompute_ref_log_probs: bool = False,
) -> None:
    """Raise ``ValueError`` naming the option when a loss configuration makes no sense.

    Call it once when the arguments are parsed, before any model is loaded.
    ``reference_free`` with ``simpo`` is accepted (SimPO never uses a reference anyway);
    asking for reference log-probs to be precomputed when none are used is an error.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(
            f"unknown --loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}"
        )
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"--beta must be a finite number > 0, got {beta}")
    if not (math.isfinite(label_smoothing) and 0.0 <= label_smoothing < 0.5):
        raise ValueError(f"--label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing > 0 and loss_type not in _LOSSES_WITH_LABEL_SMOOTHING:
        raise ValueError(
            f"--label_smoothing {label_smoothing} has no effect with --loss_type {loss_type}; "
            f"it applies to {', '.join(_LOSSES_WITH_LABEL_SMOOTHING)}"
        )
    if not (math.isfinite(rpo_alpha) and rpo_alpha >= 0):
        raise ValueError(f"--rpo_alpha must be a finite number >= 0, got {rpo_alpha}")
    if not (math.isfinite(simpo_gamma) and simpo_gamma >= 0):
        raise ValueError(f"--simpo_gamma must be a finite number >= 0, got {simpo_gamma}")
    if precompute_ref_log_probs and loss_type == "simpo":
        raise ValueError(
            "--loss_type simpo uses no reference model: drop --precompute_ref_log_probs"
        )
    if precompute_ref_log_probs and reference_free:
        raise ValueError(
            "--reference_free uses no reference model: drop --precompute_ref_log_probs"
        )


def preference_loss(
    loss_type: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    *,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    rpo_alpha: float = 1.0,
    simpo_gamma: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor]:
    """Dispatch to the loss named by ``loss_type`` (one of ``LOSS_TYPES``).

    Args:
        policy_*_logps: [B] summed response log-probs under the policy.
        reference_*_logps: [B] the same under the reference, or both None for reference-free
            training (treated as 0). ``simpo`` takes no reference: passing one is an error.
        chosen_lengths, rejected_lengths: [B] response token counts (labels != -100), used by
            the length-normalised losses (ipo, rpo's NLL, simpo).
    Returns: (losses, chosen_rewards, rejected_rewards), each [B]; rewards detached.
    """
    if (reference_chosen_logps is None) != (reference_rejected_logps is None):
        raise ValueError("pass both reference log-probs (chosen and rejected) or neither")
    reference_free = reference_chosen_logps is None
    if loss_type == "simpo" and not reference_free:
        raise ValueError(
            "loss_type 'simpo' is reference-free: do not compute or pass reference log-probs"
        )
    validate_loss_options(
        loss_type, reference_free=reference_free, label_smoothing=label_smoothing, beta=beta,
        rpo_alpha=rpo_alpha, simpo_gamma=simpo_gamma,
    )
    shapes = {
        "policy_chosen_logps": policy_chosen_logps.shape,
        "policy_rejected_logps": policy_rejected_logps.shape,
        "chosen_lengths": chosen_lengths.shape,
        "rejected_lengths": rejected_lengths.shape,
    }
    if not reference_free:
        shapes["reference_chosen_logps"] = reference_chosen_logps.shape
        shapes["reference_rejected_logps"] = reference_rejected_logps.shape
    if len(set(shapes.values())) != 1 or policy_chosen_logps.dim() != 1:
        raise ValueError(f"preference_loss needs 1-D tensors of one shape [B], got {shapes}")

    references = (reference_chosen_logps, reference_rejected_logps)
    if loss_type == "sigmoid":
        return dpo_loss(policy_chosen_logps, policy_rejected_logps, *references, beta,
                        label_smoothing)
    if loss_type == "robust":
        return robust_loss(policy_chosen_logps, policy_rejected_logps, *references, beta,
                           label_smoothing)
    if loss_type == "ipo":
        return ipo_loss(policy_chosen_logps, policy_rejected_logps, *references, chosen_lengths,
                        rejected_lengths, beta)
    if loss_type == "hinge":
        return hinge_loss(policy_chosen_logps, policy_rejected_logps, *references, beta)
    if loss_type == "rpo":
        return rpo_loss(policy_chosen_logps, policy_rejected_logps, *references, chosen_lengths,
                        beta, label_smoothing, rpo_alpha)
    # simpo: validate_loss_options has already rejected any other name.
    return simpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths,
                      rejected_lengths, beta, simpo_gamma)


def preference_metrics(
    losses: Tensor,
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
) -> dict[str, Tensor]:
    """Batch means under the names trl and torchtune log, as detached 0-dim float32 tensors.

    They stay tensors (not floats) so the trainer can gather them across processes before
    logging; each is the mean over this micro-batch, and the trainer averages them over
    gradient-accumulation micro-batches and processes.

        loss                mean per-example loss
        rewards/chosen      mean chosen reward (see each loss for what its reward is)
        rewards/rejected    mean rejected reward
        rewards/accuracies  fraction of pairs with chosen reward strictly > rejected (ties fail)
        rewards/margins     mean(chosen reward - rejected reward)
        logps/chosen        mean summed log-prob of the chosen response under the policy
        logps/rejected      the same for the rejected response

    Args: all inputs [B].
    """
    chosen_rewards = chosen_rewards.detach().float()
    rejected_rewards = rejected_rewards.detach().float()
    return {
        "loss": losses.detach().float().mean(),
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": policy_chosen_logps.detach().float().mean(),
        "logps/rejected": policy_rejected_logps.detach().float().mean(),
    }
