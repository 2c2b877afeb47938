"""The bootstrap intervals (mv_interp.stats) and the report's verdicts on constructed numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mv_interp import stats
from mv_interp.report.verdicts import agreement, judge
from mv_interp.stats import Interval


def test_weights_are_seeded_and_resample_pairs():
    a, b = stats.resample_weights(7, 50, seed=3), stats.resample_weights(7, 50, seed=3)
    assert np.array_equal(a, b) and not np.array_equal(a, stats.resample_weights(7, 50, seed=4))
    assert a.shape == (50, 7) and np.all(a.sum(1) == 7)


def test_mean_interval_covers_the_mean_and_shrinks_with_pairs():
    rng = np.random.default_rng(0)
    small, large = rng.normal(1.0, 0.5, 10), rng.normal(1.0, 0.5, 400)
    ci_s, ci_l = stats.mean_interval(small), stats.mean_interval(large)
    assert ci_s.low < small.mean() < ci_s.high and ci_l.low < 1.0 < ci_l.high
    assert ci_l.half_width < ci_s.half_width / 3
    assert stats.mean_interval(small) == ci_s  # reproducible
    # the known answer: the bootstrap standard error of a mean is ≈ sd / sqrt(n)
    assert ci_l.half_width == pytest.approx(1.96 * large.std() / math.sqrt(400), rel=0.15)
    # NaN pairs are ignored; one pair has no interval
    assert stats.mean_interval([1.0, math.nan, 3.0]).estimate == 2.0
    one = stats.mean_interval([2.0])
    assert one.estimate == 2.0 and not one.finite


def test_paired_difference_uses_the_same_pairs():
    rng = np.random.default_rng(1)
    base = rng.normal(5, 2, 30)  # large spread between pairs …
    after = base - 0.1 + rng.normal(0, 0.01, 30)  # … but every pair falls by 0.1
    d = stats.paired_difference(after, base)
    assert d.below(0) and d.estimate == pytest.approx(-0.1, abs=0.01)
    # unpaired intervals of the two means overlap: only pairing shows the fall
    a, b = stats.mean_interval(after), stats.mean_interval(base)
    assert a.high > b.low
    with pytest.raises(ValueError, match="one value per pair"):
        stats.paired_difference([1, 2], [1, 2, 3])


def test_ratio_interval_pools_counts():
    hits, rows = np.array([9, 1, 5, 5]), np.array([10, 10, 10, 10])
    r = stats.ratio_interval(hits, rows)
    assert r.estimate == 0.5 and r.low < 0.5 < r.high and 0 <= r.low and r.high <= 1


def test_judge_falling_error():
    falls = Interval(-0.10, -0.15, -0.05, n=64)
    assert judge({"decoder input": falls}, "below").supported
    assert judge({"decoder input": falls}, "below").css == "good"
    # a rising error is never green, whatever its interval
    for rise in (Interval(0.004, -0.01, 0.02), Interval(0.05, 0.01, 0.09), Interval(0.001, math.nan, math.nan)):
        v = judge({"decoder input": rise}, "below", what="the error")
        assert not v.supported and v.css == "" and "not below" in v.reason
    assert judge({"decoder input": Interval(0.05, 0.01, 0.09)}, "below").status == "contradicted"
    # falling, but the interval includes 0: neutral with the reason
    v = judge({"decoder input": Interval(-0.02, -0.05, 0.01)}, "below")
    assert v.status == "not shown" and "includes 0" in v.reason
    # a smoke run is never green
    assert judge({"decoder input": falls}, "below", smoke="--fast smoke run").status == "smoke"


def test_judge_best_head_against_every_baseline():
    beats = {"same position": Interval(0.2, 0.1, 0.3), "uniform attention": Interval(0.5, 0.4, 0.6)}
    assert judge(beats, "above").supported
    # below the same-position baseline (94 % vs 100 %): never green
    below = {"same position": Interval(-0.06, -0.1, -0.02), "uniform attention": Interval(0.8, 0.7, 0.9)}
    v = judge(below, "above", what="best head")
    assert not v.supported and "same position" in v.reason
    # above, but within its interval of one baseline
    close = {"same position": Interval(0.01, -0.02, 0.04), "uniform attention": Interval(0.5, 0.4, 0.6)}
    assert judge(close, "above").status == "not shown"
    with pytest.raises(ValueError):
        judge(beats, "sideways")


def test_agreement_with_the_paper():
    assert agreement(Interval(-0.9, -0.95, -0.8), side="below")[0] == "agree"
    assert agreement(Interval(0.1, 0.05, 0.2), side="below")[0] == "disagree"
    assert agreement(Interval(0.0, -0.05, 0.05), side="above")[0] == "inconclusive"
    assert agreement(Interval(math.nan, math.nan, math.nan), side="above")[0] == "not measurable here"
    assert agreement(Interval(0.4, 0.35, 0.45), band=(1 / 3, 0.5))[0] == "agree"
    assert agreement(Interval(0.1, 0.0, 0.2), band=(1 / 3, 0.5))[0] == "disagree"


def test_register_verdict_needs_the_positive_control():
    from mv_interp.report.verdicts import register_verdict

    none = Interval(0.001, -0.002, 0.004)
    strong = Interval(0.2, 0.1, 0.3)
    assert "as in the paper" in register_verdict(none, strong).reason
    assert "cannot show an effect" in register_verdict(none, Interval(0.0, -0.01, 0.01)).reason
    assert "carry information" in register_verdict(Interval(0.05, 0.02, 0.08), strong).reason
    assert register_verdict(none, None).status == "not measurable"
    assert not register_verdict(none, strong).supported  # a "no effect" reading is never a green card
