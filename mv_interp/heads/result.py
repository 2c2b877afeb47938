"""The result of :func:`~mv_interp.heads.score_heads`: per-head scores, labels, tables, files.

A *row* is one head of one view-to-view block of one attention site: (site, query view, key
view, head). DUSt3R's ``dec3.cross.v2`` has one block (view-2 queries, view-1 keys); an
encoder site stacked over two views has blocks ``1→1`` and ``2→2``; a Fast3R global site has
all ``V²`` blocks.
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import io
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..adapters.base import AttentionSite, ConfigMixin
from ..errors import UnknownNameError
from ..hooks import natural_key
from ..io import atomic_write, dumps_json, jsonable

__all__ = ["HeadThresholds", "HeadRef", "BestHead", "RegisterHead", "HeadScores", "LABELS", "px_label", "ScoreConfig",
           "UnitInfo", "KINDS", "GEOMETRY_KEYS"]

#: The score families :func:`score_heads` computes.
KINDS = ("correspondence", "register", "local")
#: Keys of a view dict that correspondence targets need.
GEOMETRY_KEYS = ("depth", "valid", "intrinsics", "cam2world")


@dataclass(frozen=True)
class ScoreConfig(ConfigMixin):
    """What to score and with which parameters."""

    kinds: Sequence[str] = KINDS
    """Score families to compute, a subset of ``("correspondence", "register", "local")``."""
    thresholds_px: Sequence[float | int] | None = None
    """Pixel thresholds on the distance between predicted and true patch centres for
    correspondence recall; ``None``: ``(0, p, 2p)`` for patch size ``p`` (exact patch, its
    4-neighbours, two patches away)."""
    register_k: int = 5
    """How many keys count as a sample's register set (the paper knocks out five tokens)."""
    local_radius: int = 1
    """Radius in patches (Chebyshev) of the local neighbourhood: 1 is the 3×3 window."""
    sites: Sequence[str] | None = None
    """Only attention sites whose name matches one of these globs (``"dec*.cross.*"``); ``None``: all."""
    max_queries: int | None = None
    """Score at most this many query patches per view and batch (a seeded sample, new each batch)
    instead of all: their attention rows are computed from q and k alone
    (:class:`~mv_interp.layers.QueryPatterns`) while the forward stays on SDPA, so memory grows with
    the queries, not with views². ``None`` (or at least the number of patches): every query."""

    def __post_init__(self) -> None:
        kinds = (self.kinds,) if isinstance(self.kinds, str) else tuple(self.kinds)
        object.__setattr__(self, "kinds", kinds)
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown or not kinds:
            raise ValueError(f"ScoreConfig.kinds: unknown or empty {unknown or list(kinds)}; choose from {KINDS}")
        if self.thresholds_px is not None:
            thr = tuple(float(t) for t in self.thresholds_px)
            if not thr or any(not math.isfinite(t) or t < 0 for t in thr):
                raise ValueError(f"ScoreConfig.thresholds_px must be non-negative pixel distances, got {thr}")
            object.__setattr__(self, "thresholds_px", tuple(sorted(set(thr))))
        if self.register_k < 1:
            raise ValueError(f"ScoreConfig.register_k must be >= 1, got {self.register_k}")
        if self.local_radius < 0:
            raise ValueError(f"ScoreConfig.local_radius must be >= 0 patches, got {self.local_radius}")
        if self.sites is not None:
            object.__setattr__(self, "sites", (self.sites,) if isinstance(self.sites, str) else tuple(self.sites))
        if self.max_queries is not None and self.max_queries < 1:
            raise ValueError(f"ScoreConfig.max_queries must be >= 1 (or None for every query), got {self.max_queries}")

    def resolved_thresholds(self, patch_size: int) -> tuple[float, ...]:
        return self.thresholds_px if self.thresholds_px is not None else (0.0, float(patch_size), 2.0 * patch_size)

    def wants(self, site: AttentionSite) -> bool:
        return self.sites is None or any(fnmatch.fnmatchcase(site.name, g) for g in self.sites)


