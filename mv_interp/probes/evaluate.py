"""Per-site evaluation of probes, the pointmap lens and the random-backbone control.

For every method (each pointmap probe kind, the lens, each control probe kind) and every
location, over held-out pairs:

- ``e1_v{v}`` / ``e1``: the scale–shift-invariant pointmap error (E.1) per view / averaged;
- ``e2_aligned_v{v}`` (v ≥ 2): the confidence-weighted Procrustes-aligned error of that view (E.2);
- ``absrel_v{v}`` / ``delta1_v{v}``: depth metrics after a least-squares scale-and-shift fit —
  for pointmap methods the predicted ``z`` (view 1's frame) against the ground truth's ``z`` in
  view 1's frame; for depth probes the view's own depth;
- per pointmap method, the per-sublayer contributions of the decoder's skip connections to the
  aligned view-2 error (Figure 4, :func:`mv_interp.metrics.sublayer_contributions`).

All errors are in the units documented in ``docs/metrics.md``.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import distributed as D
from .. import metrics as M
from ..errors import UnknownNameError
from ..io import atomic_write, dumps_json, nan_if_none, read_json
from ..types import ModelLike, as_module
from ..data.views import BatchesLike, is_views
from .data import EVAL_SEED, Batch, SyntheticSource, batch_size_of, check_batch, slice_batch
from .lens import lens_sites, pointmap_lens
from .probeset import ProbeSet
from .sites import Location, group_locations, read_tokens

LENS = "lens"
CONTROL_PREFIX = "control_"
INFO_COLUMNS = ("method", "location", "stack", "layer", "kind", "order", "n_pairs")


@dataclass
class ProbeTable:
    """Per-site metrics of every method, with the Figure-4 contributions.

    Attributes:
        rows: one dict per (method, location): :data:`INFO_COLUMNS` then metric means over pairs
            (NaN where a metric does not apply, e.g. E.1 for a depth probe).
        contributions: per pointmap method, :class:`~mv_interp.metrics.SublayerContributions` of the
            aligned view-2 error along the decoder.
        per_pair: ``{method: {location: {metric: [n_pairs] array}}}`` (the values behind the means).
        meta: what was evaluated (pairs, seeds, probe runs).
    """

    rows: list[dict[str, Any]]
    contributions: dict[str, M.SublayerContributions] = field(default_factory=dict)
    per_pair: dict[str, dict[str, dict[str, np.ndarray]]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(r["method"] for r in self.rows))

    @property
    def locations(self) -> list[str]:
        """Location names in processing order."""
        seen = {}
        for r in sorted(self.rows, key=lambda r: r["order"]):
            seen.setdefault(r["location"], None)
        return list(seen)

    @property
    def metric_names(self) -> list[str]:
        return [k for k in self.rows[0] if k not in INFO_COLUMNS] if self.rows else []

    def series(self, method: str, metric: str) -> list[float]:
        """``metric`` of ``method`` at every location in :attr:`locations` order (NaN where absent)."""
        by_loc = {r["location"]: r.get(metric, math.nan) for r in self.rows if r["method"] == method}
        return [float(by_loc.get(loc, math.nan)) for loc in self.locations]

    def value(self, method: str, location: str, metric: str) -> float:
        for r in self.rows:
            if r["method"] == method and r["location"] == location:
                return float(r[metric])
        raise UnknownNameError(f"no row for method {method!r} at {location!r}; methods: {self.methods}")

    def to_csv(self) -> str:
        buf = io.StringIO()
        cols = list(INFO_COLUMNS) + self.metric_names
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
        return buf.getvalue()

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "contributions": {k: v.to_dict() for k, v in self.contributions.items()},
                "meta": self.meta}

    def write(self, directory: str | os.PathLike) -> dict[str, Path]:
        """``metrics.csv``, ``metrics.json`` (rows + contributions + meta), ``contributions.csv``
        and ``metrics_per_pair.npz``, each written atomically."""
        d = Path(directory)
        files = {}
        files["csv"] = atomic_write(d / "metrics.csv", lambda p: Path(p).write_text(self.to_csv()))
        text = dumps_json(self.to_dict())
        files["json"] = atomic_write(d / "metrics.json", lambda p: Path(p).write_text(text))
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["method", "block", "kind", "error_before", "error_after", "delta", "rel_change", "rel_to_input"])
        for method, c in self.contributions.items():
            for s in c.skips:
                w.writerow([method, s.block, s.kind] + [f"{x:.6g}" for x in (s.error_before, s.error_after, s.delta,
                                                                            s.rel_change, s.rel_to_input)])
        files["contributions"] = atomic_write(d / "contributions.csv", lambda p: Path(p).write_text(buf.getvalue()))
        arrays = {f"{m}/{loc}/{k}": v for m, locs in self.per_pair.items() for loc, ms in locs.items()
                  for k, v in ms.items()}

        def save_npz(p):
            with open(p, "wb") as f:
                np.savez_compressed(f, **arrays)

        files["per_pair"] = atomic_write(d / "metrics_per_pair.npz", save_npz)
        return files

    @classmethod
    def load(cls, path: str | os.PathLike) -> ProbeTable:
        """Read ``metrics.json`` (a file or the directory holding it); per-pair values from the npz if present."""
        path = Path(path)
        if path.is_dir():
            path = path / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"no metrics table at {path} (written by `mv-interp probes eval`)")
        d = read_json(path)
        contributions = {}
        for method, c in d.get("contributions", {}).items():
            skips = tuple(M.SkipChange(**{k: _number(v) for k, v in s.items()}) for s in c["skips"])
            by_kind = {k: {m: nan_if_none(x) for m, x in v.items()} for k, v in c["by_kind"].items()}
            contributions[method] = M.SublayerContributions(nan_if_none(c["input_error"]), nan_if_none(c["final_error"]),
                                                            skips, by_kind, c["average"])
        d["rows"] = [{k: _number(v) for k, v in r.items()} for r in d["rows"]]
        per_pair: dict[str, dict[str, dict[str, np.ndarray]]] = {}
        npz = path.with_name("metrics_per_pair.npz")
        if npz.is_file():
            with np.load(npz) as z:
                for key in z.files:
                    m, loc, k = key.split("/")
                    per_pair.setdefault(m, {}).setdefault(loc, {})[k] = z[key]
        return cls(d["rows"], contributions, per_pair, d.get("meta", {}))


def _number(value: Any) -> Any:
    """A table cell read back from JSON: ``null`` (how NaN is written) becomes NaN again."""
    return nan_if_none(value) if value is None else value


# --------------------------------------------------------------------------------------
# Metrics of one batch
# --------------------------------------------------------------------------------------


def pointmap_metrics(preds: Sequence[Mapping[str, Tensor]], views: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Per-pair metrics ``{name: [batch]}`` of one location's predicted pointmaps (one dict per view)."""
    pts = [p["pts3d"] for p in preds]
    gts = [v["pts3d"] for v in views]
    valid = [v["valid"] for v in views]
    e1 = M.scale_shift_invariant_error(pts, gts, valid)
    out = {f"e1_v{v + 1}": e1.per_view[:, v] for v in range(len(views))}
    out["e1"] = e1.mean
    for v in range(1, len(views)):
        out[f"e2_aligned_v{v + 1}"] = M.aligned_view2_error(pts[v], gts[v], preds[v]["conf"], valid[v])
    for v in range(len(views)):
        d = M.depth_metrics(pts[v][..., 2], gts[v][..., 2], valid[v])
        out[f"absrel_v{v + 1}"], out[f"delta1_v{v + 1}"] = d.absrel, d.delta1
    return out


