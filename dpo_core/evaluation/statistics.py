"""The numbers `dpo-eval` reports about replies and judges, as plain functions of plain values.

- `length_summary`: mean, median and 90th percentile of reply lengths;
- `repeated_ngram_rate`: the share of a reply's n-grams that repeat an earlier one in it;
- `wins`, `wilson_interval`: a win rate and its 95% confidence interval;
- `length_controlled_win_rate`: the win rate with the length difference regressed out, as
  AlpacaEval 2's length-controlled win rate does.

Pure numpy (float64), so each is checked against hand-computed cases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# A 95% two-sided interval: the standard normal quantile at 0.975.
Z_95 = 1.959963984540054

# Ridge penalty of the length-controlled regression: negligible where the maximum-likelihood
# fit exists, and it keeps the fit finite where it does not (every reply wins, or the wins are
# separated by length exactly).
LC_RIDGE = 1e-4


def length_summary(lengths: Sequence[int]) -> dict[str, float]:
    """Mean, median and 90th percentile (numpy's default linear interpolation) of `lengths`."""
    values = np.asarray(lengths, dtype=np.float64)
    return {"mean": float(values.mean()), "median": float(np.median(values)),
            "p90": float(np.percentile(values, 90))}


def repeated_ngram_rate(replies: Sequence[Sequence[int]], n: int) -> float:
    """Over all `replies` (token ids) together: n-grams that repeat an n-gram seen earlier in
    the same reply, over all n-grams. 0 for text without repeats; a reply stuck in a loop
    tends to 1. Replies shorter than n have no n-grams; 0.0 when none has any."""
    total = repeated = 0
    for ids in replies:
        grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
        total += len(grams)
        repeated += len(grams) - len(set(grams))
    return repeated / total if total else 0.0


def wins(policy_scores: Sequence[float], reference_scores: Sequence[float]) -> np.ndarray:
    """Per prompt: 1 where the policy's reply scores higher, 0 where lower, 0.5 for a tie."""
    policy = np.asarray(policy_scores, dtype=np.float64)
    reference = np.asarray(reference_scores, dtype=np.float64)
    return 0.5 * (np.sign(policy - reference) + 1)


def wilson_interval(rate: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion `rate` observed in `n` trials (95% by default).

    Ties counted as half a win make the outcomes less spread than win-or-lose trials, so the
    interval is then conservative (wider than needed)."""
    if n <= 0:
        raise ValueError("wilson_interval needs at least one trial")
    denominator = 1 + z * z / n
    centre = (rate + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def length_controlled_win_rate(outcomes: Sequence[float],
                               length_differences: Sequence[float]) -> tuple[float, float]:
    """(win rate at zero length difference, length coefficient).

    The logistic regression of AlpacaEval 2's length control, with one model against one
    baseline:  P(win_i) = sigmoid(a + b * tanh(d_i / std(d))),  d_i = policy minus reference
    reply length. Fitted by Newton's method on the (fractional: a tie is 0.5) outcomes, with
    a tiny ridge (`LC_RIDGE`); the length-controlled win rate is sigmoid(a), the prediction
    where the two replies are equally long. When every difference is the same the length term
    cannot be told from the intercept, and the plain win rate comes back (b = 0).
    """
    y = np.asarray(outcomes, dtype=np.float64)
    d = np.asarray(length_differences, dtype=np.float64)
    if y.shape != d.shape or y.ndim != 1 or y.size == 0:
        raise ValueError("length_controlled_win_rate needs two equally long, non-empty lists")
    spread = d.std()
    x = np.tanh(d / spread) if spread > 0 else np.zeros_like(d)
    features = np.stack([np.ones_like(x), x], axis=1)  # [n, 2]
    theta = np.zeros(2)
    for _ in range(100):
        p = 1 / (1 + np.exp(-(features @ theta)))
        gradient = features.T @ (p - y) + LC_RIDGE * theta
        hessian = (features.T * (p * (1 - p))) @ features + LC_RIDGE * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if np.abs(step).max() < 1e-12:
            break
    return float(1 / (1 + math.exp(-theta[0]))), float(theta[1])
