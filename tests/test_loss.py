"""The preference losses against hand-worked values, independent float64 formulas, closed-form
gradients and the properties their papers state.

Hand-worked values use h = (pc - rc) - (pr - rr); sigmoid(ln 3) = 3/4, so with beta * h = ln 3
the DPO loss is -ln(3/4) = ln(4/3).
"""

from __future__ import annotations

import math

import pytest
import torch

from dpo_core.loss import (
    LOSS_TYPES,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    preference_loss,
    preference_metrics,
    robust_loss,
    rpo_loss,
    simpo_loss,
    validate_loss_options,
)

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


def reference_formula(loss_type, pc, pr, rc, rr, lc, lr, beta, eps, alpha, gamma):
    """One example's (loss, chosen reward, rejected reward), written from the papers."""
    if loss_type == "simpo":
        chosen, rejected = beta * pc / lc, beta * pr / lr
        return softplus(-(chosen - rejected - gamma)), chosen, rejected
    if loss_type == "ipo":
        chosen_ratio, rejected_ratio = pc / lc - rc / lc, pr / lr - rr / lr
        loss = (chosen_ratio - rejected_ratio - 0.5 / beta) ** 2
        return loss, beta * chosen_ratio, beta * rejected_ratio
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    margin = chosen - rejected
    if loss_type == "sigmoid":
        loss = (1 - eps) * softplus(-margin) + eps * softplus(margin)
    elif loss_type == "robust":
        loss = ((1 - eps) * softplus(-margin) - eps * softplus(margin)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        loss = max(0.0, 1.0 - margin)
    elif loss_type == "rpo":
        loss = (1 - eps) * softplus(-margin) + eps * softplus(margin) + alpha * (-pc / lc)
    return loss, chosen, rejected


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

@pytest.mark.parametrize(
    ("loss_type", "reference_free"),
    [(loss, free) for loss in LOSS_TYPES for free in (False, True) if loss != "simpo" or free],
)
def test_losses_match_independent_float64_formula(loss_type, reference_free):
    batch = random_batch(seed=LOSS_TYPES.index(loss_type))
    beta, alpha, gamma = (2.5, 0.7, 0.8) if loss_type == "simpo" else (0.3, 0.7, 0.5)
    eps = 0.15 if loss_type in ("sigmoid", "robust", "rpo") else 0.0
    references = (None, None) if reference_free else (batch["rc"], batch["rr"])
    losses, chosen, rejected = preference_loss(
        loss_type, batch["pc"], batch["pr"], *references,
        chosen_lengths=batch["lc"], rejected_lengths=batch["lr"], beta=beta,
        label_smoothing=eps, rpo_alpha=alpha, simpo_gamma=gamma,
    )
    expected = [
        reference_formula(
            loss_type, pc, pr, 0.0 if reference_free else rc, 0.0 if reference_free else rr,
            lc, lr, beta, eps, alpha, gamma,
        )
        for pc, pr, rc, rr, lc, lr in zip(*(batch[k].tolist() for k in batch), strict=True)
    ]
    expected_losses, expected_chosen, expected_rejected = (
        t(*column) for column in zip(*expected, strict=True)
    )
    assert losses.dtype == F64 and losses.shape == (48,)
    torch.testing.assert_close(losses, expected_losses, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chosen, expected_chosen, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rejected, expected_rejected, rtol=1e-12, atol=1e-12)


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


def test_rpo_is_dpo_plus_per_token_nll_of_chosen():
    batch = random_batch(seed=4)
    args = [batch[k] for k in ("pc", "pr", "rc", "rr")]
    dpo, dpo_chosen, dpo_rejected = dpo_loss(*args, beta=0.1, label_smoothing=0.1)
    rpo, rpo_chosen, rpo_rejected = rpo_loss(
        *args, batch["lc"], beta=0.1, label_smoothing=0.1, rpo_alpha=2.0
    )
    torch.testing.assert_close(rpo - dpo, -2.0 * batch["pc"] / batch["lc"])
    assert torch.equal(rpo_chosen, dpo_chosen) and torch.equal(rpo_rejected, dpo_rejected)


# --- numerical stability ---------------------------------------------------------------------

@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_huge_margins_stay_finite_with_finite_gradients(loss_type):
    """|h| = 1e4 in float32 (log(sigmoid(-1e4)) would be log(0) = -inf)."""
    pc = torch.tensor([1e4, -1e4, 0.0]).requires_grad_()
    pr = torch.tensor([-1e4, 1e4, 0.0]).requires_grad_()
    zeros = torch.zeros(3)
    references = (None, None) if loss_type == "simpo" else (zeros, zeros)
    eps = 0.2 if loss_type in ("sigmoid", "robust", "rpo") else 0.0
    losses, chosen, rejected = preference_loss(
        loss_type, pc, pr, *references, chosen_lengths=lengths(1, 1, 1),
        rejected_lengths=lengths(1, 1, 1), beta=1.0, label_smoothing=eps,
    )
    losses.sum().backward()
    for tensor in (losses, chosen, rejected, pc.grad, pr.grad):
        assert torch.isfinite(tensor).all(), (loss_type, tensor)


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
    pc, pr = batch["pc"].clone().requires_grad_(), batch["pr"].clone().requires_grad_()
    references = (None, None) if loss_type == "simpo" else (batch["rc"], batch["rr"])
    losses, chosen, rejected = preference_loss(
        loss_type, pc, pr, *references, chosen_lengths=batch["lc"],
        rejected_lengths=batch["lr"], beta=0.1,
    )
    assert losses.requires_grad
    assert not chosen.requires_grad and not rejected.requires_grad


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "ipo", "hinge", "rpo"])
def test_reference_free_equals_zero_reference(loss_type):
    batch = random_batch(seed=12)
    kwargs = dict(chosen_lengths=batch["lc"], rejected_lengths=batch["lr"], beta=0.2,
                  label_smoothing=0.1 if loss_type in ("sigmoid", "robust", "rpo") else 0.0)
    zeros = torch.zeros_like(batch["pc"])
    free = preference_loss(loss_type, batch["pc"], batch["pr"], None, None, **kwargs)
    zero_ref = preference_loss(loss_type, batch["pc"], batch["pr"], zeros, zeros, **kwargs)
    for a, b in zip(free, zero_ref, strict=True):
        assert torch.equal(a, b)