@dataclass(frozen=True)
class UnitInfo:
    """One view-to-view block of an attention site, scored for each of its heads.

    Attributes:
        site: the model's :class:`~mv_interp.adapters.base.AttentionSite`.
        query_view / key_view: 1-based views of the block's queries and keys.
        key_offset: index along the pattern's key axis of the block's first key (non-zero when
            a pattern holds several key views: ``"global"`` layouts, multi-view key sites).
        grid: ``(h, w)`` patch grid of both views.
        patch_size: pixels per patch side.
        resid_hook: hook of the residual stream entering this layer for the key view (register
            norms), or ``None`` when the model declares no such probe site.
        resid_site: that probe site's name.
        n_prefix: the site's special tokens before each view's patches (key indices of the
            register statistics count them first).
    """

    site: AttentionSite
    query_view: int
    key_view: int
    key_offset: int
    grid: tuple[int, int]
    patch_size: int
    resid_hook: str | None = None
    resid_site: str | None = None
    n_prefix: int = 0

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.site.name, self.query_view, self.key_view)

    @property
    def same_view(self) -> bool:
        return self.query_view == self.key_view

    @property
    def n_tokens(self) -> int:
        """Patches of one view."""
        return self.grid[0] * self.grid[1]

    @property
    def n_keys(self) -> int:
        """Keys of the block: the view's special tokens, then its patches."""
        return self.n_prefix + self.n_tokens


#: Labels a head can get (several at once; ``"other"`` when none applies).
LABELS = ("correspondence", "register", "local", "other")


def px_label(t: float) -> str:
    """Column suffix of a pixel threshold: ``16.0 -> "16px"``."""
    return f"{t:g}px"


