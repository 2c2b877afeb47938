"""Verdicts that follow from the numbers: when a headline card may be green, and whether the
paper's claim holds here.

Both are pure functions of :class:`~mv_interp.stats.Interval` values, tested on constructed
numbers (``tests/test_stats.py``):

- :func:`judge` — a claim "statistic is below / above its baseline" is *supported* (green) only
  when, for **every** named baseline, the bootstrap interval of ``statistic − baseline`` lies
  entirely on the claimed side of 0, and the run is not a smoke run. Otherwise it is neutral and
  says why (a smoke run, no interval, the interval includes 0, or the estimate is on the wrong
  side: a rising error is never green, a head below its baseline is never green).
- :func:`agreement` — the paper's direction (or range) against this run's interval: *agree*
  when the interval lies on the paper's side (inside its range), *disagree* when it lies
  entirely on the other side (outside the range), *inconclusive* when it straddles, *not
  measurable here* when there is no interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..stats import Interval

__all__ = ["Verdict", "judge", "agreement", "SIDES", "AGREEMENTS"]

SIDES = ("below", "above")
AGREEMENTS = ("agree", "disagree", "inconclusive", "not measurable here")


@dataclass(frozen=True)
class Verdict:
    """The outcome of :func:`judge`.

    Attributes:
        status: ``"supported"`` (the card may be green), ``"not shown"`` (the interval includes
            0, or the estimate points the claimed way but not with confidence), ``"contradicted"``
            (the whole interval lies on the other side), ``"smoke"`` (a smoke run: never green) or
            ``"not measurable"`` (no interval).
        reason: one sentence for the page.
    """

    status: str
    reason: str

    @property
    def supported(self) -> bool:
        return self.status == "supported"

    @property
    def css(self) -> str:
        """The card's colour class: green only when supported, otherwise neutral."""
        return "good" if self.supported else ""

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "supported": self.supported, "reason": self.reason}


def _num(x: float) -> str:
    return f"{x:+.3g}" if math.isfinite(x) else "–"


def _ci(iv: Interval) -> str:
    return f"{_num(iv.estimate)} [{_num(iv.low)}, {_num(iv.high)}]"


def judge(differences: Mapping[str, Interval], side: str, *, smoke: str | None = None,
          what: str = "the statistic") -> Verdict:
    """Is ``what`` below (``side="below"``) or above (``"above"``) every baseline?

    ``differences`` maps a baseline's name to the interval of ``statistic − baseline`` measured on
    the same pairs (e.g. ``{"decoder input": last − first}`` for a falling error, ``{"same
    position": recall − same-position recall, "uniform attention": recall − chance}`` for a head).
    ``smoke`` (a reason such as ``"--fast smoke run"``) makes every verdict neutral.

    >>> judge({"decoder input": Interval(-0.1, -0.15, -0.05)}, "below").supported
    True
    >>> judge({"decoder input": Interval(0.004, -0.01, 0.02)}, "below").status   # a rise
    'not shown'
    """
    if side not in SIDES:
        raise ValueError(f"judge: side must be one of {SIDES}, got {side!r}")
    if not differences:
        raise ValueError("judge: name at least one baseline and the interval of the difference to it")
    sign = -1.0 if side == "below" else 1.0
    word = "below" if side == "below" else "above"
    for name, iv in differences.items():
        if not math.isfinite(iv.estimate):
            return Verdict("not measurable", f"{what} vs {name}: not measured")
    if smoke:
        return Verdict("smoke", f"{smoke}: not judged (its numbers are not meaningful)")
    for name, iv in differences.items():
        if sign * iv.estimate > 0:
            continue
        contradicted = iv.above(0) if side == "below" else iv.below(0)
        return Verdict("contradicted" if contradicted else "not shown",
                       f"{what} is not {word} {name}: difference {_ci(iv)}")
    for name, iv in differences.items():
        if not iv.finite:
            return Verdict("not measurable", f"{what} vs {name}: {_num(iv.estimate)}, no interval (fewer than 2 "
                                             "pairs?)")
        if not (iv.below(0) if side == "below" else iv.above(0)):
            return Verdict("not shown", f"{what} is {word} {name} by {_ci(iv)}, but the {iv.level:.0%} interval "
                                        "includes 0")
    parts = "; ".join(f"{name}: {_ci(iv)}" for name, iv in differences.items())
    level = next(iter(differences.values())).level
    return Verdict("supported", f"{what} is {word} every baseline with {level:.0%} confidence ({parts})")