def test_preference_loss_rejects_bad_calls():
    x = t(-1.0, -2.0)
    ok = dict(chosen_lengths=lengths(1, 2), rejected_lengths=lengths(1, 2), beta=0.1)
    with pytest.raises(ValueError, match="simpo.*reference-free"):
        preference_loss("simpo", x, x, x, x, **ok)
    with pytest.raises(ValueError, match="both reference log-probs"):
        preference_loss("sigmoid", x, x, x, None, **ok)
    with pytest.raises(ValueError, match="unknown --loss_type 'kto'"):
        preference_loss("kto", x, x, x, x, **ok)
    with pytest.raises(ValueError, match=r"one shape \[B\]"):
        preference_loss("sigmoid", x, t(-1.0), x, x, **ok)
    with pytest.raises(ValueError, match=r"one shape \[B\]"):
        rows = x[None]  # [1, 2]: a 2-D batch is not per-example log-probs
        preference_loss("sigmoid", rows, rows, rows, rows, chosen_lengths=lengths(1, 2)[None],
                        rejected_lengths=lengths(1, 2)[None], beta=0.1)
    with pytest.raises(ValueError, match="lengths must be >= 1"):
        preference_loss("ipo", x, x, x, x, chosen_lengths=lengths(0, 2),
                        rejected_lengths=lengths(1, 2), beta=0.1)
    with pytest.raises(ValueError, match="no effect with --loss_type hinge"):
        preference_loss("hinge", x, x, x, x, label_smoothing=0.1, **ok)


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
    ("loss_type", "options", "message"),
    [
        ("kto", {}, "unknown --loss_type 'kto'"),
        ("sigmoid", {"beta": 0.0}, "--beta must be a finite number > 0"),
        ("sigmoid", {"beta": -0.1}, "--beta must be a finite number > 0"),
        ("sigmoid", {"beta": math.nan}, "--beta must be a finite number > 0"),
        ("sigmoid", {"label_smoothing": 0.5}, r"--label_smoothing must be in \[0, 0.5\)"),
        ("robust", {"label_smoothing": -0.1}, r"--label_smoothing must be in \[0, 0.5\)"),
        ("ipo", {"label_smoothing": 0.1}, "no effect with --loss_type ipo"),
        ("hinge", {"label_smoothing": 0.1}, "no effect with --loss_type hinge"),
        ("simpo", {"label_smoothing": 0.1}, "no effect with --loss_type simpo"),
        ("rpo", {"rpo_alpha": -1.0}, "--rpo_alpha must be a finite number >= 0"),
        ("simpo", {"simpo_gamma": -0.5}, "--simpo_gamma must be a finite number >= 0"),
        ("simpo", {"simpo_gamma": math.inf}, "--simpo_gamma must be a finite number >= 0"),
        ("simpo", {"precompute_ref_log_probs": True}, "simpo uses no reference model"),
        ("sigmoid", {"reference_free": True, "precompute_ref_log_probs": True},
         "--reference_free uses no reference model"),
    ],
)
def test_validate_loss_options_rejects(loss_type, options, message):
    kwargs = {"reference_free": False, "label_smoothing": 0.0, "beta": 0.1, **options}
    with pytest.raises(ValueError, match=message):
        validate_loss_options(loss_type, **kwargs)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_validate_loss_options_accepts_defaults_and_sensible_combinations(loss_type):
    validate_loss_options(loss_type, reference_free=False, label_smoothing=0.0, beta=0.1)
    validate_loss_options(loss_type, reference_free=True, label_smoothing=0.0, beta=2.0,
                          rpo_alpha=0.0, simpo_gamma=0.0)
    if loss_type in ("sigmoid", "robust", "rpo"):
        validate_loss_options(loss_type, reference_free=False, label_smoothing=0.49, beta=0.1,
                              precompute_ref_log_probs=True)
