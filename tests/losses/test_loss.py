"""The preference losses against hand-worked values, independent float64 formulas, closed-form
gradients and the properties their papers state.

Hand-worked values use h = (pc - rc) - (pr - rr); sigmoid(ln 3) = 3/4, so with beta * h = ln 3
the DPO loss is -ln(3/4) = ln(4/3).
"""

from __future__ import annotations

import math

import pytest
import torch

from dpo_core.losses.functions import (
    FDivergence,
    aot_loss,
    apo_loss,
    bco_pair_loss,
    chosen_nll,
    cpo_loss,
    discopop_loss,
    dpo_loss,
    exo_pair_loss,
    hinge_loss,
    ipo_loss,
    nca_pair_loss,
    orpo_loss,
    robust_loss,
    rpo_loss,
    sft_loss,
    sigmoid_norm_loss,
    simpo_loss,
    sppo_hard_loss,
)
from dpo_core.losses.options import (
    F_DIVERGENCE_TYPES,
    LOSS_TYPES,
    REFERENCE_FREE_LOSSES,
    LossSettings,
    validate_loss_options,
)
from dpo_core.losses.preference import preference_loss, preference_metrics

LN3 = math.log(3.0)
F64 = torch.float64


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def lengths(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


# --- independent per-example formulas, plain Python floats (moderate values only) -----------

def softplus(x: float) -> float:
    """log(1 + e^x), i.e. -log sigmoid(-x)."""
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def f_score(kind: str, u: float, alpha: float = 0.5) -> float:
    """f'(t) at t = e^u, from the f-DPO paper's table (Wang et al. 2023)."""
    t_ratio = math.exp(u)
    if kind == "reverse_kl":
        return math.log(t_ratio)
    if kind == "forward_kl":
        return 1.0 - 1.0 / t_ratio
    if kind == "js_divergence":
        return math.log(2.0 * t_ratio / (1.0 + t_ratio))
    return (t_ratio ** (alpha - 1.0) - 1.0) / (alpha - 1.0)


def reference_formula(loss_type, pc, pr, rc, rr, lc, lr, nll, s: LossSettings,
                      f_kind="reverse_kl"):
    """One example's (loss, chosen reward, rejected reward), written from the papers. `nll` is
    this pair's NLL term (computed by the caller from the whole batch)."""
    beta, eps = s.beta, s.label_smoothing
    c, r = pc - rc, pr - rr
    fc, fr = f_score(f_kind, c), f_score(f_kind, r)
    z = beta * (fc - fr)
    dpo_rewards = beta * c, beta * r
    if loss_type == "simpo":
        chosen, rejected = beta * pc / lc, beta * pr / lr
        return softplus(-(chosen - rejected - s.simpo_gamma)), chosen, rejected
    if loss_type == "orpo":
        a, b = pc / lc, pr / lr  # log P of each response, per token
        log_odds = math.log(math.exp(a) / (1 - math.exp(a))) - math.log(
            math.exp(b) / (1 - math.exp(b)))
        return nll + s.orpo_alpha * softplus(-log_odds), s.orpo_alpha * a, s.orpo_alpha * b
    if loss_type in ("ipo", "sigmoid_norm"):
        per_token = beta * c / lc, beta * r / lr
        margin = fc / lc - fr / lr
        if loss_type == "ipo":
            return (margin - 0.5 / beta) ** 2, *per_token
        return softplus(-beta * margin), *per_token
    cdpo = (1 - eps) * softplus(-z) + eps * softplus(z)
    if loss_type == "sigmoid":
        loss = cdpo
    elif loss_type == "robust":
        loss = ((1 - eps) * softplus(-z) - eps * softplus(z)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        loss = max(0.0, 1.0 - z)
    elif loss_type == "rpo":
        loss = cdpo + s.rpo_alpha * nll
    elif loss_type == "cpo":  # no reference: the caller passes rc = rr = 0
        loss = cdpo + s.cpo_alpha * nll
    elif loss_type == "sft":
        loss = nll
    elif loss_type == "exo_pair":
        q = sigmoid(z)
        loss = q * math.log(q / (1 - eps)) + (1 - q) * math.log((1 - q) / eps)
    elif loss_type == "nca_pair":
        loss = softplus(-beta * c) + 0.5 * softplus(beta * c) + 0.5 * softplus(beta * r)
    elif loss_type == "bco_pair":
        loss = softplus(-beta * c) + softplus(beta * r)
    elif loss_type == "sppo_hard":
        loss = (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
    elif loss_type == "apo_zero":
        loss = (1 - sigmoid(beta * c)) + sigmoid(beta * r)
    elif loss_type == "apo_down":
        loss = sigmoid(beta * c) + (1 - sigmoid(beta * (c - r)))
    elif loss_type == "discopop":
        m = sigmoid(z / s.discopop_tau)
        loss = (1 - m) * softplus(-z) + m * math.exp(-z)
    return loss, *dpo_rewards


def independent_nll(pcs: list[float], lcs: list[int], normalization: str) -> list[float]:
    """Each pair's NLL term: its share of the pooled token mean (x B), or its own mean."""
    if normalization == "pairs":
        return [-pc / lc for pc, lc in zip(pcs, lcs, strict=True)]
    total_tokens = sum(lcs)  # sum over pairs of each pair's share is -sum(pcs) / total_tokens
    return [-pc * len(pcs) / total_tokens for pc in pcs]


def random_batch(seed: int, size: int = 48) -> dict[str, torch.Tensor]:
    """Summed log-probs of plausible size, references near the policy, lengths 1..30."""
    gen = torch.Generator().manual_seed(seed)
    lc = torch.randint(1, 31, (size,), generator=gen)
    lr = torch.randint(1, 31, (size,), generator=gen)
    pc = -lc * (0.2 + 2 * torch.rand(size, generator=gen, dtype=F64))
    pr = -lr * (0.2 + 2 * torch.rand(size, generator=gen, dtype=F64))
    rc = pc + 3 * torch.randn(size, generator=gen, dtype=F64)
    rr = pr + 3 * torch.randn(size, generator=gen, dtype=F64)
    return {"pc": pc, "pr": pr, "rc": rc, "rr": rr, "lc": lc, "lr": lr}


def settings_for(loss_type: str, **options) -> LossSettings:
    """Non-default settings for `loss_type`, so every option visibly enters the formula."""
    eps = {"exo_pair": 0.01}.get(loss_type, 0.15)
    uses_eps = loss_type in ("sigmoid", "robust", "rpo", "cpo", "exo_pair", "aot",
                             "aot_unpaired")
    values = dict(loss_type=loss_type, beta=2.5 if loss_type == "simpo" else 0.3,
                  label_smoothing=eps if uses_eps else 0.0, rpo_alpha=0.7, simpo_gamma=0.8,
                  discopop_tau=0.4, orpo_alpha=0.6, cpo_alpha=0.9)
    return LossSettings(**{**values, **options})


def call(settings: LossSettings, batch: dict, reference_free: bool = False, **kwargs):
    references = (None, None) if reference_free else (batch["rc"], batch["rr"])
    return preference_loss(settings, batch["pc"], batch["pr"], *references,
                           chosen_lengths=batch["lc"], rejected_lengths=batch["lr"], **kwargs)


# --- hand-worked values --------------------------------------------------------------------

def test_dpo_hand_worked_ln_4_3():
    """pc - rc = ln 3, pr - rr = 0, beta = 1: loss = -ln sigmoid(ln 3) = -ln(3/4) = ln(4/3).
    Rewards: beta * (pc - rc) = ln 3 and beta * (pr - rr) = 0.
    Then beta = 0.5 with pc - rc = ln 3, pr - rr = -ln 3: h = 2 ln 3, beta * h = ln 3 again,
    the same loss; rewards +-(ln 3)/2."""
    losses, chosen, rejected = dpo_loss(t(-10 + LN3), t(-12.0), t(-10.0), t(-12.0), beta=1.0)
    assert losses.item() == pytest.approx(math.log(4 / 3), abs=1e-12)
    assert chosen.item() == pytest.approx(LN3, abs=1e-12)
    assert rejected.item() == pytest.approx(0.0, abs=1e-12)

    losses, chosen, rejected = dpo_loss(t(-5 + LN3), t(-7 - LN3), t(-5.0), t(-7.0), beta=0.5)
    assert losses.item() == pytest.approx(math.log(4 / 3), abs=1e-12)
    assert chosen.item() == pytest.approx(0.5 * LN3, abs=1e-12)
    assert rejected.item() == pytest.approx(-0.5 * LN3, abs=1e-12)


def test_cdpo_hand_worked():
    """eps = 1/4, beta * h = ln 3: -(3/4) ln(3/4) - (1/4) ln(1/4) = (3/4) ln(4/3) + (1/4) ln 4
    ~ 0.5623 (more than plain DPO's 0.2877: the smoothed loss doubts the label)."""
    losses, _, _ = dpo_loss(t(LN3), t(0.0), t(0.0), t(0.0), beta=1.0, label_smoothing=0.25)
    expected = 0.75 * math.log(4 / 3) + 0.25 * math.log(4)
    assert losses.item() == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.562335, abs=1e-6)


def test_robust_hand_worked():
    """eps = 1/4, beta * h = ln 3: ((3/4) ln(4/3) - (1/4) ln 4) / (1/2) ~ -0.2616 (may be < 0)."""
    losses, _, _ = robust_loss(t(LN3), t(0.0), t(0.0), t(0.0), beta=1.0, label_smoothing=0.25)
    assert losses.item() == pytest.approx(1.5 * math.log(4 / 3) - 0.5 * math.log(4), abs=1e-12)
    assert losses.item() == pytest.approx(-0.261624, abs=1e-6)


def test_ipo_hand_worked():
    """beta = 0.5, so the target is 1/(2 beta) = 1. Chosen: pc - rc = 12 over 4 tokens = 3 per
    token; rejected: pr - rr = -2 over 2 tokens = -1 per token. h_norm = 4, loss = 3^2 = 9.
    Rewards are beta * per-token ratio: 1.5 and -0.5."""
    losses, chosen, rejected = ipo_loss(
        t(-8.0), t(-12.0), t(-20.0), t(-10.0), lengths(4), lengths(2), beta=0.5
    )
    assert losses.item() == pytest.approx(9.0, abs=1e-12)
    assert (chosen.item(), rejected.item()) == pytest.approx((1.5, -0.5), abs=1e-12)


def test_hinge_hand_worked():
    """beta = 0.5: h = 1 gives relu(1 - 0.5) = 0.5; h = 4 gives relu(1 - 2) = 0 with zero
    gradient (the pair is past the margin)."""
    policy_chosen = t(1.0, 4.0).requires_grad_()
    zeros = t(0.0, 0.0)
    losses, _, _ = hinge_loss(policy_chosen, zeros, zeros, zeros, beta=0.5)
    assert losses.tolist() == pytest.approx([0.5, 0.0], abs=1e-12)
    losses.sum().backward()
    assert policy_chosen.grad.tolist() == pytest.approx([-0.5, 0.0], abs=1e-12)


def test_rpo_hand_worked():
    """beta = 1, h = ln 3, rpo_alpha = 0.5, pc = -6 over 3 tokens (NLL 2 per token):
    ln(4/3) + 0.5 * 2 ~ 1.2877. Rewards are DPO's: pc - rc = ln 3, pr - rr = 0."""
    losses, chosen, rejected = rpo_loss(
        t(-6.0), t(-9.0), t(-6.0 - LN3), t(-9.0), lengths(3), beta=1.0, rpo_alpha=0.5
    )
    assert losses.item() == pytest.approx(math.log(4 / 3) + 1.0, abs=1e-12)
    assert (chosen.item(), rejected.item()) == pytest.approx((LN3, 0.0), abs=1e-12)


def test_simpo_hand_worked():
    """beta = 2, gamma = 0.5. pc = -4 over 4 tokens (-1 per token), pr = -5 over 4 tokens
    (-1.25 per token): 2 * (-1 + 1.25) - 0.5 = 0, so the loss is ln 2 - the reward margin
    sits exactly at gamma. Rewards 2 * -1 = -2 and 2 * -1.25 = -2.5. A pr of -3 (-0.75 per
    token, the rejected reply is likelier) gives 2 * -0.25 - 0.5 = -1: loss ln(1 + e)."""
    losses, chosen, rejected = simpo_loss(
        t(-4.0, -4.0), t(-5.0, -3.0), lengths(4, 4), lengths(4, 4), beta=2.0, simpo_gamma=0.5
    )
    assert losses.tolist() == pytest.approx([math.log(2), math.log1p(math.e)], abs=1e-12)
    assert chosen.tolist() == pytest.approx([-2.0, -2.0], abs=1e-12)
    assert rejected.tolist() == pytest.approx([-2.5, -1.5], abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("beta", [0.01, 0.1, 3.0])
def test_policy_equal_to_reference_gives_exactly_ln2(dtype, beta):
    """h = 0 exactly, so -log sigmoid(0) = ln 2, rounded once to the dtype, for any beta."""
    logps = -torch.rand(8, generator=torch.Generator().manual_seed(0)) * 50
    chosen, rejected = logps.to(dtype), (logps - 3).to(dtype)
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, chosen, rejected, beta)
    assert torch.equal(losses, torch.full_like(losses, math.log(2)))
    assert torch.equal(chosen_rewards, torch.zeros_like(chosen_rewards))
    assert torch.equal(rejected_rewards, torch.zeros_like(rejected_rewards))


# --- float64 random inputs against the independent formulas ---------------------------------

PER_PAIR_LOSSES = tuple(n for n in LOSS_TYPES if n not in ("aot", "aot_unpaired"))


def expected_columns(settings: LossSettings, batch: dict, reference_free: bool,
                     f_kind: str = "reverse_kl"):
    columns = {k: batch[k].tolist() for k in batch}
    nll = independent_nll(columns["pc"], columns["lc"], settings.nll_normalization)
    rows = [
        reference_formula(settings.loss_type, pc, pr, 0.0 if reference_free else rc,
                          0.0 if reference_free else rr, lc, lr, n, settings, f_kind)
        for pc, pr, rc, rr, lc, lr, n in zip(*columns.values(), nll, strict=True)
    ]
    return tuple(t(*column) for column in zip(*rows, strict=True))


@pytest.mark.parametrize(
    ("loss_type", "reference_free", "nll_normalization"),
    [(loss, free, norm) for loss in PER_PAIR_LOSSES for free in (False, True)
     for norm in ("tokens", "pairs")
     if (loss not in REFERENCE_FREE_LOSSES or free)
     and (norm == "tokens" or loss in ("rpo", "sft", "cpo", "orpo"))],
)
def test_losses_match_independent_float64_formula(loss_type, reference_free, nll_normalization):
    batch = random_batch(seed=LOSS_TYPES.index(loss_type))
    settings = settings_for(loss_type, nll_normalization=nll_normalization)
    losses, chosen, rejected, components = call(settings, batch, reference_free)
    expected_losses, expected_chosen, expected_rejected = expected_columns(
        settings, batch, reference_free)
    assert losses.dtype == F64 and losses.shape == (48,) and components == {}
    torch.testing.assert_close(losses, expected_losses, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chosen, expected_chosen, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rejected, expected_rejected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("f_kind", F_DIVERGENCE_TYPES)
@pytest.mark.parametrize("loss_type", ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair",
                                       "robust", "discopop", "rpo", "sft"])
def test_f_divergence_losses_match_independent_formula(loss_type, f_kind):
    """Scores f'(pi/pi_ref) replace the log-ratios; rewards stay beta * log-ratio. Log-ratios
    are kept moderate (|u| < 3) so the float formula is exact enough."""
    batch = random_batch(seed=20 + LOSS_TYPES.index(loss_type), size=24)
    batch["rc"] = batch["pc"] + torch.linspace(-2.5, 2.5, 24, dtype=F64)
    batch["rr"] = batch["pr"] + torch.linspace(2.0, -2.0, 24, dtype=F64)
    settings = settings_for(loss_type, f_divergence_type=f_kind, f_alpha_divergence_coef=0.5)
    losses, chosen, rejected, _ = call(settings, batch)
    expected = expected_columns(settings, batch, False, f_kind)
    for got, want in zip((losses, chosen, rejected), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)


def test_f_divergence_scores_hand_worked_and_limits():
    """u = ln 2 (t = 2): forward_kl 1 - 1/2 = 1/2; js ln(4/3); alpha 1/2: (2^-1/2 - 1)/(-1/2)
    = 2 - sqrt 2. Every score is 0 at u = 0; alpha -> 1 is reverse_kl; alpha = 0 is
    forward_kl."""
    u = t(math.log(2.0), 0.0)
    cases = {("forward_kl", 0.5): 0.5, ("js_divergence", 0.5): math.log(4 / 3),
             ("alpha_divergence", 0.5): 2 - math.sqrt(2), ("reverse_kl", 0.5): math.log(2.0),
             ("alpha_divergence", 1.0): math.log(2.0), ("alpha_divergence", 0.0): 0.5}
    for (kind, alpha), value in cases.items():
        scores = FDivergence(kind, alpha).scores(u)
        assert scores.tolist() == pytest.approx([value, 0.0], abs=1e-12), kind


def test_alpha_divergence_is_clamped_like_trl_and_stays_finite():
    """(alpha - 1) u is clamped at 80 in float32: beyond it the score is constant."""
    u = torch.tensor([-1000.0, -200.0, 0.0], requires_grad=True)
    scores = FDivergence("alpha_divergence", 0.5).scores(u)
    assert torch.isfinite(scores).all()
    assert scores[0].item() == scores[1].item() == pytest.approx(-2 * math.expm1(80.0), rel=1e-6)
    scores.sum().backward()
    assert u.grad.tolist()[:2] == [0.0, 0.0] and u.grad[2].item() == pytest.approx(1.0)


# --- batch-wide losses: aot sorting, pooled NLL ----------------------------------------------

@pytest.mark.parametrize("paired", [True, False])
def test_aot_matches_sorted_quantiles(paired):
    batch = random_batch(seed=30, size=16)
    beta, eps = 0.3, 0.1
    losses, chosen, rejected = aot_loss(batch["pc"], batch["pr"], batch["rc"], batch["rr"],
                                        beta, eps, paired=paired)
    pc, pr, rc, rr = (batch[k].tolist() for k in ("pc", "pr", "rc", "rr"))
    if paired:
        left = sorted(a - b for a, b in zip(pc, pr, strict=True))
        right = sorted(a - b for a, b in zip(rc, rr, strict=True))
    else:
        left = sorted(a - b for a, b in zip(pc, rc, strict=True))
        right = sorted(a - b for a, b in zip(pr, rr, strict=True))
    expected = [(1 - eps) * softplus(-beta * (x - y)) + eps * softplus(beta * (x - y))
                for x, y in zip(left, right, strict=True)]
    torch.testing.assert_close(losses, t(*expected), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chosen, beta * (batch["pc"] - batch["rc"]))
    torch.testing.assert_close(rejected, beta * (batch["pr"] - batch["rr"]))


def test_aot_hand_worked():
    """beta = ln 3: pc - pr = (2, 0), rc - rr = (0, 1): sorted (0, 2) - (0, 1) = (0, 1):
    losses (ln 2, ln(4/3)). Pair by pair, DPO would compare h = 2 and -1."""
    losses, _, _ = aot_loss(t(2.0, 0.0), t(0.0, 0.0), t(0.0, 1.0), t(0.0, 0.0), beta=LN3)
    assert losses.tolist() == pytest.approx([math.log(2), math.log(4 / 3)], abs=1e-12)


@pytest.mark.parametrize("paired", [True, False])
def test_aot_is_permutation_invariant_and_is_dpo_for_one_pair(paired):
    batch = random_batch(seed=31, size=12)
    args = [batch[k] for k in ("pc", "pr", "rc", "rr")]
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    losses, _, _ = aot_loss(*args, beta=0.2, paired=paired)
    shuffled, _, _ = aot_loss(*(a[order] for a in args), beta=0.2, paired=paired)
    torch.testing.assert_close(losses, shuffled)  # quantile order: the same list
    one = [a[:1] for a in args]
    torch.testing.assert_close(aot_loss(*one, beta=0.2, paired=paired)[0],
                               dpo_loss(*one, beta=0.2)[0], rtol=1e-12, atol=1e-12)


def test_chosen_nll_hand_worked():
    """pc = (-6, -1), lc = (3, 1): pooled 7 / 4 tokens = 1.75 (terms 6 * 2/4 = 3 and 0.5);
    per pair (2 + 1) / 2 = 1.5."""
    tokens = chosen_nll(t(-6.0, -1.0), lengths(3, 1), "tokens")
    pairs = chosen_nll(t(-6.0, -1.0), lengths(3, 1), "pairs")
    assert tokens.tolist() == pytest.approx([3.0, 0.5], abs=1e-12)
    assert tokens.mean().item() == pytest.approx(1.75, abs=1e-12)
    assert pairs.tolist() == pytest.approx([2.0, 1.0], abs=1e-12)
    with pytest.raises(ValueError, match="--nll_normalization 'sum'"):
        chosen_nll(t(-6.0), lengths(3), "sum")


def test_pooled_nll_gradient_is_that_of_the_token_mean():
    """d mean(terms) / d pc_i = -1 / sum(lc): every token weighs the same."""
    pc = t(-6.0, -1.0, -4.0).requires_grad_()
    chosen_nll(pc, lengths(3, 1, 4)).mean().backward()
    assert pc.grad.tolist() == pytest.approx([-1 / 8] * 3, abs=1e-15)


# --- hand-worked values of the trl family --------------------------------------------------

def test_sigmoid_norm_hand_worked():
    """beta = 1, c = 3 ln 3 over 3 tokens (ln 3 per token), r = 0: -log sigmoid(ln 3) =
    ln(4/3); rewards per token: ln 3 and 0."""
    losses, chosen, rejected = sigmoid_norm_loss(t(3 * LN3), t(-5.0), t(0.0), t(-5.0),
                                                 lengths(3), lengths(2), beta=1.0)
    assert losses.item() == pytest.approx(math.log(4 / 3), abs=1e-12)
    assert (chosen.item(), rejected.item()) == pytest.approx((LN3, 0.0), abs=1e-12)


def test_exo_pair_hand_worked():
    """eps = 1/4: at z = ln 3 the model's preference (3/4, 1/4) is the smoothed label: KL 0.
    At z = 0: (1/2) ln((1/2)/(3/4)) + (1/2) ln((1/2)/(1/4)) = (1/2) ln(4/3)."""
    losses, _, _ = exo_pair_loss(t(LN3, 0.0), t(0.0, 0.0), t(0.0, 0.0), t(0.0, 0.0),
                                 beta=1.0, label_smoothing=0.25)
    assert losses.tolist() == pytest.approx([0.0, 0.5 * math.log(4 / 3)], abs=1e-12)
    with pytest.raises(ValueError, match="label_smoothing in \\(0, 1\\)"):
        exo_pair_loss(t(0.0), t(0.0), t(0.0), t(0.0), beta=1.0, label_smoothing=0.0)


def test_nca_and_bco_pair_hand_worked():
    """beta c = ln 3, beta r = -ln 3. NCA: ln(4/3) + (1/2) ln 4 + (1/2) ln(4/3);
    BCO: 2 ln(4/3). Both 2 ln 2 at c = r = 0."""
    args = (t(LN3, 0.0), t(-LN3, 0.0), t(0.0, 0.0), t(0.0, 0.0))
    nca, _, _ = nca_pair_loss(*args, beta=1.0)
    bco, _, _ = bco_pair_loss(*args, beta=1.0)
    ln2 = math.log(2)
    assert nca.tolist() == pytest.approx([1.5 * math.log(4 / 3) + ln2, 2 * ln2], abs=1e-12)
    assert bco.tolist() == pytest.approx([2 * math.log(4 / 3), 2 * ln2], abs=1e-12)


def test_sppo_hard_hand_worked():
    """beta = 1/2 (targets +-1): c = 3, r = -2: (3 - 1)^2 + (-2 + 1)^2 = 5. At c = r = 0 and
    beta = 0.1: 2 * 5^2 = 50."""
    losses, chosen, rejected = sppo_hard_loss(t(3.0), t(-2.0), t(0.0), t(0.0), beta=0.5)
    assert losses.item() == pytest.approx(5.0, abs=1e-12)
    assert (chosen.item(), rejected.item()) == pytest.approx((1.5, -1.0), abs=1e-12)
    zero, _, _ = sppo_hard_loss(t(-4.0), t(-5.0), t(-4.0), t(-5.0), beta=0.1)
    assert zero.item() == pytest.approx(50.0, abs=1e-10)


def test_apo_hand_worked():
    """apo_zero at beta c = ln 3, beta r = -ln 3: 1/4 + 1/4; apo_down at beta c = 0,
    beta r = -ln 3: 1/2 + (1 - 3/4). Both 1 at c = r = 0."""
    zero, _, _ = apo_loss(t(LN3, 0.0), t(-LN3, 0.0), t(0.0, 0.0), t(0.0, 0.0), beta=1.0)
    down, _, _ = apo_loss(t(0.0, 0.0), t(-LN3, 0.0), t(0.0, 0.0), t(0.0, 0.0), beta=1.0,
                          anchor="down")
    assert zero.tolist() == pytest.approx([0.5, 1.0], abs=1e-12)
    assert down.tolist() == pytest.approx([0.75, 1.0], abs=1e-12)


def test_discopop_hand_worked_and_stable():
    """tau = 1, x = ln 3: m = 3/4, (1/4) ln(4/3) + (3/4)(1/3). x = 0: (ln 2 + 1) / 2.
    x = -1e4 (tau 0.05): exp(1e4) * sigmoid(-2e5) is inf * 0 written naively; the loss is
    the logistic part, 1e4, with a finite gradient."""
    losses, _, _ = discopop_loss(t(LN3, 0.0), t(0.0, 0.0), t(0.0, 0.0), t(0.0, 0.0), beta=1.0,
                                 discopop_tau=1.0)
    assert losses.tolist() == pytest.approx(
        [0.25 * math.log(4 / 3) + 0.25, (math.log(2) + 1) / 2], abs=1e-12)
    pc = torch.tensor([-1e4], requires_grad=True)
    zero = torch.zeros(1)
    huge, _, _ = discopop_loss(pc, zero, zero, zero, beta=1.0, discopop_tau=0.05)
    huge.sum().backward()
    assert huge.item() == pytest.approx(1e4, rel=1e-6)
    assert pc.grad.item() == pytest.approx(-1.0, rel=1e-6)


def test_sft_hand_worked():
    """pc = (-6, -2), lc = (3, 1): 8 / 4 = 2 per token; per-pair terms (3, 1)."""
    losses, chosen, _ = sft_loss(t(-6.0, -2.0), t(-1.0, -1.0), None, None, lengths(3, 1),
                                 beta=0.5)
    assert losses.tolist() == pytest.approx([3.0, 1.0], abs=1e-12)
    assert chosen.tolist() == pytest.approx([-3.0, -1.0], abs=1e-12)


def test_orpo_hand_worked():
    """Per-token log P: a = ln(1/2) (odds 1), b = ln(1/4) (odds 1/3): log OR = ln 3, the term
    -log sigmoid(ln 3) = ln(4/3). pc = 2 ln(1/2) over 2 tokens: NLL ln 2. alpha = 1/2:
    ln 2 + ln(4/3) / 2. Rewards alpha * a, alpha * b."""
    losses, chosen, rejected = orpo_loss(t(2 * math.log(0.5)), t(3 * math.log(0.25)),
                                         lengths(2), lengths(3), orpo_alpha=0.5)
    assert losses.item() == pytest.approx(math.log(2) + 0.5 * math.log(4 / 3), abs=1e-12)
    assert (chosen.item(), rejected.item()) == pytest.approx(
        (0.5 * math.log(0.5), 0.5 * math.log(0.25)), abs=1e-12)


def test_cpo_hand_worked_is_reference_free_rpo():
    """beta = 1, pc - pr = ln 3, pc = -6 over 3 tokens, cpo_alpha = 1: ln(4/3) + 2.
    Rewards beta * pc, beta * pr."""
    losses, chosen, rejected = cpo_loss(t(-6.0), t(-6.0 - LN3), lengths(3), beta=1.0)
    assert losses.item() == pytest.approx(math.log(4 / 3) + 2.0, abs=1e-12)
    assert (chosen.item(), rejected.item()) == pytest.approx((-6.0, -6.0 - LN3), abs=1e-12)


# --- mixtures --------------------------------------------------------------------------------

def test_mixture_is_the_weighted_sum_with_unweighted_components():
    """MPO: 0.8 sigmoid + 0.2 bco_pair + 1.0 sft; rewards are the first loss type's."""
    batch = random_batch(seed=40, size=10)
    mixture = LossSettings(loss_type="sigmoid,bco_pair,sft", loss_weights="0.8,0.2,1.0",
                           beta=0.2)
    losses, chosen, rejected, components = call(mixture, batch)
    parts = {name: call(LossSettings(loss_type=name, beta=0.2), batch)
             for name in ("sigmoid", "bco_pair", "sft")}
    assert list(components) == ["sigmoid", "bco_pair", "sft"]
    for name, part in parts.items():
        torch.testing.assert_close(components[name], part.losses, rtol=0, atol=0)
        assert not components[name].requires_grad
    torch.testing.assert_close(losses, 0.8 * parts["sigmoid"].losses
                               + 0.2 * parts["bco_pair"].losses + parts["sft"].losses)
    assert torch.equal(chosen, parts["sigmoid"].chosen_rewards)
    assert torch.equal(rejected, parts["sigmoid"].rejected_rewards)
    metrics = preference_metrics(losses, chosen, rejected, batch["pc"], batch["pr"],
                                 **{f"loss/{k}": v for k, v in components.items()})
    for name in ("sigmoid", "bco_pair", "sft"):
        assert metrics[f"loss/{name}"].item() == pytest.approx(
            parts[name].losses.mean().item(), rel=1e-6)


def test_rpo_is_sigmoid_plus_weighted_sft():
    """trl 1.16 writes RPO as loss_type [sigmoid, sft] with weights [1, rpo_alpha]."""
    batch = random_batch(seed=41, size=10)
    rpo = call(LossSettings(loss_type="rpo", rpo_alpha=0.7), batch)
    mix = call(LossSettings(loss_type="sigmoid,sft", loss_weights="1,0.7"), batch)
    torch.testing.assert_close(rpo.losses, mix.losses, rtol=1e-13, atol=1e-13)


# --- gradients -------------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_dpo_gradient_matches_closed_form(eps):
    """With z = beta * h: dL/dpc = beta * (-(1 - eps) sigmoid(-z) + eps sigmoid(z)),
    dL/dpr = -dL/dpc, and the references get the opposite signs."""
    batch = random_batch(seed=7)
    beta = 0.4
    inputs = [batch[k].clone().requires_grad_() for k in ("pc", "pr", "rc", "rr")]
    losses, _, _ = dpo_loss(*inputs, beta=beta, label_smoothing=eps)
    losses.sum().backward()
    z = beta * ((batch["pc"] - batch["rc"]) - (batch["pr"] - batch["rr"]))
    d_chosen = beta * (-(1 - eps) * torch.sigmoid(-z) + eps * torch.sigmoid(z))
    for tensor, sign in zip(inputs, (1, -1, -1, 1), strict=True):
        torch.testing.assert_close(tensor.grad, sign * d_chosen, rtol=1e-12, atol=1e-14)


def test_ipo_gradient_matches_closed_form():
    """dL/dpc = 2 (h_norm - 1/(2 beta)) / lc and dL/dpr = -2 (h_norm - 1/(2 beta)) / lr."""
    batch = random_batch(seed=8)
    beta = 0.2
    pc, pr = batch["pc"].clone().requires_grad_(), batch["pr"].clone().requires_grad_()
    losses, _, _ = ipo_loss(pc, pr, batch["rc"], batch["rr"], batch["lc"], batch["lr"], beta)
    losses.sum().backward()
    h_norm = (batch["pc"] - batch["rc"]) / batch["lc"] - (batch["pr"] - batch["rr"]) / batch["lr"]
    residual = 2 * (h_norm - 1 / (2 * beta))
    torch.testing.assert_close(pc.grad, residual / batch["lc"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(pr.grad, -residual / batch["lr"], rtol=1e-12, atol=1e-14)


# --- properties from the papers --------------------------------------------------------------

@pytest.mark.parametrize("eps", [0.05, 0.2, 0.4])
def test_cdpo_stops_pushing_at_log_odds_of_the_label(eps):
    """cDPO's loss in z = beta * h is minimal at z* = ln((1 - eps) / eps): the gradient is zero
    there, negative below (keep pushing) and positive above (pull back). Plain DPO never stops."""
    z_star = math.log((1 - eps) / eps)
    margins = t(z_star - 1, z_star, z_star + 1).requires_grad_()
    zeros = torch.zeros(3, dtype=F64)
    losses, _, _ = dpo_loss(margins, zeros, zeros, zeros, beta=1.0, label_smoothing=eps)
    losses.sum().backward()
    below, at, above = margins.grad.tolist()
    assert below < 0 < above
    assert at == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("eps", [0.1, 0.3, 0.45])
def test_robust_loss_is_unbiased_under_label_flips(eps):
    """Chowdhury et al.: if each label is flipped with probability eps, the expected robust loss
    equals the clean DPO loss: (1 - eps) * L(chosen, rejected) + eps * L(rejected, chosen)."""
    batch = random_batch(seed=3)
    beta = 0.5
    kept, _, _ = robust_loss(batch["pc"], batch["pr"], batch["rc"], batch["rr"], beta, eps)
    flipped, _, _ = robust_loss(batch["pr"], batch["pc"], batch["rr"], batch["rc"], beta, eps)
    clean, _, _ = dpo_loss(batch["pc"], batch["pr"], batch["rc"], batch["rr"], beta)
    torch.testing.assert_close((1 - eps) * kept + eps * flipped, clean, rtol=1e-10, atol=1e-12)


def test_ipo_is_zero_at_target_and_invariant_to_length_scaling():
    """Loss 0 when h_norm = 1/(2 beta); doubling every log-prob and every length (the same
    per-token behaviour over a response twice as long) leaves the loss unchanged."""
    beta = 0.25  # target 2
    losses, _, _ = ipo_loss(t(3.0), t(-2.0), t(0.0), t(0.0), lengths(3), lengths(2), beta)
    assert losses.item() == 0.0
    batch = random_batch(seed=5)
    args = [batch[k] for k in ("pc", "pr", "rc", "rr", "lc", "lr")]
    once, _, _ = ipo_loss(*args, beta=beta)
    twice, _, _ = ipo_loss(*(2 * a for a in args), beta=beta)
    torch.testing.assert_close(once, twice, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("normalization", ["tokens", "pairs"])
def test_rpo_is_dpo_plus_nll_of_chosen(normalization):
    batch = random_batch(seed=4)
    args = [batch[k] for k in ("pc", "pr", "rc", "rr")]
    dpo, dpo_chosen, dpo_rejected = dpo_loss(*args, beta=0.1, label_smoothing=0.1)
    rpo, rpo_chosen, rpo_rejected = rpo_loss(
        *args, batch["lc"], beta=0.1, label_smoothing=0.1, rpo_alpha=2.0,
        nll_normalization=normalization,
    )
    if normalization == "pairs":
        torch.testing.assert_close(rpo - dpo, -2.0 * batch["pc"] / batch["lc"])
    else:  # its mean is 2 x the chosen NLL pooled over every token of the batch
        torch.testing.assert_close((rpo - dpo).mean(), -2.0 * batch["pc"].sum()
                                   / batch["lc"].sum())
    assert torch.equal(rpo_chosen, dpo_chosen) and torch.equal(rpo_rejected, dpo_rejected)


# --- numerical stability ---------------------------------------------------------------------

@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_huge_margins_stay_finite_with_finite_gradients(loss_type):
    """|h| ~ 1e4 in float32 (log(sigmoid(-1e4)) would be log(0) = -inf); log-probs <= 0."""
    pc = torch.tensor([-0.5, -1e4, -1.0]).requires_grad_()
    pr = torch.tensor([-1e4, -0.5, -1.0]).requires_grad_()
    zeros = torch.zeros(3)
    free = loss_type in REFERENCE_FREE_LOSSES
    settings = settings_for(loss_type, beta=1.0)
    losses, chosen, rejected, _ = preference_loss(
        settings, pc, pr, *((None, None) if free else (zeros, zeros)),
        chosen_lengths=lengths(1, 1, 1), rejected_lengths=lengths(1, 1, 1))
    losses.sum().backward()
    # sft does not depend on the rejected response: no gradient reaches pr.
    assert (pr.grad is None) == (loss_type == "sft")
    for tensor in (losses, chosen, rejected, pc.grad, pr.grad):
        assert tensor is None or torch.isfinite(tensor).all(), (loss_type, tensor)


def test_dpo_huge_margins_exact_values():
    """beta * h = +2e4: loss 0, gradient 0. beta * h = -2e4: loss 2e4, dL/dpc = -beta.
    With eps = 0.1 the confident-and-right pair costs eps * 2e4 (cDPO penalises overconfidence)."""
    pc = torch.tensor([1e4, -1e4]).requires_grad_()
    pr = torch.tensor([-1e4, 1e4])
    zeros = torch.zeros(2)
    losses, _, _ = dpo_loss(pc, pr, zeros, zeros, beta=1.0)
    losses.sum().backward()
    assert losses.tolist() == [0.0, 2e4]
    assert pc.grad.tolist() == [0.0, -1.0]
    smoothed, _, _ = dpo_loss(pc, pr, zeros, zeros, beta=1.0, label_smoothing=0.1)
    assert smoothed.tolist() == pytest.approx([0.1 * 2e4, 0.9 * 2e4], rel=1e-6)


# --- rewards, reference-free, dispatcher -----------------------------------------------------

@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_rewards_are_detached_and_losses_are_not(loss_type):
    batch = random_batch(seed=11, size=4)
    batch["pc"] = batch["pc"].clone().requires_grad_()
    batch["pr"] = batch["pr"].clone().requires_grad_()
    terms = call(settings_for(loss_type), batch, loss_type in REFERENCE_FREE_LOSSES)
    assert terms.losses.requires_grad
    assert not terms.chosen_rewards.requires_grad and not terms.rejected_rewards.requires_grad


@pytest.mark.parametrize("loss_type", [n for n in LOSS_TYPES if n not in REFERENCE_FREE_LOSSES])
def test_reference_free_equals_zero_reference(loss_type):
    batch = random_batch(seed=12)
    batch["rc"], batch["rr"] = torch.zeros_like(batch["pc"]), torch.zeros_like(batch["pr"])
    free = call(settings_for(loss_type), batch, reference_free=True)
    zero_ref = call(settings_for(loss_type), batch)
    for a, b in zip(free[:3], zero_ref[:3], strict=True):
        assert torch.equal(a, b)


def test_preference_loss_rejects_bad_calls():
    x = t(-1.0, -2.0)
    ok = dict(chosen_lengths=lengths(1, 2), rejected_lengths=lengths(1, 2))
    sigmoid = LossSettings()
    for name in REFERENCE_FREE_LOSSES:
        with pytest.raises(ValueError, match=f"{name} is reference-free"):
            preference_loss(LossSettings(loss_type=name), x, x, x, x, **ok)
    with pytest.raises(ValueError, match="both reference log-probs"):
        preference_loss(sigmoid, x, x, x, None, **ok)
    with pytest.raises(ValueError, match="unknown --loss_type 'kto'"):
        preference_loss(LossSettings(loss_type="kto"), x, x, x, x, **ok)
    with pytest.raises(ValueError, match=r"one shape \[B\]"):
        preference_loss(sigmoid, x, t(-1.0), x, x, **ok)
    with pytest.raises(ValueError, match=r"one shape \[B\]"):
        rows = x[None]  # [1, 2]: a 2-D batch is not per-example log-probs
        preference_loss(sigmoid, rows, rows, rows, rows, chosen_lengths=lengths(1, 2)[None],
                        rejected_lengths=lengths(1, 2)[None])
    for name in ("ipo", "sft", "sigmoid_norm"):
        with pytest.raises(ValueError, match="lengths must be >= 1"):
            preference_loss(LossSettings(loss_type=name), x, x, x, x,
                            chosen_lengths=lengths(0, 2), rejected_lengths=lengths(1, 2))
    with pytest.raises(ValueError, match="no effect with --loss_type hinge"):
        preference_loss(LossSettings(loss_type="hinge", label_smoothing=0.1), x, x, x, x, **ok)


# --- metrics ---------------------------------------------------------------------------------

def test_preference_metrics_values_and_strict_accuracy():
    """Pairs: 1 > 0 right; 2 = 2 a tie, counted wrong; 3 < 4 wrong; 1 > -1 right: accuracy 0.5.
    Margins: mean(1, 0, -1, 2) = 0.5."""
    losses = t(0.5, 1.0, 1.5, 2.0).requires_grad_()
    chosen, rejected = t(1.0, 2.0, 3.0, 1.0), t(0.0, 2.0, 4.0, -1.0)
    metrics = preference_metrics(losses, chosen, rejected, t(-10.0, -20.0, -30.0, -40.0),
                                 t(-1.0, -2.0, -3.0, -4.0))
    assert set(metrics) == {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                            "rewards/margins", "logps/chosen", "logps/rejected"}
    expected = {"loss": 1.25, "rewards/chosen": 1.75, "rewards/rejected": 1.25,
                "rewards/accuracies": 0.5, "rewards/margins": 0.5, "logps/chosen": -25.0,
                "logps/rejected": -2.5}
    for name, value in metrics.items():
        assert value.dim() == 0 and not value.requires_grad and value.dtype == torch.float32
        assert value.item() == pytest.approx(expected[name], abs=1e-6), name


# --- option validation -----------------------------------------------------------------------

@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"loss_type": "kto"}, "unknown --loss_type 'kto'"),
        ({"loss_type": "sigmoid,kto"}, "unknown --loss_type 'kto'"),
        ({"loss_type": "sigmoid,sigmoid"}, "--loss_type sigmoid,sigmoid names a loss twice"),
        ({"beta": 0.0}, "--beta must be a finite number > 0"),
        ({"beta": -0.1}, "--beta must be a finite number > 0"),
        ({"beta": math.nan}, "--beta must be a finite number > 0"),
        ({"label_smoothing": 0.5}, r"--label_smoothing must be in \[0, 0.5\)"),
        ({"loss_type": "robust", "label_smoothing": -0.1},
         r"--label_smoothing must be in \[0, 0.5\)"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "no effect with --loss_type ipo"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, "no effect with --loss_type hinge"),
        ({"loss_type": "simpo", "label_smoothing": 0.1}, "no effect with --loss_type simpo"),
        ({"loss_type": "bco_pair,sft", "label_smoothing": 0.1},
         "no effect with --loss_type bco_pair,sft"),
        ({"loss_type": "exo_pair"}, "--loss_type exo_pair needs --label_smoothing > 0"),
        ({"loss_type": "sigmoid,exo_pair", "label_smoothing": 0.0},
         "--loss_type exo_pair needs --label_smoothing > 0"),
        ({"loss_type": "rpo", "rpo_alpha": -1.0}, "--rpo_alpha must be a finite number >= 0"),
        ({"loss_type": "simpo", "simpo_gamma": -0.5}, "--simpo_gamma must be a finite number"),
        ({"loss_type": "simpo", "simpo_gamma": math.inf}, "--simpo_gamma must be a finite"),
        ({"loss_type": "discopop", "discopop_tau": 0.0}, "--discopop_tau must be a finite "
                                                          "number > 0"),
        ({"loss_type": "orpo", "orpo_alpha": -0.1}, "--orpo_alpha must be a finite number"),
        ({"loss_type": "cpo", "cpo_alpha": math.nan}, "--cpo_alpha must be a finite number"),
        ({"loss_type": "sigmoid,sft", "loss_weights": "1"},
         "--loss_weights gives 1 weights for 2 loss types"),
        ({"loss_type": "sigmoid", "loss_weights": "1,2"},
         "--loss_weights gives 2 weights for 1 loss types"),
        ({"loss_type": "sigmoid,sft", "loss_weights": "1,x"},
         "--loss_weights '1,x' is not a comma-separated list of numbers"),
        ({"loss_type": "sigmoid,sft", "loss_weights": "1,-1"},
         "each of --loss_weights must be a finite number >= 0"),
        ({"f_divergence_type": "hellinger"}, "unknown --f_divergence_type 'hellinger'"),
        ({"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": math.inf},
         "--f_alpha_divergence_coef must be finite"),
        ({"loss_type": "sigmoid,bco_pair", "f_divergence_type": "js_divergence"},
         "--f_divergence_type js_divergence does not apply to --loss_type bco_pair"),
        ({"loss_type": "aot", "f_divergence_type": "forward_kl"},
         "does not apply to --loss_type aot"),
        ({"nll_normalization": "sum"}, "unknown --nll_normalization 'sum'"),
        ({"loss_type": "sigmoid,simpo"},
         "--loss_type sigmoid,simpo mixes the reference-free simpo with losses that use a "
         "reference model: add --reference_free"),
        ({"loss_type": "orpo,bco_pair"}, "mixes the reference-free orpo"),
        ({"loss_type": "simpo", "precompute_ref_log_probs": True},
         "--loss_type simpo uses no reference model: drop --precompute_ref_log_probs"),
        ({"loss_type": "cpo,sft", "precompute_ref_log_probs": True},
         "--loss_type cpo,sft uses no reference model"),
        ({"reference_free": True, "precompute_ref_log_probs": True},
         "--reference_free uses no reference model"),
    ],
)
def test_validate_loss_options_rejects(options, message):
    options = dict(options)
    flags = {"reference_free": options.pop("reference_free", False),
             "precompute_ref_log_probs": options.pop("precompute_ref_log_probs", False)}
    with pytest.raises(ValueError, match=message):
        validate_loss_options(LossSettings(**options), **flags)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_validate_loss_options_accepts_defaults_and_sensible_combinations(loss_type):
    eps = 1e-3 if loss_type == "exo_pair" else 0.0
    validate_loss_options(LossSettings(loss_type=loss_type, label_smoothing=eps),
                          reference_free=False)
    validate_loss_options(LossSettings(loss_type=loss_type, beta=2.0, rpo_alpha=0.0,
                                       simpo_gamma=0.0, label_smoothing=eps),
                          reference_free=True)
    if loss_type in ("sigmoid", "robust", "rpo", "exo_pair", "aot", "aot_unpaired"):
        validate_loss_options(LossSettings(loss_type=loss_type, label_smoothing=0.49),
                              reference_free=False, precompute_ref_log_probs=True)


def test_validate_accepts_mixtures_trl_users_write():
    for settings, reference_free in [
        (LossSettings(loss_type="sigmoid,bco_pair,sft", loss_weights="0.8,0.2,1.0"), False),
        (LossSettings(loss_type="sigmoid, sft", loss_weights="1, 0.5"), False),
        (LossSettings(loss_type="simpo,sft"), False),  # sft mixes with anything
        (LossSettings(loss_type="sigmoid,simpo"), True),
        (LossSettings(loss_type="ipo,sft", f_divergence_type="alpha_divergence"), False),
    ]:
        validate_loss_options(settings, reference_free=reference_free)
    assert LossSettings(loss_type="sigmoid, sft", loss_weights="1, 0.5").weights == (1.0, 0.5)
    as_lists = LossSettings(loss_type=["sigmoid", "sft"], loss_weights=[1, 0.5])  # trl's form
    assert (as_lists.loss_types, as_lists.weights) == (("sigmoid", "sft"), (1.0, 0.5))
    assert not LossSettings(loss_type="cpo,sft").needs_reference
    assert LossSettings(loss_type="simpo,sigmoid").needs_reference
