"""The preference-loss family: DPO and its variants, written out by hand, one pure function each.

Every loss takes per-sequence log-probabilities (sums over the response tokens, shape [B])
and returns ``(losses, chosen_rewards, rejected_rewards)``, each of shape [B]. The losses are
per example; the caller takes the mean. The rewards are ``beta`` times the log-ratio the loss
itself compares (``log pi - log pi_ref``, per token where the loss normalises by length), and
they are detached: they are for logging and accuracy only, never for gradients.

Batch-wide terms. Two kinds of loss look at the whole micro-batch, not at one pair:
``aot``/``aot_unpaired`` sort the log-ratios within it, and the NLL term of ``sft``, ``rpo``,
``cpo`` and ``orpo`` pools all chosen tokens of it (``nll_normalization="tokens"``, trl's
cross-entropy over the batch). Both still return [B] tensors whose mean is the batch loss, so
the trainer's "sum over pairs / pairs in the step" stays the right gradient. As in trl, the
batch is the micro-batch on one process: with gradient accumulation or several processes each
micro-batch is sorted and pooled on its own (nothing is gathered).

Two options act on the response tokens before the losses see them, and are functions here
too: ``length_desensitized_logps`` (LD-DPO's ``--ld_alpha``: the sums each loss compares) and
``wpo_weights`` (WPO's ``--use_weighting``: a weight per pair).

Notation used in the docstrings, per example:
    pc, pr   policy log-probs of the chosen / rejected response
    rc, rr   reference log-probs of the chosen / rejected response (0 when reference-free)
    lc, lr   response lengths in tokens (labels != -100)
    c, r     = pc - rc and pr - rr, the log-ratios of each side
    h        = c - r, the DPO logit; beta * h is the implicit reward margin
    eps      = label_smoothing
    f        the f-divergence score of a log-ratio (identity for reverse KL, i.e. plain DPO)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo_core.losses.options import F_DIVERGENCE_TYPES, NLL_NORMALIZATIONS

# Largest exponent of alpha_divergence's exp(.) per dtype, as trl clamps it (beyond it the
# score is constant and its gradient 0).
_ALPHA_EXP_CLAMP = {torch.float16: 11.0, torch.bfloat16: 80.0, torch.float32: 80.0,
                    torch.float64: 700.0}


@dataclass(frozen=True)
class FDivergence:
    """The f-divergence of f-DPO (Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct
    Preference Optimization with Diverse Divergence Constraints", arXiv:2309.16240).

    DPO's implicit reward log(pi/pi_ref) becomes f'(pi/pi_ref); with u = log(pi/pi_ref) the
    scores are, as trl 1.16 writes them:
        reverse_kl        u                               (plain DPO)
        forward_kl        1 - exp(-u)
        js_divergence     ln 2 + log sigmoid(u)           (= ln(2t / (1 + t)), t = e^u)
        alpha_divergence  (exp((alpha - 1) u) - 1) / (alpha - 1), reverse_kl at alpha = 1
    Every score is 0 at u = 0, so at step 1 (policy = reference) every loss keeps its value.
    """

    kind: str = "reverse_kl"
    alpha_coef: float = 0.5

    def scores(self, log_ratios: Tensor) -> Tensor:
        """f'(pi/pi_ref) of summed log-ratios [B] -> [B]."""
        if self.kind == "reverse_kl" or (
                self.kind == "alpha_divergence" and abs(self.alpha_coef - 1.0) < 1e-6):
            return log_ratios
        if self.kind == "forward_kl":
            return 1.0 - torch.exp(-log_ratios)
        if self.kind == "js_divergence":
            return math.log(2.0) + F.logsigmoid(log_ratios)
        if self.kind == "alpha_divergence":
            shift = self.alpha_coef - 1.0
            exponent = (shift * log_ratios).clamp(max=_ALPHA_EXP_CLAMP[log_ratios.dtype])
            return torch.expm1(exponent) / shift
        raise ValueError(f"unknown --f_divergence_type {self.kind!r}; choose one of "
                         f"{', '.join(F_DIVERGENCE_TYPES)}")


REVERSE_KL = FDivergence()


def _per_token(values: Tensor, lengths: Tensor) -> Tensor:
    """values [B] / lengths [B], refusing empty responses."""
    if bool((lengths < 1).any()):
        raise ValueError(
            f"response lengths must be >= 1 token to length-normalise, got {lengths.tolist()}"
        )
    return values / lengths


def _log_ratio(policy_logps: Tensor, reference_logps: Tensor | None,
               lengths: Tensor | None = None) -> Tensor:
    """log pi(y|x) - log pi_ref(y|x) for one side of the pair, shape [B].

    A ``None`` reference counts as 0 (reference-free). With ``lengths`` [B] the ratio is per
    response token, which is the same as dividing each sequence's log-prob by its length.
    """
    ratio = policy_logps if reference_logps is None else policy_logps - reference_logps
    return ratio if lengths is None else _per_token(ratio, lengths)


def _score_margin(f_divergence: FDivergence, chosen_ratios: Tensor, rejected_ratios: Tensor,
                  chosen_lengths: Tensor | None = None,
                  rejected_lengths: Tensor | None = None) -> Tensor:
    """f(c) - f(r) [B], each side divided by its length when lengths are given (trl takes
    the score of the summed log-ratio, then divides)."""
    chosen = f_divergence.scores(chosen_ratios)
    rejected = f_divergence.scores(rejected_ratios)
    if chosen_lengths is not None:
        chosen, rejected = _per_token(chosen, chosen_lengths), _per_token(rejected,
                                                                          rejected_lengths)
    return chosen - rejected


def _smoothed_sigmoid_loss(logits: Tensor, label_smoothing: float) -> Tensor:
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z) [B]: DPO's loss with cDPO smoothing."""
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(
        -logits)


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
    f_divergence: FDivergence = REVERSE_KL,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sigmoid DPO (Rafailov et al. 2023, arXiv:2305.18290), with conservative DPO for eps > 0.

        loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)

    eps = 0 is DPO: the negative log-likelihood of the Bradley-Terry preference under the
    implicit reward beta * log(pi / pi_ref). eps > 0 is cDPO (Mitchell 2023, "A note on DPO
    with noisy preferences"): each label is taken to be flipped with probability eps, so the
    loss stops pushing once beta * h reaches log((1 - eps) / eps). eps must be in [0, 0.5).
    (trl 1.16's ``sigmoid`` has no eps; this project keeps cDPO deliberately: eps = 0 is
    trl's loss.) With an f-divergence, h = f(c) - f(r).

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
    logits = beta * _score_margin(f_divergence, chosen_ratios, rejected_ratios)
    losses = _smoothed_sigmoid_loss(logits, label_smoothing)
    return (losses, *_detached_rewards(beta, chosen_ratios, rejected_ratios))


def robust_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    beta: float,
    label_smoothing: float,
    f_divergence: FDivergence = REVERSE_KL,
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
    logits = beta * _score_margin(f_divergence, chosen_ratios, rejected_ratios)
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
    f_divergence: FDivergence = REVERSE_KL,
) -> tuple[Tensor, Tensor, Tensor]:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from
    Human Preferences", arXiv:2310.12036), on length-normalised log-ratios.

        h_norm = (pc - rc) / lc - (pr - rr) / lr      (f(c) / lc - f(r) / lr with f-DPO)
        loss   = (h_norm - 1 / (2 * beta)) ** 2

    A squared loss pulls the margin to a finite target instead of pushing it to infinity, so
    IPO does not overfit deterministic preferences the way DPO can. The per-token
    normalisation (as in trl) keeps the target meaningful whatever the response lengths.

    Worked example: beta = 0.5 (target 1), pc - rc = 12 over 4 tokens (3 per token),
    pr - rr = -2 over 2 tokens (-1 per token): h_norm = 4, loss = (4 - 1)^2 = 9.

    Args: log-probs [B] (references may be None), lengths [B] (>= 1).
    Returns: (losses, chosen_rewards, rejected_rewards), each [B]; rewards are
    beta * (per-token log-ratio), detached, so their margin is what the loss compares
    (trl 1.16 logs beta * the summed log-ratio for every loss, ipo included).
    """
    chosen_ratios = _log_ratio(policy_chosen_logps, reference_chosen_logps)
    rejected_ratios = _log_ratio(policy_rejected_logps, reference_rejected_logps)
    h_norm = _score_margin(f_divergence, chosen_ratios, rejected_ratios, chosen_lengths,
                           rejected_lengths)
    losses = (h_norm - 1.0 / (2.0 * beta)) ** 2
    return (losses, *_detached_rewards(beta, _per_token(chosen_ratios, chosen_lengths),
                                       _per_token(rejected_ratios, rejected_lengths)))


def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    beta: float,
    f_divergence: FDivergence = REVERSE_KL,
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
    losses = torch.relu(1.0 - beta * _score_margin(f_divergence, chosen_ratios, rejected_ratios))
    return (losses, *_detached_rewards(beta, chosen_ratios, rejected_ratios))


def chosen_nll(policy_chosen_logps: Tensor, chosen_lengths: Tensor,
               nll_normalization: str = "tokens") -> Tensor:
    """The chosen response's negative log-likelihood as per-pair terms [B] whose mean is it.

    ``tokens`` (trl: a cross-entropy over every chosen token of the micro-batch):
        NLL = sum(-pc) / sum(lc); pair i's term is -pc_i * B / sum(lc)
    ``pairs`` (each pair's mean per-token NLL, then the mean over pairs):
        pair i's term is -pc_i / lc_i
    They agree when all chosen responses have one length; otherwise ``tokens`` weighs long
    responses more. Worked example: pc = (-6, -1), lc = (3, 1): tokens 7/4 = 1.75 (terms 3
    and 0.5), pairs (2 + 1) / 2 = 1.5.
    """
    per_token = _per_token(policy_chosen_logps, chosen_lengths)  # also refuses empty responses
    if nll_normalization == "pairs":
        return -per_token
    if nll_normalization != "tokens":
        raise ValueError(f"unknown --nll_normalization {nll_normalization!r}; choose one of "
                         f"{', '.join(NLL_NORMALIZATIONS)}")
    total_tokens = chosen_lengths.sum().to(policy_chosen_logps.dtype)
    return -policy_chosen_logps * (len(policy_chosen_logps) / total_tokens)


def rpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    chosen_lengths: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    rpo_alpha: float = 1.0,
    nll_normalization: str = "tokens",
    f_divergence: FDivergence = REVERSE_KL,
) -> tuple[Tensor, Tensor, Tensor]:
    """RPO: DPO plus an NLL term on the chosen response (Pang et al. 2024, "Iterative
    Reasoning Preference Optimization", arXiv:2404.19733).

        loss = dpo_loss(...) + rpo_alpha * NLL(chosen)      (NLL as ``chosen_nll``)

    The NLL term keeps the chosen response's likelihood from falling while the margin grows
    (plain DPO can lower both log-probs). ``nll_normalization="tokens"`` (the default) pools
    every chosen token of the micro-batch, as trl did (its ``rpo_alpha``; trl 1.16 writes the
    same thing as ``loss_type=["sigmoid", "sft"], loss_weights=[1, rpo_alpha]``);
    ``"pairs"`` averages each pair's per-token NLL. The paper divides by the whole sequence
    length, prompt included.

    Worked example: beta = 1, h = ln 3, rpo_alpha = 0.5, pc = -6 over 3 tokens:
    ln(4/3) + 0.5 * 2 ~ 1.2877 (one pair: both normalisations agree).

    Args: log-probs [B] (references may be None), chosen_lengths [B] (>= 1).
    Returns: as ``dpo_loss``; the rewards are DPO's (the NLL term is not a reward).
    """
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps, beta, label_smoothing, f_divergence,
    )
    nll = chosen_nll(policy_chosen_logps, chosen_lengths, nll_normalization)
    return losses + rpo_alpha * nll, chosen_rewards, rejected_rewards


def sft_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    chosen_lengths: Tensor,
    beta: float,
    nll_normalization: str = "tokens",
) -> tuple[Tensor, Tensor, Tensor]:
    """The NLL of the chosen response alone (supervised fine-tuning), for mixtures.

        loss = NLL(chosen)      (``chosen_nll``; trl's ``sft``: pooled over the tokens)

    Worked example: pc = (-6, -2), lc = (3, 1): 8 / 4 = 2 per token, per-pair terms (3, 1).

    Returns: (losses [B], rewards as ``dpo_loss``): beta * (policy - reference), or
    beta * policy log-prob when there is no reference.
    """
    chosen_ratios = _log_ratio(policy_chosen_logps, reference_chosen_logps)
    rejected_ratios = _log_ratio(policy_rejected_logps, reference_rejected_logps)
    losses = chosen_nll(policy_chosen_logps, chosen_lengths, nll_normalization)
    return (losses, *_detached_rewards(beta, chosen_ratios, rejected_ratios))


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
    ``simpo_gamma`` is the paper's gamma, the target reward margin itself, exactly as trl's
    ``CPOConfig.simpo_gamma`` (trl subtracts simpo_gamma / beta inside beta * (.), which is
    the same loss). The paper tunes beta in about 2 to 10 and gamma in about 0.3 to 1.6: far
    larger than DPO's usual beta.

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


def sigmoid_norm_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float,
    f_divergence: FDivergence = REVERSE_KL,
) -> tuple[Tensor, Tensor, Tensor]:
    """Length-normalised DPO, SimPO's length normalisation kept with a reference (trl's
    ``sigmoid_norm``; Meng et al. 2024, arXiv:2405.14734).

        loss = -log sigmoid(beta * (c / lc - r / lr))      (f(c) / lc - f(r) / lr with f-DPO)

    Worked example: beta = 1, c = 3 ln 3 over 3 tokens, r = 0: -log sigmoid(ln 3) = ln(4/3).

    Returns: as ``ipo_loss``: rewards are beta * per-token log-ratio (trl logs the sum).
    """
    chosen_ratios = _log_ratio(policy_chosen_logps, reference_chosen_logps)
    rejected_ratios = _log_ratio(policy_rejected_logps, reference_rejected_logps)
    h_norm = _score_margin(f_divergence, chosen_ratios, rejected_ratios, chosen_lengths,
                           rejected_lengths)
    losses = -F.logsigmoid(beta * h_norm)
    return (losses, *_detached_rewards(beta, _per_token(chosen_ratios, chosen_lengths),
                                       _per_token(rejected_ratios, rejected_lengths)))


def exo_pair_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    beta: float,
    label_smoothing: float,
    f_divergence: FDivergence = REVERSE_KL,
) -> tuple[Tensor, Tensor, Tensor]:
    """EXO, pairwise (Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model
    Alignment", arXiv:2402.00856, Eq. 16): the reverse KL from the model's preference
    distribution q = (sigmoid(z), sigmoid(-z)), z = beta * h, to the smoothed label
    p = (1 - eps, eps):

        loss = sigmoid(z) (log sigmoid(z) - log(1 - eps)) + sigmoid(-z) (log sigmoid(-z) - log eps)

    eps must be > 0 (the paper suggests 1e-3). The loss is >= 0, and 0 exactly where the
    model's preference probability equals 1 - eps.

    Worked example: eps = 1/4, z = ln 3: q = (3/4, 1/4) = p, loss 0. z = 0:
    (1/2) ln((1/2)/(3/4)) + (1/2) ln((1/2)/(1/4)) = (1/2) ln(4/3) ~ 0.1438.

    Shapes and rewards as in ``dpo_loss``.
    """
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"exo_pair needs label_smoothing in (0, 1), got {label_smoothing}")
    chosen_ratios = _log_ratio(policy_chosen_logps, reference_chosen_logps)
    rejected_ratios = _log_ratio(policy_rejected_logps, reference_rejected_logps)
    z = beta * _score_margin(f_divergence, chosen_ratios, rejected_ratios)
    losses = (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-label_smoothing))
              + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(label_smoothing)))
    return (losses, *_detached_rewards(beta, chosen_ratios, rejected_ratios))


def nca_pair_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """NCA, pairwise (Chen et al. 2024, "Noise Contrastive Alignment of Language Models with
    Explicit Rewards", arXiv:2402.05369): each response's own reward, not only the margin.

        loss = -log sigmoid(beta c) - (1/2) log sigmoid(-beta c) - (1/2) log sigmoid(-beta r)

    Worked example: beta c = ln 3, beta r = -ln 3: ln(4/3) + (1/2) ln 4 + (1/2) ln(4/3)
    = (3/2) ln(4/3) + ln 2 ~ 1.1247. At c = r = 0 the loss is 2 ln 2.

    Shapes and rewards as in ``dpo_loss``.
    """
    chosen_ratios = _log_ratio(policy_chosen_logps, reference_chosen_logps)
    rejected_ratios = _log_ratio(policy_rejected_logps, reference_rejected_logps)
    chosen, rejected = beta * chosen_ratios, beta * rejected_ratios
    losses = (-F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen)
              - 0.5 * F.logsigmoid(-rejected))
    return (losses, *_detached_rewards(beta, chosen_ratios, rejected_ratios))


def bco_pair_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """BCO, pairwise (Jung et al. 2024, "Binary Classifier Optimization for Large Language
    Model Alignment", arXiv:2404.04656): a binary classifier whose logit is the implicit
    reward, chosen -> 1 and rejected -> 0. trl 1.16's form, without BCO's running reward
    shift.

        loss = -log sigmoid(beta c) - log sigmoid(-beta r)

    Worked example: beta c = ln 3, beta r = -ln 3: 2 ln(4/3) ~ 0.5754. At c = r = 0: 2 ln 2.

    Shapes and rewards as in ``dpo_loss``.
    """
    chosen_ratios = _log_ratio(policy_chosen_logps, reference_chosen_logps)
    rejected_ratios = _log_ratio(policy_rejected_logps, reference_rejected_logps)
    losses = -F.logsigmoid(beta * chosen_ratios) - F.logsigmoid(-beta * rejected_ratios)
    return (losses, *_detached_rewards(beta, chosen_ratios, rejected_ratios))


def sppo_hard_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """SPPO with hard labels (Wu et al. 2024, "Self-Play Preference Optimization for Language
    Model Alignment", arXiv:2405.00675, Eq. 4.7 with P = 1 for the winner, 0 for the loser).

        loss = (c - 1 / (2 beta))^2 + (r + 1 / (2 beta))^2

    It pulls each reward beta * c, beta * r to +1/2 and -1/2 (squared, so both are bounded).

    Worked example: beta = 1/2 (targets +-1), c = 3, r = -2: 2^2 + 1^2 = 5. At c = r = 0:
    2 / (2 beta)^2, 50 for beta = 0.1.

    Shapes and rewards as in ``dpo_loss``.
    """
    chosen_ratios = _log_ratio(policy_chosen_logps, reference_chosen_logps)
    rejected_ratios = _log_ratio(policy_rejected_logps, reference_rejected_logps)
    target = 0.5 / beta
    losses = (chosen_ratios - target) ** 2 + (rejected_ratios + target) ** 2
    return (losses, *_detached_rewards(beta, chosen_ratios, rejected_ratios))


def aot_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    beta: float,
    label_smoothing: float = 0.0,
    paired: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """AOT (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal
    Transport", arXiv:2406.05882): first-order stochastic dominance of the chosen reward
    distribution over the rejected one, by matching sorted quantiles within the batch.

        paired   (aot):          d = sort(pc - pr) - sort(rc - rr)
        unpaired (aot_unpaired): d = sort(c) - sort(r)
        loss_k = -(1 - eps) log sigmoid(beta d_k) - eps log sigmoid(-beta d_k)

    **Batch-wide:** loss k belongs to the k-th quantile, not to pair k; only the mean over the
    batch means anything. The batch is this micro-batch on this process (as in trl; larger
    per-device batches help); with one pair per micro-batch aot is sigmoid DPO.

    Worked example (paired, beta = ln 3): pc - pr = (2, 0), rc - rr = (0, 1): sorted
    (0, 2) - (0, 1) = (0, 1), losses (ln 2, ln(4/3)); per pair DPO would compare 2 and -1.

    Returns: losses [B] in quantile order; rewards per pair, as ``dpo_loss``.
    """
    chosen_ratios = _log_ratio(policy_chosen_logps, reference_chosen_logps)
    rejected_ratios = _log_ratio(policy_rejected_logps, reference_rejected_logps)
    if paired:
        policy_margins = policy_chosen_logps - policy_rejected_logps
        reference_margins = (torch.zeros_like(policy_margins) if reference_chosen_logps is None
                             else reference_chosen_logps - reference_rejected_logps)
        d = torch.sort(policy_margins).values - torch.sort(reference_margins).values
    else:
        d = torch.sort(chosen_ratios).values - torch.sort(rejected_ratios).values
    losses = _smoothed_sigmoid_loss(beta * d, label_smoothing)
    return (losses, *_detached_rewards(beta, chosen_ratios, rejected_ratios))


def apo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    beta: float,
    anchor: str = "zero",
) -> tuple[Tensor, Tensor, Tensor]:
    """APO (D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive
    Revisions", arXiv:2408.06266, Eqs. 7 and 8): anchored to the reference's likelihoods.

        apo_zero: loss = (1 - sigmoid(beta c)) + sigmoid(beta r)
                  (chosen better than the model: raise chosen, lower rejected)
        apo_down: loss = sigmoid(beta c) + (1 - sigmoid(beta (c - r)))
                  (chosen worse than the model: lower both, rejected more)

    Both lie in [0, 2] and equal 1 at step 1 (c = r = 0).
    Worked examples: apo_zero, beta c = ln 3, beta r = -ln 3: 1/4 + 1/4 = 1/2;
    apo_down, beta c = 0, beta r = -ln 3: 1/2 + 1/4 = 3/4.

    Shapes and rewards as in ``dpo_loss``.
    """
    chosen_ratios = _log_ratio(policy_chosen_logps, reference_chosen_logps)
    rejected_ratios = _log_ratio(policy_rejected_logps, reference_rejected_logps)
    if anchor == "zero":
        losses = torch.sigmoid(-beta * chosen_ratios) + torch.sigmoid(beta * rejected_ratios)
    else:
        losses = (torch.sigmoid(beta * chosen_ratios)
                  + torch.sigmoid(-beta * (chosen_ratios - rejected_ratios)))
    return (losses, *_detached_rewards(beta, chosen_ratios, rejected_ratios))


def discopop_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    beta: float,
    discopop_tau: float = 0.05,
    f_divergence: FDivergence = REVERSE_KL,
) -> tuple[Tensor, Tensor, Tensor]:
    """DiscoPOP, the log-ratio modulated loss (Lu et al. 2024, "Discovering Preference
    Optimization Algorithms with and for Large Language Models", arXiv:2406.08414, Eq. 5).

        x = beta * h,  m = sigmoid(x / tau)
        loss = (1 - m) * -log sigmoid(x) + m * exp(-x)

    A blend of DPO's logistic loss and an exponential loss, switched by the sign of the
    margin at temperature tau (``--discopop_tau``, trl's default 0.05, the paper's).
    m * exp(-x) is computed as exp(-x + log sigmoid(x / tau)): the same value, without the
    inf * 0 = NaN of a very negative x.

    Worked example: tau = 1, x = ln 3: m = 3/4, loss = (1/4) ln(4/3) + (3/4)(1/3) ~ 0.3219.
    At x = 0: (ln 2 + 1) / 2 ~ 0.8466.

    Shapes and rewards as in ``dpo_loss``.
    """
    chosen_ratios = _log_ratio(policy_chosen_logps, reference_chosen_logps)
    rejected_ratios = _log_ratio(policy_rejected_logps, reference_rejected_logps)
    x = beta * _score_margin(f_divergence, chosen_ratios, rejected_ratios)
    losses = (-F.logsigmoid(x) * torch.sigmoid(-x / discopop_tau)
              + torch.exp(-x + F.logsigmoid(x / discopop_tau)))
    return (losses, *_detached_rewards(beta, chosen_ratios, rejected_ratios))


def _token_ranks(sequence_index: Tensor, num_sequences: int) -> tuple[Tensor, Tensor]:
    """(rank [N], counts [S]): each token's 0-based place among its sequence's tokens (they
    come in position order), and each sequence's token count."""
    counts = torch.bincount(sequence_index, minlength=num_sequences)
    order = torch.argsort(sequence_index, stable=True)
    starts = counts.cumsum(0) - counts
    ranks = torch.empty_like(sequence_index)
    ranks[order] = torch.arange(len(order), device=order.device) - starts[sequence_index[order]]
    return ranks, counts


def length_desensitized_logps(token_logps: Tensor, sequence_index: Tensor, num_pairs: int,
                              ld_alpha: float) -> tuple[Tensor, Tensor]:
    """LD-DPO's response log-probs (Liu et al. 2024, "Length Desensitization in Direct
    Preference Optimization", arXiv:2409.06411), trl 1.16's ``ld_alpha``.

    For pair b, with l = min(lc, lr) the length both replies share, each reply's log-prob is
        sum of its first l tokens' log-probs + ld_alpha * sum of the rest
    The shorter reply is unchanged; the longer one's tail (the "verbose" part) counts
    ld_alpha times. Apply it to the policy and the reference alike (as trl does).

    Worked example: chosen tokens (-1, -2, -3), rejected (-4), ld_alpha = 1/2: l = 1, chosen
    -1 + (-2 - 3) / 2 = -3.5, rejected -4. ld_alpha = 1 gives the plain sums.

    Args: token_logps [N]; sequence_index [N], b for pair b's chosen reply and B + b for its
        rejected one, each sequence's tokens in position order; num_pairs B.
    Returns: (chosen [B], rejected [B]), in token_logps' dtype.
    """
    ranks, counts = _token_ranks(sequence_index, 2 * num_pairs)
    shared = torch.minimum(counts[:num_pairs], counts[num_pairs:]).repeat(2)
    weights = torch.where(ranks < shared[sequence_index], 1.0, ld_alpha).to(token_logps.dtype)
    sums = token_logps.new_zeros(2 * num_pairs).index_add(0, sequence_index,
                                                          token_logps * weights)
    return sums[:num_pairs], sums[num_pairs:]


def wpo_weights(token_logps: Tensor, log_sum_sq_probs: Tensor, sequence_index: Tensor,
                num_pairs: int) -> Tensor:
    """WPO's per-pair weight (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference
    Optimization", arXiv:2406.11827, Eq. 2 with its length normalisation), as trl 1.16's
    ``use_weighting`` computes it:

        w(y) = exp(mean over y's tokens of (log p(token) - log sum_v p_v^2))
        weight = w(chosen) * w(rejected)        (detached: no gradient flows through it)

    p is the policy's next-token distribution; sum_v p_v^2 is the probability that two samples
    from it agree, so each token counts relative to how peaked its distribution is, and a
    reply the policy would likely produce weighs more. An empty reply has mean 0 (w = 1).

    Worked example: one chosen token with p = 1/2 from a distribution (1/2, 1/2): log(1/2) -
    log(1/2) = 0, w = 1; one rejected token with p = 1/4 from (1/2, 1/4, 1/4): sum p^2 = 3/8,
    w = (1/4) / (3/8) = 2/3; weight 2/3.

    Args: token_logps, log_sum_sq_probs, sequence_index [N] (as ``length_desensitized_logps``);
        num_pairs B.
    Returns: [B] weights, detached.
    """
    aligned = (token_logps - log_sum_sq_probs).detach()
    sums = aligned.new_zeros(2 * num_pairs).index_add(0, sequence_index, aligned)
    counts = torch.bincount(sequence_index, minlength=2 * num_pairs).clamp(min=1)
    weights = torch.exp(sums / counts)
    return weights[:num_pairs] * weights[num_pairs:]


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2 (Maechler 2012)."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    orpo_alpha: float,
    nll_normalization: str = "tokens",
) -> tuple[Tensor, Tensor, Tensor]:
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model", arXiv:2403.07691, Eqs. 4-7): SFT plus an odds-ratio preference term.

        a = pc / lc, b = pr / lr      (mean per-token log-probs, log P of the paper)
        log OR = (a - log(1 - e^a)) - (b - log(1 - e^b))
        loss = NLL(chosen) - orpo_alpha * log sigmoid(log OR)

    ``orpo_alpha`` is the paper's lambda (trl's ``ORPOConfig.beta``, default 0.1); ``--beta``
    is not used. No reference model. trl takes the NLL over prompt and response tokens; here it
    is over the chosen response, as ``chosen_nll`` (the paper's L_SFT of the response).

    Worked example: a = ln(1/2) (odds 1), b = ln(1/4) (odds 1/3): log OR = ln 3, the term is
    ln(4/3); with pc = 2 ln(1/2) over 2 tokens (NLL ln 2) and alpha = 1/2: ln 2 + ln(4/3) / 2.

    Returns: (losses, chosen_rewards, rejected_rewards), each [B]; rewards are
    orpo_alpha * mean per-token log-prob (as trl logs them), detached.
    """
    chosen_per_token = _log_ratio(policy_chosen_logps, None, chosen_lengths)
    rejected_per_token = _log_ratio(policy_rejected_logps, None, rejected_lengths)
    log_odds = ((chosen_per_token - rejected_per_token)
                - (_log1mexp(chosen_per_token) - _log1mexp(rejected_per_token)))
    nll = chosen_nll(policy_chosen_logps, chosen_lengths, nll_normalization)
    losses = nll - orpo_alpha * F.logsigmoid(log_odds)
    return (losses, *_detached_rewards(orpo_alpha, chosen_per_token, rejected_per_token))


def cpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    cpo_alpha: float = 1.0,
    nll_normalization: str = "tokens",
) -> tuple[Tensor, Tensor, Tensor]:
    """CPO (Xu et al. 2024, "Contrastive Preference Optimization: Pushing the Boundaries of
    LLM Performance in Machine Translation", arXiv:2401.08417, Eq. 3 plus its NLL term).

        loss = -(1 - eps) log sigmoid(beta (pc - pr)) - eps log sigmoid(-beta (pc - pr))
               + cpo_alpha * NLL(chosen)

    DPO with a uniform reference plus a behaviour-cloning term: trl's ``CPOTrainer`` with
    ``loss_type="sigmoid"`` (its ``cpo_alpha`` defaults to 1.0, its NLL pools the chosen
    tokens). That is ``rpo_loss`` without a reference, which is how it is computed.

    Worked example: beta = 1, pc - pr = ln 3, pc = -6 over 3 tokens, alpha = 1:
    ln(4/3) + 2 ~ 2.2877.

    Returns: (losses, beta * pc, beta * pr), each [B]; rewards detached.
    """
    return rpo_loss(policy_chosen_logps, policy_rejected_logps, None, None, chosen_lengths,
                    beta, label_smoothing, cpo_alpha, nll_normalization)