def depth_probe_metrics(preds: Sequence[Mapping[str, Tensor]],
                        views: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Per-pair depth metrics of one location's depth-probe outputs against each view's own depth."""
    out = {}
    for v, (p, view) in enumerate(zip(preds, views), start=1):
        d = M.depth_metrics(p["depth"], view["depth"], view["valid"])
        out[f"absrel_v{v}"], out[f"delta1_v{v}"] = d.absrel, d.delta1
    return out


def _metric_columns(n_views: int) -> list[str]:
    cols = [f"e1_v{v}" for v in range(1, n_views + 1)] + ["e1"]
    cols += [f"e2_aligned_v{v}" for v in range(2, n_views + 1)]
    for v in range(1, n_views + 1):
        cols += [f"absrel_v{v}", f"delta1_v{v}"]
    return cols


def figure4_path(locations: Sequence[Location]) -> list[Location]:
    """The decoder input followed by every skip-connection residual, in processing order."""
    path = [loc for loc in locations if loc.kind == "dec_in" or (loc.stack == "dec" and loc.is_skip_residual)]
    return path if path and path[0].kind == "dec_in" and len(path) > 1 else []


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


def eval_pairs(model: ModelLike, n: int = 64, seed: int = EVAL_SEED, device: Any = None, scene: Any = None) -> Batch:
    """``n`` held-out synthetic pairs at the model's input size (scenes ``seed … seed + n − 1``)."""
    module = as_module(model)
    return SyntheticSource(tuple(module.config.img_size), seed=seed, scene=scene).pairs(n, device or module.device)


def _synthetic_batches(module, n: int, batch_size: int) -> Iterable[Batch | None]:
    """The pairs of :func:`eval_pairs` ``(n)``, rendered one batch at a time (memory stays flat);
    under ``torch.distributed`` each rank renders only its batches (``None`` for the others')."""
    from ..data import render_views

    config = SyntheticSource(tuple(module.config.img_size), seed=EVAL_SEED).config
    W, rank = D.world_size(), D.rank()
    for i, start in enumerate(range(0, n, batch_size)):
        yield render_views(min(batch_size, n - start), config, seed=EVAL_SEED + start, device=module.device) \
            if i % W == rank else None


def _batches(data: BatchesLike, batch_size: int, need: Sequence[str]) -> Iterable[Batch | None]:
    """The batches of ``data``; under ``torch.distributed`` batch ``i`` goes to rank ``i mod W``
    (``None`` in its place on the others)."""
    W, rank = D.world_size(), D.rank()
    if isinstance(data, (list, tuple)) and data and isinstance(data[0], dict):
        check_batch(list(data), need)
        n = batch_size_of(list(data))
        for j, i in enumerate(range(0, n, batch_size)):
            yield slice_batch(list(data), i, i + batch_size) if j % W == rank else None
    else:
        for j, batch in enumerate(data):
            if batch is not None and j % W == rank:
                check_batch(batch, need)
                yield batch
            else:
                yield None


class _Accumulator:
    """Per-pair metric values, batch by batch (``batch`` counts the batches seen, this rank's or not)."""

    def __init__(self):
        self.values: dict[str, dict[str, dict[str, list[np.ndarray]]]] = {}
        self.batch = 0
        self.batches: list[int] = []  # global index of each batch this rank added

    def skip(self) -> None:
        self.batch += 1

    def add(self, method: str, loc: str, metrics: Mapping[str, Tensor]) -> None:
        slot = self.values.setdefault(method, {}).setdefault(loc, {})
        for k, v in metrics.items():
            slot.setdefault(k, []).append(v.detach().float().cpu().numpy())

    def next_batch(self) -> None:
        self.batches.append(self.batch)
        self.batch += 1

    def merge_ranks(self) -> None:
        """Every rank's values, in the global batch order (what one process would hold)."""
        parts = D.gather_objects((self.values, self.batches))
        merged: dict = {}
        for values, batches in parts:
            for m, locs in values.items():
                for loc, ms in locs.items():
                    for k, arrays in ms.items():
                        merged.setdefault(m, {}).setdefault(loc, {}).setdefault(k, []).extend(zip(batches, arrays))
        self.values = {m: {loc: {k: [a for _, a in sorted(v, key=lambda x: x[0])] for k, v in ms.items()}
                           for loc, ms in locs.items()} for m, locs in merged.items()}

    def result(self) -> dict[str, dict[str, dict[str, np.ndarray]]]:
        return {m: {loc: {k: np.concatenate(v) for k, v in ms.items()} for loc, ms in locs.items()}
                for m, locs in self.values.items()}


def _add_metrics(acc: _Accumulator, method: str, target: str, out: Mapping[str, Mapping[str, Tensor]],
                 locations: Sequence[Location], views: Batch) -> None:
    """Metrics of every location at once: the metric functions are batched over items, so the
    locations (with the same views) are stacked on the batch axis and split afterwards."""
    fn = pointmap_metrics if target == "pointmap" else depth_probe_metrics
    groups: dict[tuple[int, ...], list[Location]] = {}
    for loc in locations:
        if all(s.name in out for s in loc.sites):
            groups.setdefault(loc.views, []).append(loc)
    B = batch_size_of(views)
    for vs, locs in groups.items():
        L = len(locs)
        preds = [{k: torch.cat([out[loc.site(v).name][k] for loc in locs]) for k in out[locs[0].site(v).name]}
                 for v in vs]
        gts = [{k: t.repeat(L, *([1] * (t.ndim - 1))) for k, t in views[v - 1].items()
                if k in ("pts3d", "valid", "depth")} for v in vs]
        values = fn(preds, gts)
        for i, loc in enumerate(locs):
            acc.add(method, loc.name, {k: t[i * B:(i + 1) * B] for k, t in values.items()})


def _run(module, sites, views, n_views):
    imgs = [v["img"] for v in views]
    _, acts = module.capture(*imgs, names=sorted({s.hook for s in sites}))
    return read_tokens(acts, sites, n_views)


@torch.no_grad()
def evaluate_probes(model: ModelLike, probes: ProbeSet | None = None, data: int | BatchesLike = 64, *, control: ProbeSet | None = None,
                    lens: bool = True, batch_size: int = 8, check: bool = True, progress: bool = False) -> ProbeTable:
    """Evaluate probes, the pointmap lens and the control per site on held-out pairs.

    Args:
        model: the backbone the probes were trained on (MVModel or hooked module).
        probes: a :class:`ProbeSet` (``None``: only the lens, at every probe site of the model).
        data: a number of held-out synthetic pairs (those of :func:`eval_pairs`, rendered batch by
            batch), a batch (list of batched views) or an iterable of batches.
        control: probes trained on the random backbone (``train_probes(..., backbone="random")``);
            evaluated on that backbone, reported as ``control_<kind>``.
        lens: also decode every site with the model's own norm and head.
        check: verify that the probes were trained on this model.

    >>> table = evaluate_probes(model, probes, 256, control=control)
    >>> table.write("runs/eval"); table.series("mlp", "e2_aligned_v2")
    """
    module = as_module(model).eval()
    if probes is not None and check:
        probes.check_backbone(module)
    if probes is not None:
        n_views = probes.n_views
    elif is_views(data):  # the lens alone on one batch: as many views as it has
        n_views = module.default_n_views(len(data))
    else:
        n_views = module.fixed_n_views or 2
    sites = list(probes.sites) if probes is not None else module.probe_sites(n_views=n_views)
    locations = group_locations(sites)
    read = lens_sites(module, sites) if lens else sites
    ctl_module = None
    if control is not None:
        if check:
            control.check_backbone(module)
        ctl_module = control.backbone(module)
    if isinstance(data, int):
        data = _synthetic_batches(module, data, batch_size)
    acc = _Accumulator()
    n_pairs = 0
    from tqdm.auto import tqdm

    need = ["img", "pts3d", "valid"]
    if any(s.target == "depth" for p in (probes, control) if p is not None for s in p.specs):
        need.append("depth")
    for views in tqdm(_batches(data, batch_size, need), disable=not progress, desc="eval", unit="batch"):
        if views is None:  # another rank's batch
            acc.skip()
            continue
        views = [{k: v.to(module.device) for k, v in view.items()} for view in views]
        n_pairs += batch_size_of(views)
        grid = (views[0]["img"].shape[-2] // module.patch_size, views[0]["img"].shape[-1] // module.patch_size)
        tokens = _run(module, read, views, n_views)
        methods: dict[str, tuple[str, dict]] = {}
        if probes is not None:
            out = probes(tokens, grid)
            for spec in probes.specs:
                methods[spec.name] = (spec.target, out[spec.name])
        if lens:
            methods[LENS] = ("pointmap", pointmap_lens(module, tokens, sites, grid))
        if control is not None:
            out = control(_run(ctl_module, control.sites, views, n_views), grid)
            for spec in control.specs:
                methods[CONTROL_PREFIX + spec.name] = (spec.target, out[spec.name])
        for method, (target, out) in methods.items():
            _add_metrics(acc, method, target, out, locations, views)
        acc.next_batch()
    if D.active():
        acc.merge_ranks()
        n_pairs = sum(D.gather_objects(n_pairs))
    per_pair = acc.result()
    columns = _metric_columns(n_views)
    rows = []
    for method, locs in per_pair.items():
        for loc in locations:
            if loc.name not in locs:
                continue
            vals = locs[loc.name]
            row = {"method": method, "location": loc.name, "stack": loc.stack, "layer": loc.layer, "kind": loc.kind,
                   "order": loc.order, "n_pairs": n_pairs}
            for c in columns:
                row[c] = float(np.nanmean(vals[c])) if c in vals and np.isfinite(vals[c]).any() else math.nan
            rows.append(row)
    contributions = {}
    path = figure4_path(locations)
    for method, locs in per_pair.items():
        if path and all(loc.name in locs and "e2_aligned_v2" in locs[loc.name] for loc in path):
            contributions[method] = M.sublayer_contributions(
                [(loc.layer, loc.kind, locs[loc.name]["e2_aligned_v2"]) for loc in path])
    meta = {"n_pairs": n_pairs, "probes": dict(probes.meta) if probes is not None else None,
            "control": dict(control.meta) if control is not None else None, "lens": lens,
            "locations": [loc.name for loc in locations]}
    return ProbeTable(rows, contributions, per_pair, meta)
