"""95 % intervals for every number the report shows, from per-pair values (pure numpy).

One set of bootstrap weights (:func:`mv_interp.stats.resample_weights`, seeded by the report's
seed) resamples the held-out pairs for every statistic of a step, so paired statistics (the error
at the last site minus the decoder input's, a head's recall minus its baseline's, a knocked-out
output's error minus the clean one's) are computed on the same replicates.

- :func:`probe_intervals` — per site and method, the mean errors; the change along the decoder;
  the Figure-4 contributions per skip and per kind (ratios of means, as
  :func:`mv_interp.metrics.sublayer_contributions` computes them).
- :func:`head_intervals` — from per-pair head-score sums: every head's recall, lifts and the
  differences to its baselines, the best head per layer, and how many heads of each block get
  each label (the paper's "5 of 12 heads").
- :func:`paired_intervals` — the knockout's output errors and their differences to clean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .. import stats
from ..heads.scoring import PER_SAMPLE_SUMS
from ..stats import Interval, interval_from

METRICS = ("e2_aligned_v2", "e1_v2", "e1_v1", "e1")
SKIP_KINDS = ("self", "cross", "mlp")


def _iv(est: Any, reps: np.ndarray, level: float, n: int) -> dict[str, Any]:
    return interval_from(float(est), reps, level, n).to_dict()


def probe_intervals(rows: Sequence[Mapping[str, Any]], per_pair: Mapping[str, Any], contributions: Mapping[str, Any],
                    *, replicates: int = stats.DEFAULT_REPLICATES, seed: int = 0,
                    level: float = stats.DEFAULT_LEVEL) -> dict[str, Any]:
    """Intervals of a :class:`~mv_interp.probes.ProbeTable`'s numbers (its ``rows``, ``per_pair``
    and ``contributions``). Returns a JSON-able dict: ``sites`` (one row per method, location,
    metric), ``trends`` (per method and metric: start, end and ``end − start``) and
    ``contributions`` (per method: every skip's ``rel_change`` and ``rel_to_input``, every kind's
    ``total_rel_to_input``)."""
    order = sorted(rows, key=lambda r: r["order"])
    locs = list(dict.fromkeys(r["location"] for r in order))
    info = {r["location"]: r for r in order}
    n = next((len(v) for locs_ in per_pair.values() for ms in locs_.values() for v in ms.values()), 0)
    w = stats.resample_weights(n, replicates, seed) if n else np.zeros((replicates, 0))
    out: dict[str, Any] = {"level": level, "replicates": replicates, "seed": seed, "n_pairs": n, "sites": [],
                           "trends": {}, "contributions": {}}
    for method, by_loc in per_pair.items():
        for loc in locs:
            for m in METRICS:
                v = by_loc.get(loc, {}).get(m)
                if v is None:
                    continue
                ci = stats.mean_interval(v, weights=w, level=level) if n else stats.NAN
                out["sites"].append({"method": method, "location": loc, "metric": m, **ci.to_dict()})
        present = [loc for loc in locs if loc in by_loc]
        if len(present) < 2:
            continue
        start_e2 = "dec_in" if "dec_in" in present else present[0]
        trends = {}
        for m, start in (("e2_aligned_v2", start_e2), ("e1_v2", present[0])):
            a, b = by_loc[start].get(m), by_loc[present[-1]].get(m)
            if a is None or b is None:
                continue
            trends[m] = {"from": start, "to": present[-1],
                         "start": stats.mean_interval(a, weights=w, level=level).to_dict(),
                         "end": stats.mean_interval(b, weights=w, level=level).to_dict(),
                         "change": stats.paired_difference(b, a, weights=w, level=level).to_dict()}
        out["trends"][method] = trends
    for method in per_pair:
        base = method[len("control_"):] if method.startswith("control_") else None
        if base not in per_pair:
            continue
        common = [loc for loc in locs if "e2_aligned_v2" in per_pair[base].get(loc, {})
                  and "e2_aligned_v2" in per_pair[method].get(loc, {})]
        if common:
            a, b = per_pair[base][common[-1]]["e2_aligned_v2"], per_pair[method][common[-1]]["e2_aligned_v2"]
            out.setdefault("control_gap", {})[base] = {
                "location": common[-1], "control": method, "probe": stats.mean_interval(a, weights=w).to_dict(),
                "control_error": stats.mean_interval(b, weights=w).to_dict(),
                "change": stats.paired_difference(a, b, weights=w, level=level).to_dict()}
    for method, c in contributions.items():
        skips = c.skips if hasattr(c, "skips") else [_Skip(**s) for s in c["skips"]]
        path = [loc for loc in locs if info[loc]["stack"] == "dec" and info[loc]["kind"] in ("dec_in",) + SKIP_KINDS]
        if not path or info[path[0]]["kind"] != "dec_in" or len(path) - 1 != len(skips) or method not in per_pair:
            continue
        if any(info[loc]["kind"] != s.kind or int(info[loc]["layer"]) != s.block for loc, s in zip(path[1:], skips)):
            continue
        E = np.stack([per_pair[method][loc]["e2_aligned_v2"] for loc in path], axis=1)  # [pairs, entries]
        out["contributions"][method] = contribution_intervals(E, [s.block for s in skips], [s.kind for s in skips],
                                                              w, level)
    return out


class _Skip:
    def __init__(self, block: int, kind: str, **_: Any):
        self.block, self.kind = block, kind


def contribution_intervals(errors: np.ndarray, blocks: Sequence[int], kinds: Sequence[str], weights: np.ndarray,
                           level: float = stats.DEFAULT_LEVEL) -> dict[str, Any]:
    """Figure-4 contributions with intervals. ``errors [pairs, entries]``: the aligned view-2
    error of each pair at the decoder input and after every skip (in order). The statistics are
    ratios of means over pairs, each replicate recomputing the means."""
    n = errors.shape[0]
    est = np.nanmean(errors, axis=0)[None]  # [1, entries]
    reps = stats.replicate_means(errors, weights) if n else np.full((weights.shape[0], errors.shape[1]), np.nan)

    def parts(M: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        delta = M[:, 1:] - M[:, :-1]
        with np.errstate(invalid="ignore", divide="ignore"):
            return delta, delta / M[:, :-1], delta / M[:, :1]

    (_, rel_e, rin_e), (_, rel_r, rin_r) = parts(est), parts(reps)
    skips = [{"block": int(b), "kind": k, "rel_change": _iv(rel_e[0, i], rel_r[:, i], level, n),
              "rel_to_input": _iv(rin_e[0, i], rin_r[:, i], level, n)} for i, (b, k) in enumerate(zip(blocks, kinds))]
    by_kind = {}
    for kind in SKIP_KINDS:
        idx = [i for i, k in enumerate(kinds) if k == kind]
        if idx:
            by_kind[kind] = {"total_rel_to_input": _iv(rin_e[0, idx].sum(), rin_r[:, idx].sum(1), level, n),
                             "n_blocks": len(idx)}
    total = _iv(rin_e[0].sum(), rin_r.sum(1), level, n)
    return {"skips": skips, "by_kind": by_kind, "total_rel_to_input": total}


# --------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------

#: Per-pair head-score sums the intervals need (``HeadScorer`` sums of one pair each).
HEAD_SUMS = PER_SAMPLE_SUMS  # the head scorer keeps exactly these per example


def _lift(score: np.ndarray, chance: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(chance < 1, (score - chance) / np.maximum(1 - chance, 1e-12), np.nan)


def _pooled(S: Mapping[str, np.ndarray], W: np.ndarray) -> dict[str, np.ndarray]:
    """Sums over pairs under each replicate: ``{stat: [replicates, ...]}``."""
    out = {}
    for k, v in S.items():
        flat = v.reshape(v.shape[0], -1).astype(float)
        out[k] = (W @ np.nan_to_num(flat)).reshape((W.shape[0],) + v.shape[1:])
    return out


def _head_metrics(P: Mapping[str, np.ndarray], t: int) -> dict[str, np.ndarray]:
    """Per-head scores from pooled sums ``P`` (leading axis: replicates), threshold index ``t``."""
    m: dict[str, np.ndarray] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        rows = P["rows"][:, None]
        m["block_mass"] = P["block_mass"] / rows
        if "corr_hits" in P:
            n = P["corr_rows"][:, None]
            ok = n > 0
            m["recall"] = np.where(ok, P["corr_hits"][:, :, t] / np.where(ok, n, 1), np.nan)
            chance = np.where(ok, P["corr_chance"][:, t][:, None] / np.where(ok, n, 1), np.nan)
            same = np.where(ok, P["corr_same_pos"][:, t][:, None] / np.where(ok, n, 1), np.nan)
            m["chance"], m["same_position"] = np.broadcast_to(chance, m["recall"].shape), \
                np.broadcast_to(same, m["recall"].shape)
            m["vs_same_position"] = m["recall"] - m["same_position"]
            m["vs_uniform"] = m["recall"] - m["chance"]
            m["corr_lift"] = _lift(m["recall"], m["chance"])
        if "register_mass" in P:
            s = P["samples"][:, None]
            m["register_lift"] = _lift(P["register_mass"] / s, P["register_chance"][:, None] / s)
        if "local_mass" in P:
            m["local_lift"] = _lift(P["local_mass"] / rows, P["local_chance"][:, None] / rows)
    return m


def _labels(m: Mapping[str, np.ndarray], th: Mapping[str, Any], same_view: bool) -> dict[str, np.ndarray]:
    """Which heads get each label (the rule of :meth:`mv_interp.heads.HeadScores._labels`)."""
    live = np.nan_to_num(m["block_mass"], nan=-1) >= th["min_block_mass"]
    out = {}
    if not same_view and "recall" in m:
        out["correspondence"] = live & (np.nan_to_num(m["recall"], nan=-1) >= th["correspondence_recall"]) & \
            (np.nan_to_num(m["corr_lift"], nan=-1) >= th["correspondence_lift"])
    if "register_lift" in m:
        out["register"] = live & (np.nan_to_num(m["register_lift"], nan=-1) >= th["register_lift"])
    if same_view and "local_lift" in m:
        out["local"] = live & (np.nan_to_num(m["local_lift"], nan=-1) >= th["local_lift"])
    return out


def head_intervals(per_pair: Mapping[Any, Mapping[str, np.ndarray]], units: Sequence[Mapping[str, Any]],
                   thresholds: Mapping[str, Any], t_index: int, *, replicates: int = stats.DEFAULT_REPLICATES,
                   seed: int = 0, level: float = stats.DEFAULT_LEVEL) -> dict[str, Any]:
    """Intervals of every head's scores from per-pair sums.

    ``per_pair[unit_key][stat]``: arrays ``[pairs, ...]`` (one pair's :data:`HEAD_SUMS` each);
    ``units``: ``{"key", "site", "query_view", "key_view", "layer", "stack", "kind", "same_view",
    "n_heads"}`` per scored block; ``thresholds``: the :class:`~mv_interp.heads.HeadThresholds` as a
    dict; ``t_index``: index of the primary pixel threshold.

    Returns ``{"heads": [row per head and score], "counts": [per block and label: the count of
    heads with the label, its interval over replicates and the block's head count]}``.
    """
    out: dict[str, Any] = {"level": level, "replicates": replicates, "seed": seed, "heads": [], "counts": []}
    w = None
    for u in units:
        S = per_pair.get(u["key"])
        if not S:
            continue
        n = int(S["rows"].shape[0])
        if w is None or w.shape[1] != n:
            w = stats.resample_weights(n, replicates, seed)
        est = _head_metrics(_pooled(S, np.ones((1, n))), t_index)
        reps = _head_metrics(_pooled(S, w), t_index)
        base = {k: u[k] for k in ("site", "query_view", "key_view", "layer", "stack", "kind")}
        for name in est:
            if name in ("chance", "same_position", "block_mass"):
                continue
            for h in range(est[name].shape[1]):
                out["heads"].append({**base, "head": h, "score": name,
                                     **_iv(est[name][0, h], reps[name][:, h], level, n)})
        lab_e, lab_r = _labels(est, thresholds, u["same_view"]), _labels(reps, thresholds, u["same_view"])
        for label, e in lab_e.items():
            out["counts"].append({**base, "label": label, "n_heads": int(e.shape[1]),
                                  **_iv(float(e[0].sum()), lab_r[label].sum(1).astype(float), level, n)})
        out["n_pairs"] = n
    return out


def head_interval(intervals: Mapping[str, Any], site: str, query_view: int, key_view: int, head: int,
                  score: str) -> Interval:
    """One head's interval of ``score`` from :func:`head_intervals`' output (NaN if absent)."""
    for r in intervals.get("heads", ()):
        if (r["site"], r["query_view"], r["key_view"], r["head"], r["score"]) == (site, query_view, key_view, head,
                                                                                    score):
            return Interval.from_dict(r)
    return stats.NAN


def paired_intervals(values: Mapping[str, Any], reference: str, *, replicates: int = stats.DEFAULT_REPLICATES,
                     seed: int = 0, level: float = stats.DEFAULT_LEVEL) -> dict[str, Any]:
    """Each series' mean and its difference to ``values[reference]`` on the same pairs."""
    n = len(values[reference])
    w = stats.resample_weights(n, replicates, seed)
    out = {}
    for name, v in values.items():
        out[name] = {"mean": stats.mean_interval(v, weights=w, level=level).to_dict()}
        if name != reference:
            out[name]["vs_" + reference] = stats.paired_difference(v, values[reference], weights=w,
                                                                   level=level).to_dict()
    return out