@dataclass(frozen=True)
class HeadThresholds(ConfigMixin):
    """When a head gets a label. *Lift* is a score's gain over uniform attention,
    ``(score − chance) / (1 − chance)``: 0 for uniform attention, 1 for a perfect head.

    A row is labelled only from a block that receives at least ``min_block_mass`` of its queries'
    attention (always true for a block that is a whole pattern).
    """

    correspondence_px: float | int | None = None
    """Pixel threshold whose recall decides (and picks the best head per layer); ``None``: the
    patch size if it was scored, else the middle scored threshold."""
    correspondence_recall: float | int = 0.3
    """Correspondence head: recall at ``correspondence_px`` at least this…"""
    correspondence_lift: float | int = 0.2
    """…and its lift over chance at least this (cross-view blocks only)."""
    register_lift: float | int = 0.5
    """Register head: lift of the attention mass on the sample's top-k keys at least this."""
    local_lift: float | int = 0.5
    """Local head: lift of the mass within the local radius at least this (same-view blocks only)."""
    min_block_mass: float | int = 0.05
    """Ignore a block that gets less than this share of its queries' attention."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"HeadThresholds.{f.name} must be a finite number, got {v!r}")
        for name in ("correspondence_recall", "min_block_mass"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"HeadThresholds.{name} is a fraction in [0, 1], got {getattr(self, name)}")


@dataclass(frozen=True, order=True)
class HeadRef:
    """One scored head: ``site`` name, block ``query_view → key_view``, ``head`` index."""

    site: str
    query_view: int
    key_view: int
    head: int

    def __str__(self) -> str:
        return f"{self.site}[{self.query_view}->{self.key_view}].h{self.head}"


@dataclass(frozen=True)
class BestHead:
    """The best correspondence head of one layer of one block group (the paper's Figure 5 point).

    ``recall``, ``chance`` and ``same_position`` map each pixel threshold to a fraction;
    ``chance`` is uniform attention, ``same_position`` predicts the query's own grid position.
    """

    stack: str
    kind: str
    query_view: int
    key_view: int
    layer: int
    site: str
    head: int
    recall: dict[float, float]
    chance: dict[float, float]
    same_position: dict[float, float]
    mul: float
    abs: float
    n_queries: int

    @property
    def group(self) -> tuple[str, str, int, int]:
        return (self.stack, self.kind, self.query_view, self.key_view)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("recall", "chance", "same_position"):
            d[k] = {px_label(t): v for t, v in d[k].items()}
        return d


@dataclass(frozen=True)
class RegisterHead:
    """A register head and its register tokens, ready for a knockout.

    Attributes:
        ref: the head.
        pattern_hook / scores_hook: where to edit its attention (post- / pre-softmax).
        layout: the site's pattern layout (``"view"``, ``"stacked"``, ``"global"``).
        layer, stack, kind: the site's.
        tokens: token indices within the key view's tokens (its ``n_prefix`` special tokens first,
            then the patch grid) most often among a sample's top-k keys, most frequent first (at
            most ``register_k``).
        frequency: for each token, the share of samples in which it was in the top-k set.
        pattern_key_index: the same tokens as indices along the pattern's key axis
            (``tokens + key_offset``).
        register_mass / register_lift: the head's scores.
        norm_ratio: residual norm at the sample's top keys over the median key (NaN if unknown).
    """

    ref: HeadRef
    pattern_hook: str
    scores_hook: str
    layout: str
    layer: int
    stack: str
    kind: str
    tokens: tuple[int, ...]
    frequency: tuple[float, ...]
    pattern_key_index: tuple[int, ...]
    register_mass: float
    register_lift: float
    norm_ratio: float

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ref"] = dataclasses.asdict(self.ref)
        return d


def _lift(score: Tensor, chance: Tensor) -> Tensor:
    return torch.where(chance < 1, (score - chance) / (1 - chance).clamp_min(1e-12), torch.nan)


def _f(x: Any) -> float:
    return float(x)


@dataclass
class HeadScores:
    """Per-head scores of a model over a dataset (built by :func:`~mv_interp.heads.score_heads`).

    >>> scores = score_heads(model, views)
    >>> scores.table()                           # one dict per (site, query view, key view, head)
    >>> scores.classify(HeadThresholds(register_lift=0.7)).heads("register")
    >>> scores.best_per_layer()                  # [BestHead]: Figure 5
    >>> scores.register_heads()                  # [RegisterHead]: heads + tokens for a knockout
    >>> scores.save("out/", figures=False)       # scores.csv, scores.json, state.pt
    """

    units: list[UnitInfo]
    sums: dict[tuple[str, int, int], dict[str, Tensor]]
    config: ScoreConfig
    thresholds_px: tuple[float, ...]
    n_pairs: int
    n_pairs_with_geometry: int = 0
    model_name: str = ""
    family: str = ""
    thresholds: HeadThresholds = field(default_factory=HeadThresholds)

    def __post_init__(self) -> None:
        self.units = sorted(self.units, key=lambda u: (u.site.stack != "enc", u.site.stack, u.site.layer,
                                                        natural_key(u.site.name), u.query_view, u.key_view))
        self._metrics: dict[tuple, dict[str, Tensor]] = {}

    # -- scores --------------------------------------------------------------------------
    @property
    def primary_px(self) -> float:
        """The pixel threshold that decides correspondence labels and the best head per layer."""
        if self.thresholds.correspondence_px is not None:
            t = float(self.thresholds.correspondence_px)
            if t not in self.thresholds_px:
                raise ValueError(f"HeadThresholds.correspondence_px={t:g} was not scored; scored thresholds: "
                                 f"{[f'{x:g}' for x in self.thresholds_px]}")
            return t
        p = float(self.units[0].patch_size) if self.units else 16.0
        return p if p in self.thresholds_px else self.thresholds_px[len(self.thresholds_px) // 2]

    def unit(self, site: str, query_view: int, key_view: int) -> UnitInfo:
        for u in self.units:
            if u.key == (site, query_view, key_view):
                return u
        raise UnknownNameError(f"no scored block {site!r} {query_view}->{key_view}; blocks: "
                       f"{[f'{u.site.name} {u.query_view}->{u.key_view}' for u in self.units][:12]}")

    def metrics(self, unit: UnitInfo) -> dict[str, Tensor]:
        """Per-head scores ``{name: [head]}`` of one block (NaN where not computed)."""
        if unit.key in self._metrics:
            return self._metrics[unit.key]
        s = self.sums.get(unit.key, {})
        H = unit.site.n_heads
        nan = torch.full((H,), math.nan, dtype=torch.float64)

        def per_head(x: Tensor) -> Tensor:
            return x.double().expand(H).clone() if x.numel() == 1 else x.double()

        m: dict[str, Tensor] = {}
        rows = s["rows"].double() if "rows" in s else None
        m["block_mass"] = s["block_mass"].double() / rows if rows is not None else nan
        for t in self.thresholds_px:
            for name in ("corr_recall", "corr_chance", "corr_same_pos"):
                m[f"{name}@{px_label(t)}"] = nan
        n_corr = float(s["corr_rows"]) if "corr_rows" in s else 0.0
        if n_corr > 0:
            for i, t in enumerate(self.thresholds_px):
                m[f"corr_recall@{px_label(t)}"] = s["corr_hits"][:, i].double() / n_corr
                m[f"corr_chance@{px_label(t)}"] = per_head(s["corr_chance"][i] / n_corr)
                m[f"corr_same_pos@{px_label(t)}"] = per_head(s["corr_same_pos"][i] / n_corr)
            t0 = px_label(self.primary_px)
            m["corr_lift"] = _lift(m[f"corr_recall@{t0}"], m[f"corr_chance@{t0}"])
            m["corr_mul"] = s["corr_mul_num"].double() / s["corr_mul_den"].double().clamp_min(1e-12)
            m["corr_mul_chance"] = per_head(s["corr_mul_chance"] / n_corr)
            m["corr_abs"] = s["corr_abs"].double() / n_corr
            m["corr_abs_chance"] = per_head(s["corr_abs_chance"] / n_corr)
        else:
            for name in ("corr_lift", "corr_mul", "corr_mul_chance", "corr_abs", "corr_abs_chance"):
                m[name] = nan
        m["corr_n"] = torch.full((H,), n_corr, dtype=torch.float64)
        if "register_mass" in s:
            samples = s["samples"].double()
            m["register_mass"] = s["register_mass"].double() / samples
            m["register_chance"] = per_head(s["register_chance"].double() / samples)
            m["register_lift"] = _lift(m["register_mass"], m["register_chance"])
            if "register_norm_samples" in s:
                m["register_norm_ratio"] = s["register_norm_ratio"].double() / s["register_norm_samples"].double()
            else:
                m["register_norm_ratio"] = nan
        else:
            for name in ("register_mass", "register_chance", "register_lift", "register_norm_ratio"):
                m[name] = nan
        if "local_mass" in s:
            m["local_mass"] = s["local_mass"].double() / rows
            m["local_chance"] = per_head(s["local_chance"].double() / rows)
            m["local_lift"] = _lift(m["local_mass"], m["local_chance"])
            m["diag_mass"] = s["diag_mass"].double() / rows
            m["diag_chance"] = torch.full((H,), 1 / unit.n_tokens, dtype=torch.float64)
        else:
            for name in ("local_mass", "local_chance", "local_lift", "diag_mass", "diag_chance"):
                m[name] = nan
        self._metrics[unit.key] = m
        return m

    def register_tokens(self, unit: UnitInfo, head: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """The key tokens most often among a sample's registers (top-k keys of the query-averaged
        attention that also get more than a uniform share) for one head, most frequent first (ties:
        larger mean share first), with the share of samples where each was a register."""
        s = self.sums.get(unit.key, {})
        if "register_counts" not in s:
            return (), ()
        counts = s["register_counts"][head].double()
        share = s["register_key_mass"][head].double()
        k = min(self.config.register_k, counts.numel())
        order = sorted(range(counts.numel()), key=lambda i: (-float(counts[i]), -float(share[i]), i))[:k]
        order = [i for i in order if counts[i] > 0]
        samples = float(s["samples"])
        return tuple(order), tuple(float(counts[i]) / samples for i in order)

    # -- labels --------------------------------------------------------------------------
    def classify(self, thresholds: HeadThresholds | None = None, **changes: Any) -> HeadScores:
        """The same scores labelled with other thresholds (``HeadThresholds`` or field changes)."""
        th = thresholds or self.thresholds
        if changes:
            th = th.replace(**changes)
        return dataclasses.replace(self, thresholds=th)

    def _labels(self, unit: UnitInfo, m: dict[str, Tensor], h: int) -> tuple[str, ...]:
        th = self.thresholds
        if not float(m["block_mass"][h]) >= th.min_block_mass:
            return ("other",)
        labels = []
        t0 = px_label(self.primary_px)
        rec, lift = float(m[f"corr_recall@{t0}"][h]), float(m["corr_lift"][h])
        if not unit.same_view and rec >= th.correspondence_recall and lift >= th.correspondence_lift:
            labels.append("correspondence")
        if float(m["register_lift"][h]) >= th.register_lift:
            labels.append("register")
        if unit.same_view and float(m["local_lift"][h]) >= th.local_lift:
            labels.append("local")
        return tuple(labels) or ("other",)

    def labels(self) -> dict[HeadRef, tuple[str, ...]]:
        """``{HeadRef: labels}`` for every scored head."""
        out = {}
        for u in self.units:
            m = self.metrics(u)
            for h in range(u.site.n_heads):
                out[HeadRef(u.site.name, u.query_view, u.key_view, h)] = self._labels(u, m, h)
        return out

    def heads(self, label: str) -> list[HeadRef]:
        """Every head carrying ``label`` (one of :data:`LABELS`)."""
        if label not in LABELS:
            raise ValueError(f"unknown label {label!r}; labels: {LABELS}")
        return [ref for ref, labs in self.labels().items() if label in labs]

    # -- tables --------------------------------------------------------------------------
    def table(self) -> list[dict[str, Any]]:
        """One flat dict per head (CSV-ready; NaN where a score does not apply)."""
        rows = []
        for u in self.units:
            m = self.metrics(u)
            for h in range(u.site.n_heads):
                tokens, freq = self.register_tokens(u, h)
                row: dict[str, Any] = {
                    "site": u.site.name, "stack": u.site.stack, "layer": u.site.layer, "kind": u.site.kind,
                    "query_view": u.query_view, "key_view": u.key_view, "head": h, "same_view": u.same_view,
                    "labels": "+".join(self._labels(u, m, h)),
                }
                row.update({name: _f(v[h]) for name, v in m.items()})
                row["register_tokens"] = list(tokens)
                row["register_token_freq"] = [round(f, 4) for f in freq]
                row["pattern_hook"] = u.site.pattern_hook
                rows.append(row)
        return rows

    def best_per_layer(self, threshold_px: float | None = None) -> list[BestHead]:
        """Per cross-view block group and layer, the head with the highest recall at
        ``threshold_px`` (default :attr:`primary_px`); the paper's Figure 5 curve."""
        t0 = float(threshold_px) if threshold_px is not None else self.primary_px
        if t0 not in self.thresholds_px:
            raise ValueError(f"threshold_px={t0:g} was not scored; scored: {[f'{t:g}' for t in self.thresholds_px]}")
        out = []
        for u in self.units:
            m = self.metrics(u)
            if u.same_view or not float(m["corr_n"][0]) > 0:
                continue
            rec = m[f"corr_recall@{px_label(t0)}"]
            h = int(torch.nan_to_num(rec, nan=-1.0).argmax())
            out.append(BestHead(
                u.site.stack, u.site.kind, u.query_view, u.key_view, u.site.layer, u.site.name, h,
                {t: _f(m[f"corr_recall@{px_label(t)}"][h]) for t in self.thresholds_px},
                {t: _f(m[f"corr_chance@{px_label(t)}"][h]) for t in self.thresholds_px},
                {t: _f(m[f"corr_same_pos@{px_label(t)}"][h]) for t in self.thresholds_px},
                _f(m["corr_mul"][h]), _f(m["corr_abs"][h]), int(m["corr_n"][h]),
            ))
        return out

    def curve(self, threshold_px: float | None = None) -> dict[tuple[str, str, int, int], dict[str, Any]]:
        """Figure 5 as plain lists, per block group ``(stack, kind, query_view, key_view)``:
        ``{"layer": [...], "head": [...], "recall": {t: [...]}, "chance": {t: [...]},
        "same_position": {t: [...]}}`` (pixel thresholds ``t`` as floats)."""
        out: dict[tuple, dict[str, Any]] = {}
        for b in sorted(self.best_per_layer(threshold_px), key=lambda b: (b.group, b.layer)):
            g = out.setdefault(b.group, {"layer": [], "head": [], "site": [],
                                         **{k: {t: [] for t in self.thresholds_px}
                                            for k in ("recall", "chance", "same_position")}})
            g["layer"].append(b.layer)
            g["head"].append(b.head)
            g["site"].append(b.site)
            for k in ("recall", "chance", "same_position"):
                for t in self.thresholds_px:
                    g[k][t].append(getattr(b, k)[t])
        return out

    def register_heads(self) -> list[RegisterHead]:
        """Every head labelled ``register`` with its most frequent register tokens."""
        out = []
        labels = self.labels()
        for u in self.units:
            m = self.metrics(u)
            for h in range(u.site.n_heads):
                ref = HeadRef(u.site.name, u.query_view, u.key_view, h)
                if "register" not in labels[ref]:
                    continue
                tokens, freq = self.register_tokens(u, h)
                out.append(RegisterHead(ref, u.site.pattern_hook, u.site.scores_hook, u.site.layout, u.site.layer,
                                        u.site.stack, u.site.kind, tokens, freq,
                                        tuple(t + u.key_offset for t in tokens), _f(m["register_mass"][h]),
                                        _f(m["register_lift"][h]), _f(m["register_norm_ratio"][h])))
        return out

    def summary(self) -> str:
        """A few lines for a terminal: counts per label and the best correspondence head per layer."""
        labels = self.labels()
        lines = [f"{self.model_name}: {len(labels)} heads in {len(self.units)} blocks over {self.n_pairs} pairs "
                 f"({self.n_pairs_with_geometry} with geometry)"]
        counts = {lab: sum(lab in v for v in labels.values()) for lab in LABELS}
        lines.append("labels: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        t0 = self.primary_px
        for b in self.best_per_layer():
            lines.append(f"  best correspondence head {b.site} q{b.query_view}->k{b.key_view} h{b.head}: "
                         f"recall@{t0:g}px {b.recall[t0]:.3f} (chance {b.chance[t0]:.3f}, "
                         f"same position {b.same_position[t0]:.3f})")
        return "\n".join(lines)

    # -- files ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: metadata, thresholds, rows, best heads per layer, register heads (NaN → null)."""
        return jsonable({
            "model": self.model_name, "family": self.family, "n_pairs": self.n_pairs,
            "n_pairs_with_geometry": self.n_pairs_with_geometry, "thresholds_px": list(self.thresholds_px),
            "primary_px": self.primary_px, "config": self.config.to_dict(), "thresholds": self.thresholds.to_dict(),
            "rows": self.table(), "best_per_layer": [b.to_dict() for b in self.best_per_layer()],
            "register_heads": [r.to_dict() for r in self.register_heads()],
        })

    def write_csv(self, path: str | Path) -> Path:
        rows = self.table()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["site"], lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (";".join(map(str, v)) if isinstance(v, list) else
                                 (f"{v:.6g}" if isinstance(v, float) else v)) for k, v in r.items()})
        return atomic_write(path, lambda tmp: Path(tmp).write_text(buf.getvalue()))

    def state(self) -> dict[str, Any]:
        """Everything :meth:`load` needs (tensors + plain data, loadable with ``weights_only=True``)."""
        return {
            "units": [{**dataclasses.asdict(u), "site": dataclasses.asdict(u.site)} for u in self.units],
            "sums": {"|".join(map(str, k)): v for k, v in self.sums.items()},
            "config": self.config.to_dict(), "thresholds_px": list(self.thresholds_px), "n_pairs": self.n_pairs,
            "n_pairs_with_geometry": self.n_pairs_with_geometry, "model_name": self.model_name,
            "family": self.family, "thresholds": self.thresholds.to_dict(),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> HeadScores:
        units = []
        for d in state["units"]:
            site = dict(d["site"])
            site["key_views"] = tuple(site["key_views"])
            units.append(UnitInfo(**{**d, "site": AttentionSite(**site), "grid": tuple(d["grid"])}))
        sums = {}
        for key, v in state["sums"].items():
            name, qv, kv = key.rsplit("|", 2)
            sums[(name, int(qv), int(kv))] = dict(v)
        return cls(units, sums, ScoreConfig.from_dict(state["config"]), tuple(state["thresholds_px"]),
                   int(state["n_pairs"]), int(state["n_pairs_with_geometry"]), state["model_name"], state["family"],
                   HeadThresholds.from_dict(state["thresholds"]))

    #: What draws the figures of saved scores: :func:`mv_interp.heads.figures.save_score_figures`
    #: registers itself here when ``mv_interp.heads`` is imported, so this data module never
    #: imports the plotting layer above it.
    figure_writer: ClassVar[Callable[[HeadScores, Path], dict[str, Path]] | None] = None

    def save(self, out_dir: str | Path, figures: bool | None = None) -> dict[str, Path]:
        """Write ``scores.csv``, ``scores.json`` and ``state.pt`` (reload with :meth:`load`).
        Returns ``{name: path}``.

        Figures are separate: ``mv_interp.heads.save_score_figures(scores, out_dir)`` draws the
        heatmaps, label map and correspondence curve. ``figures=True`` still draws them here; the
        default (``None``) does too, for code written before, with a ``DeprecationWarning``:
        pass ``figures=False`` and call ``save_score_figures`` for the figures.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"csv": self.write_csv(out / "scores.csv")}
        text = dumps_json(self.to_dict())
        paths["json"] = atomic_write(out / "scores.json", lambda tmp: Path(tmp).write_text(text))
        state = self.state()
        paths["state"] = atomic_write(out / "state.pt", lambda tmp: torch.save(state, tmp))
        if figures is None:
            warnings.warn("HeadScores.save() drawing figures by default is deprecated: call save(out_dir, "
                          "figures=False) and mv_interp.heads.save_score_figures(scores, out_dir)",
                          DeprecationWarning, stacklevel=2)
            figures = True
        if figures:
            writer = type(self).figure_writer
            if writer is None:
                raise RuntimeError("no figure writer is registered; import mv_interp.heads (which registers "
                                   "mv_interp.heads.figures.save_score_figures) or pass figures=False")
            paths.update(writer(self, out))
        return paths

    @classmethod
    def load(cls, path: str | Path) -> HeadScores:
        """Reload saved scores (a directory written by :meth:`save`, or its ``state.pt``)."""
        path = Path(path)
        if path.is_dir():
            path = path / "state.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no saved head scores here (expected state.pt written by HeadScores.save)")
        return cls.from_state(torch.load(path, map_location="cpu", weights_only=True))

    def __repr__(self) -> str:
        return (f"HeadScores({self.model_name}, {len(self.units)} blocks, {self.n_pairs} pairs, "
                f"thresholds_px={[f'{t:g}' for t in self.thresholds_px]})")


def rows_by_group(rows: Iterable[Mapping[str, Any]]) -> dict[tuple, list[Mapping[str, Any]]]:
    """Rows grouped by (stack, kind, query view, key view) — one heatmap panel each."""
    out: dict[tuple, list] = {}
    for r in rows:
        out.setdefault((r["stack"], r["kind"], r["query_view"], r["key_view"]), []).append(r)
    # encoder first, self- before cross-attention, then by views: the order a reader walks the model
    order = sorted(out, key=lambda g: (g[0] != "enc", g[0], g[1] != "self", g[1], g[2], g[3]))
    return {g: out[g] for g in order}


def group_title(group: Sequence) -> str:
    stack, kind, qv, kv = group
    return f"{stack} {kind}-attn · queries v{qv} → keys v{kv}"


#: Most block groups a figure draws one panel each for (more: many views; see :func:`figure_groups`).
MAX_PANELS = 9


def figure_groups(groups: Iterable[tuple], max_groups: int = MAX_PANELS) -> list[tuple]:
    """The cross-view block groups ``(stack, kind, query view, key view)`` a per-group figure draws.

    All of them when at most ``max_groups`` (a pair model: v2 → v1 and v1 → v2). With many views
    attention over all frames gives N·(N−1) groups; the figures then keep the groups whose keys are
    view 1 — every other view's queries into the reference frame — and, if those are still more than
    ``max_groups``, the queries of view 2 alone. The tables keep every group."""
    groups = list(dict.fromkeys(groups))
    if len(groups) <= max_groups:
        return groups
    into_ref = [g for g in groups if g[3] == 1]
    if 0 < len(into_ref) <= max_groups:
        return into_ref
    return [g for g in into_ref if g[2] == 2] or groups[:max_groups]


def panel_rows(rows: Iterable[Mapping[str, Any]], max_panels: int = MAX_PANELS
               ) -> dict[tuple, tuple[str, list[dict[str, Any]]]]:
    """``{group: (title, rows)}`` for the per-group heatmap panels: :func:`rows_by_group` when there
    are at most ``max_panels`` groups; else (many views) one panel per stack, kind and *within a
    view* / *across views*, each cell the mean over the view pairs it merges (NaN-aware) and each
    head's labels the ones it has in at least half of them."""
    groups = rows_by_group(rows)
    if len(groups) <= max_panels:
        return {g: (group_title(g), list(rs)) for g, rs in groups.items()}
    merged: dict[tuple, list[list[Mapping[str, Any]]]] = {}
    for (stack, kind, qv, kv), rs in groups.items():
        merged.setdefault((stack, kind, qv == kv), []).append(rs)
    out: dict[tuple, tuple[str, list[dict[str, Any]]]] = {}
    for (stack, kind, same), members in merged.items():
        cells: dict[tuple[int, int], list[Mapping[str, Any]]] = {}
        for rs in members:
            for r in rs:
                cells.setdefault((r["layer"], r["head"]), []).append(r)
        merged_rows = []
        for (layer, head), rr in sorted(cells.items()):
            row: dict[str, Any] = {"stack": stack, "kind": kind, "layer": layer, "head": head}
            for col, v in rr[0].items():
                if isinstance(v, float):
                    vals = [float(x[col]) for x in rr if isinstance(x.get(col), (int, float)) and not math.isnan(x[col])]
                    row[col] = sum(vals) / len(vals) if vals else math.nan
            votes: dict[str, int] = {}
            for x in rr:
                for lab in filter(None, str(x.get("labels", "")).split("+")):
                    votes[lab] = votes.get(lab, 0) + 1
            row["labels"] = "+".join(lab for lab, n in votes.items() if 2 * n >= len(rr))
            merged_rows.append(row)
        where = "within each view" if same else "queries → another view"
        out[(stack, kind, same)] = (f"{stack} {kind}-attn · {where} (mean of {len(members)} view pairs)", merged_rows)
    return out