def agreement(iv: Interval, *, side: str | None = None, band: tuple[float, float] | None = None) -> tuple[str, str]:
    """Does this run's interval agree with a paper's claim? ``side``: the paper's sign of the
    statistic (``"below"`` / ``"above"`` 0); ``band``: the paper's range ``(low, high)``.

    Returns ``(status, reason)`` with status in :data:`AGREEMENTS`.

    >>> agreement(Interval(-0.5, -0.7, -0.3), side="below")[0]
    'agree'
    >>> agreement(Interval(0.3, 0.1, 0.5), band=(0.33, 0.5))[0]   # overlaps the band
    'inconclusive'
    """
    if (side is None) == (band is None):
        raise ValueError("agreement: give the paper's side or its band, not both")
    if not math.isfinite(iv.estimate):
        return "not measurable here", "not measured on this run"
    if not iv.finite:
        return "not measurable here", f"{iv.estimate:.3g} without an interval (fewer than 2 pairs)"
    if side is not None:
        if side not in SIDES:
            raise ValueError(f"agreement: side must be one of {SIDES}, got {side!r}")
        good = iv.below(0) if side == "below" else iv.above(0)
        bad = iv.above(0) if side == "below" else iv.below(0)
        what = "negative" if side == "below" else "positive"
        if good:
            return "agree", f"the whole interval is {what}, as in the paper"
        if bad:
            return "disagree", "the whole interval has the opposite sign to the paper's"
        return "inconclusive", "the interval includes 0"
    lo, hi = band
    if iv.low >= lo and iv.high <= hi:
        return "agree", f"the interval lies inside the paper's range [{lo:.3g}, {hi:.3g}]"
    if iv.high < lo or iv.low > hi:
        return "disagree", f"the interval lies outside the paper's range [{lo:.3g}, {hi:.3g}]"
    return "inconclusive", f"the interval overlaps the paper's range [{lo:.3g}, {hi:.3g}] but is not inside it"


def register_verdict(registers_vs_random: Interval, positive_vs_registers: Interval | None,
                     measure: str = "the output's change") -> Verdict:
    """The register knockout read against both controls (intervals of paired differences of
    ``measure`` — how far the model's output moves, or its error — over the same pairs).

    - The positive control (the same kind of knockout on the strongest correspondence heads) must
      move ``measure`` more than the register knockout does; if it does not, this knockout cannot
      show an effect on this model and nothing is concluded.
    - Then the registers carry information only if knocking them out moves ``measure`` more than
      knocking out random tokens in the same heads (the interval above 0).

    Never green: it reads the paper's claim ("almost no difference") and says whether it holds.
    """
    if positive_vs_registers is None:
        return Verdict("not measurable", "no positive control could be run (the model declares no cross-view "
                                         "attention to knock out), so there is no evidence this knockout can show an "
                                         "effect")
    if not positive_vs_registers.finite:
        return Verdict("not measurable", "no interval for the positive control (fewer than 2 pairs): give more "
                                         "pairs to read the knockout against its controls")
    if not positive_vs_registers.above(0):
        return Verdict("not shown", f"the positive control did not move {measure} more than the register knockout "
                                    f"(difference {_ci(positive_vs_registers)}): this knockout cannot show an effect "
                                    "here, so no conclusion about the registers")
    if not registers_vs_random.finite:
        return Verdict("not measurable", "no interval for the register knockout against random tokens")
    if registers_vs_random.above(0):
        return Verdict("not shown", f"the register knockout moves {measure} more than random tokens "
                                    f"({_ci(registers_vs_random)}): the registers carry information here, unlike "
                                    "the paper's finding")
    return Verdict("not shown", f"no effect beyond random tokens ({_ci(registers_vs_random)}), while the positive "
                                f"control moves {measure} by {_ci(positive_vs_registers)} more: a knockout can hurt "
                                "this model, the registers' one does not (as in the paper)")
