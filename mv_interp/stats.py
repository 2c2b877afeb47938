"""Uncertainty of measurements over held-out pairs: a seeded percentile bootstrap.

Every number the report quotes is a statistic of per-pair values (a mean of per-pair errors, a
ratio of sums of per-pair counts such as a head's correspondence recall, a difference between
two such statistics on the *same* pairs). :func:`resample_weights` draws the bootstrap
replicates once — pair counts ``[replicates, pairs]`` from a seeded generator, so the same
seed, number of pairs and replicates always give the same intervals — and the functions here
evaluate a statistic on every replicate at once (vectorised, no Python loop over replicates).
Paired statistics (``last − first`` on the same pairs, a head's recall minus its baseline's)
reuse one set of weights for both terms, which is what makes their interval narrow when the
two move together.

>>> from mv_interp import stats
>>> ci = stats.mean_interval(per_pair_errors)            # Interval(estimate, low, high)
>>> d = stats.paired_difference(err_last, err_first)     # does the error fall? d.high < 0
>>> r = stats.ratio_interval(hits, rows)                 # pooled recall over pairs
>>> print(d)                                             # "-0.031 [-0.052, -0.012]"

Percentile intervals are the 2.5th and 97.5th percentiles of the replicates (``level=0.95``).
With fewer than two finite pairs there is nothing to resample: the interval is ``(nan, nan)``.
Pure numpy; no torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Interval", "resample_weights", "interval_from", "mean_interval", "paired_difference",
           "ratio_interval", "statistic_interval", "replicate_means", "replicate_ratios", "DEFAULT_REPLICATES",
           "DEFAULT_LEVEL"]

ArrayLike = Any  # per-pair values: a sequence or an array, pairs on the first axis
DEFAULT_REPLICATES = 1000
DEFAULT_LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap percentile interval.

    Attributes:
        estimate: the statistic on the pairs as measured (not the replicates' mean).
        low / high: the interval's bounds (NaN when it could not be computed).
        level: coverage of the interval (0.95).
        n: pairs the statistic is computed over.
        replicates: bootstrap replicates drawn.
    """

    estimate: float
    low: float
    high: float
    level: float = DEFAULT_LEVEL
    n: int = 0
    replicates: int = 0

    @property
    def finite(self) -> bool:
        return all(math.isfinite(x) for x in (self.estimate, self.low, self.high))

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2 if self.finite else math.nan

    def above(self, value: float | int = 0.0) -> bool:
        """The whole interval lies above ``value`` (the statistic exceeds it with confidence)."""
        return self.finite and self.low > value

    def below(self, value: float | int = 0.0) -> bool:
        """The whole interval lies below ``value``."""
        return self.finite and self.high < value

    def excludes(self, value: float | int = 0.0) -> bool:
        return self.above(value) or self.below(value)

    def scaled(self, factor: float | int) -> Interval:
        """The interval of ``factor · statistic`` (bounds swap for a negative factor)."""
        lo, hi = sorted((self.low * factor, self.high * factor))
        return Interval(self.estimate * factor, lo, hi, self.level, self.n, self.replicates)

    def to_dict(self) -> dict[str, Any]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "level": self.level, "n": self.n,
                "replicates": self.replicates}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Interval:
        if not d:
            return NAN

        def f(x: Any) -> float:
            return float(x) if x is not None else math.nan

        return cls(f(d.get("estimate")), f(d.get("low")), f(d.get("high")), float(d.get("level", DEFAULT_LEVEL)),
                   int(d.get("n", 0)), int(d.get("replicates", 0)))

    def __str__(self) -> str:
        return f"{self.estimate:.3g} [{self.low:.3g}, {self.high:.3g}]"


NAN = Interval(math.nan, math.nan, math.nan)


def resample_weights(n: int, replicates: int = DEFAULT_REPLICATES, seed: int = 0) -> np.ndarray:
    """Bootstrap replicates of ``n`` pairs as counts ``[replicates, n]`` (each row sums to ``n``).

    Seeded: the same ``(n, replicates, seed)`` always gives the same weights, so intervals are
    reproducible run to run and a paired statistic can reuse the weights of its terms.
    """
    if n < 0 or replicates < 1:
        raise ValueError(f"resample_weights: need n >= 0 pairs and replicates >= 1; got n={n}, "
                         f"replicates={replicates}")
    rng = np.random.default_rng(seed)
    if n == 0:
        return np.zeros((replicates, 0))
    idx = rng.integers(0, n, size=(replicates, n))
    w = np.zeros((replicates, n))
    np.add.at(w, (np.arange(replicates)[:, None], idx), 1.0)
    return w


def interval_from(estimate: Any, replicates: np.ndarray, level: float = DEFAULT_LEVEL, n: int = 0) -> Interval:
    """The percentile interval of a statistic's replicate values (NaN replicates are dropped);
    ``n``: the pairs behind it (with one pair there is no interval)."""
    estimate = float(estimate)
    r = np.asarray(replicates, dtype=float).ravel()
    r = r[np.isfinite(r)]
    if r.size < 2 or not math.isfinite(estimate) or 0 < n < 2:  # one pair: nothing to resample
        return Interval(float(estimate), math.nan, math.nan, level, n, int(np.asarray(replicates).size))
    a = (1 - level) / 2
    lo, hi = np.quantile(r, [a, 1 - a])
    return Interval(float(estimate), float(lo), float(hi), level, n, int(np.asarray(replicates).size))


