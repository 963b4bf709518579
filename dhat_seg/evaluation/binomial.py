"""Exact one-sided binomial tests, pure functions of counts (for :mod:`dhat_seg.evaluation.sanity`).

X ~ Binomial(n, p); the test of the null "success rate <= p0" rejects at level alpha
when P(X >= k | p0) <= alpha for the observed count k. Computed in log space with
``math.lgamma`` (no overflow for large n), summed term by term: no scipy.
"""

from __future__ import annotations

import functools
import math


def _check_binomial(n: int, p: float) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n={n!r} is invalid; expected a non-negative integer")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p={p!r} is invalid; expected a probability in [0, 1]")


def _log_pmf(n: int, p: float) -> list[float]:
    """log P(X = i), i = 0..n, X ~ Binomial(n, p), 0 < p < 1 (log space: no overflow for large n)."""
    lp, lq, lgn = math.log(p), math.log1p(-p), math.lgamma(n + 1)
    return [lgn - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq for i in range(n + 1)]


def _upper_tails(n: int, p: float) -> list[float]:
    """P(X >= k) for k = 0..n+1, X ~ Binomial(n, p)."""
    _check_binomial(n, p)
    if p == 0.0:
        return [1.0] + [0.0] * (n + 1)
    if p == 1.0:
        return [1.0] * (n + 1) + [0.0]
    logs = _log_pmf(n, p)
    top = max(logs)
    tails, acc = [0.0] * (n + 2), 0.0
    for i in range(n, -1, -1):
        acc += math.exp(logs[i] - top)
        tails[i] = min(1.0, acc * math.exp(top))
    tails[0] = 1.0
    return tails


def binomial_tail(k: int, n: int, p: float) -> float:
    """Exact upper tail P(X >= k) of X ~ Binomial(n, p): the one-sided p-value of k
    successes in n trials against the null "success probability <= p"."""
    _check_binomial(n, p)
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    return _upper_tails(n, p)[k]


def critical_count(n: int, p0: float, alpha: float) -> int:
    """The smallest count k with P(X >= k) <= alpha under X ~ Binomial(n, p0): the test
    rejects "rate <= p0" from k successes of n on (n + 1 when no count can)."""
    tails = _upper_tails(n, p0)
    return next(k for k in range(n + 2) if tails[k] <= alpha)


def binomial_power(n: int, p0: float, p1: float, alpha: float) -> float:
    """Power of the exact one-sided test of "rate <= p0" at level ``alpha`` with n
    trials when the true rate is p1: P(X >= critical_count) under Binomial(n, p1)."""
    return binomial_tail(critical_count(n, p0, alpha), n, p1)


@functools.lru_cache(maxsize=32)
def samples_for_power(p0: float, p1: float, alpha: float, power: float, n_max: int = 20000) -> int:
    """The number of trials from which the exact one-sided test of "rate <= p0" at level
    ``alpha`` detects a true rate p1 > p0 with at least ``power``.

    The power of an exact binomial test is not monotone in n (it drops each time the
    critical count steps up), so this is the smallest n whose power, and the power of
    every n up to 2n, is >= ``power``: a count that varies from run to run keeps the
    power. With p0 = 2%, p1 = 5%, alpha = 0.01, power 0.8: 383 (the first n reaching
    0.8 is 339).
    """
    if not 0.0 <= p0 < p1 <= 1.0:
        raise ValueError(f"p0={p0!r}, p1={p1!r} are invalid; expected 0 <= p0 < p1 <= 1")
    powers: list[float] = [0.0]
    limit = 64
    while limit <= 2 * n_max:
        powers += [binomial_power(m, p0, p1, alpha) for m in range(len(powers), limit + 1)]
        run = 0  # consecutive n (counting down from ``limit``) with enough power
        ok_from = [0] * (limit + 2)  # ok_from[m]: n with enough power from m on, up to limit
        for m in range(limit, 0, -1):
            run = run + 1 if powers[m] >= power else 0
            ok_from[m] = run
        for n in range(1, limit // 2 + 1):
            if ok_from[n] >= n + 1:  # every m in [n, 2n]
                return n
        limit *= 2
    raise ValueError(f"no n <= {n_max} reaches power {power} for p0={p0}, p1={p1}, alpha={alpha}")


def format_p(p: float) -> str:
    """A p-value for a table: two significant digits ("0.003", "0.00012", "3.1e-07")."""
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"