def _as2d(values: Any) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    return v.reshape(v.shape[0], -1) if v.ndim else v.reshape(1, 1)


def replicate_means(values: Any, weights: np.ndarray) -> np.ndarray:
    """Weighted means of per-pair ``values`` ``[pairs, ...]`` under each replicate: ``[replicates, ...]``.

    Non-finite values are left out of both the numerator and the weights of their replicate.
    """
    v = np.asarray(values, dtype=float)
    flat = _as2d(v)
    ok = np.isfinite(flat)
    num = weights @ np.where(ok, flat, 0.0)
    den = weights @ ok.astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
    return out.reshape((weights.shape[0],) + v.shape[1:])


def replicate_ratios(num: Any, den: Any, weights: np.ndarray) -> np.ndarray:
    """``Σ w·num / Σ w·den`` per replicate (a pooled rate such as recall = hits / queries)."""
    n, d = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    d = np.broadcast_to(d.reshape(d.shape + (1,) * (n.ndim - d.ndim)), n.shape)
    top = (weights @ _as2d(np.nan_to_num(n))).reshape((weights.shape[0],) + n.shape[1:])
    bottom = (weights @ _as2d(np.nan_to_num(d))).reshape((weights.shape[0],) + n.shape[1:])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(bottom > 0, top / np.where(bottom > 0, bottom, 1), np.nan)


def _weights(n: int, replicates: int, seed: int, weights: np.ndarray | None) -> np.ndarray:
    if weights is not None:
        if weights.shape[1] != n:
            raise ValueError(f"bootstrap weights are for {weights.shape[1]} pairs, the values for {n}")
        return weights
    return resample_weights(n, replicates, seed)


def mean_interval(values: ArrayLike, *, replicates: int = DEFAULT_REPLICATES, seed: int = 0,
                  level: float = DEFAULT_LEVEL, weights: np.ndarray | None = None) -> Interval:
    """The mean of per-pair values (NaN pairs ignored) with its bootstrap interval."""
    v = np.asarray(values, dtype=float).ravel()
    finite = v[np.isfinite(v)]
    est = float(finite.mean()) if finite.size else math.nan
    if finite.size < 2:
        return Interval(est, math.nan, math.nan, level, int(finite.size), replicates)
    w = _weights(v.size, replicates, seed, weights)
    return interval_from(est, replicate_means(v, w), level, int(finite.size))


def paired_difference(a: ArrayLike, b: ArrayLike, *,
                      replicates: int = DEFAULT_REPLICATES, seed: int = 0, level: float = DEFAULT_LEVEL,
                      weights: np.ndarray | None = None) -> Interval:
    """``mean(a) − mean(b)`` over the same pairs (``a[i]`` and ``b[i]`` measured on pair ``i``),
    resampling pairs — not the two series independently. Pairs where either is NaN are dropped."""
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired_difference: {a.size} and {b.size} values; pass one value per pair for each")
    return mean_interval(np.where(np.isfinite(a) & np.isfinite(b), a - b, np.nan), replicates=replicates,
                         seed=seed, level=level, weights=weights)


def ratio_interval(num: ArrayLike, den: ArrayLike, *,
                   replicates: int = DEFAULT_REPLICATES, seed: int = 0, level: float = DEFAULT_LEVEL,
                   weights: np.ndarray | None = None) -> Interval:
    """``Σ num / Σ den`` over pairs (e.g. hits / scored queries: a recall pooled over pairs)."""
    n, d = np.asarray(num, dtype=float).ravel(), np.asarray(den, dtype=float).ravel()
    if n.shape != d.shape:
        raise ValueError(f"ratio_interval: {n.size} numerators and {d.size} denominators; pass one of each per pair")
    total = float(np.nansum(d))
    est = float(np.nansum(n)) / total if total > 0 else math.nan
    if n.size < 2:
        return Interval(est, math.nan, math.nan, level, int(n.size), replicates)
    w = _weights(n.size, replicates, seed, weights)
    return interval_from(est, replicate_ratios(n, d, w), level, int(n.size))


def statistic_interval(fn: Callable[[np.ndarray], np.ndarray], n: int, estimate: float, *,
                       replicates: int = DEFAULT_REPLICATES, seed: int = 0, level: float = DEFAULT_LEVEL,
                       weights: np.ndarray | None = None) -> Interval:
    """Any statistic: ``fn(weights [replicates, n]) -> [replicates]`` evaluates it on every
    replicate (``fn(np.ones((1, n)))`` is the estimate as measured); percentile interval."""
    if n < 2:
        return Interval(float(estimate), math.nan, math.nan, level, n, replicates)
    w = _weights(n, replicates, seed, weights)
    return interval_from(float(estimate), np.asarray(fn(w), dtype=float), level, n)
