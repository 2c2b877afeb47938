"""Views of probe results: curves across sites, Figure-4 bars, and the 4D view.

- :func:`plot_curves`: E.1 of view 1, E.1 of view 2 and the aligned view-2 error (E.2) at every
  location, one line per method (probes solid, lens dashed, control dotted).
- :func:`plot_contributions`: the paper's Figure 4 — per block, the relative change of the
  aligned view-2 error across the self-attention, cross-attention and MLP skip connections, and
  the per-kind totals relative to the decoder-input error.
- :func:`probe_frames` / :func:`write_4d`: probed pointmaps of both views stepping through the
  locations, as a self-contained HTML page with a slider and a rerun recording (time axis = site).
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.difficulty import pick_pairs  # noqa: F401  (its home before data.difficulty)
from ..images import to_image
from ..io import atomic_write
from ..metrics import SKIP_KINDS, normalize_pointmaps
from ..types import ModelLike, as_module
from ..viz import Frame, viewer_assets, viewer_data, viewer_fragment
from ..viz.plotting import pyplot, save_figure
from .data import Batch, slice_batch
from .evaluate import CONTROL_PREFIX, LENS, ProbeTable
from .lens import lens_sites, pointmap_lens
from .probeset import ProbeSet
from .sites import read_tokens

CURVE_PANELS = (("e1_v1", "E.1 error, view 1"), ("e1_v2", "E.1 error, view 2"),
                ("e2_aligned_v2", "aligned view-2 error (E.2)"))
KIND_COLORS = {"self": "#4c72b0", "cross": "#dd8452", "mlp": "#55a868"}


def _style(method: str) -> dict[str, Any]:
    if method == LENS:
        return {"linestyle": "--", "marker": "x", "color": "0.35"}
    if method.startswith(CONTROL_PREFIX):
        return {"linestyle": ":", "marker": "."}
    return {"linestyle": "-", "marker": "o", "markersize": 3}


def _save(fig, path: str | os.PathLike) -> Path:
    return save_figure(fig, path, dpi=110, tight=True)


def plot_curves(table: ProbeTable, path: str | os.PathLike, methods: Sequence[str] | None = None,
                locations: Sequence[str] | None = None, intervals: Sequence[Mapping[str, Any]] | None = None) -> Path:
    """Error vs site (PNG): view 1, view 2 and aligned view 2, one line per pointmap method.

    ``locations`` restricts (and orders) the x axis, e.g. only the sublayer outputs of a
    ``sublayers=True`` run for the granularity ablation. ``intervals`` (rows ``{"method",
    "location", "metric", "low", "high"}``, e.g. ``mv_interp.report.uncertainty.probe_intervals``'s
    ``sites``) draws each curve's interval as a band. The legend sits below the panels."""
    plt = pyplot()
    all_locs = table.locations
    locs = list(locations) if locations is not None else all_locs
    unknown = [loc for loc in locs if loc not in all_locs]
    if unknown:
        raise ValueError(f"plot_curves: locations {unknown} are not in the table; it has {all_locs}")
    idx = [all_locs.index(loc) for loc in locs]

    def series(m: str, c: str) -> np.ndarray:
        return np.array(table.series(m, c))[idx]

    methods = [m for m in (methods or table.methods) if any(np.isfinite(series(m, c)).any() for c, _ in CURVE_PANELS)]
    fig, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(max(9, 0.28 * len(locs) * len(CURVE_PANELS)), 3.8),
                             sharex=True, layout="constrained")
    x = np.arange(len(locs))
    bands = {(r["method"], r["location"], r["metric"]): (r.get("low"), r.get("high")) for r in intervals or ()}
    for ax, (col, title) in zip(np.atleast_1d(axes), CURVE_PANELS):
        for m in methods:
            y = series(m, col)
            if np.isfinite(y).any():
                line = ax.plot(x, y, label=m, **_style(m))[0]
                if bands:
                    lo, hi = (np.array([np.nan if v is None else v for v in b], dtype=float) for b in
                              zip(*[bands.get((m, loc, col), (None, None)) for loc in locs]))
                    ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.18, lw=0)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(x)
        ax.set_xticklabels(locs, rotation=90, fontsize=7)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("error (GT-normalised units)")
    handles, labels = np.atleast_1d(axes)[0].get_legend_handles_labels()
    if bands:
        from matplotlib.patches import Patch

        handles.append(Patch(color="0.6", alpha=0.35))
        labels.append("95 % interval (bootstrap over pairs)")
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 5), fontsize=8, frameon=False)
    fig.suptitle(f"probe error across sites ({table.meta.get('n_pairs', '?')} held-out pairs)", fontsize=11)
    return _save(fig, path)


def plot_contributions(table: ProbeTable, path: str | os.PathLike, methods: Sequence[str] | None = None,
                       intervals: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Figure 4 (PNG): per-block relative change of the aligned view-2 error across each skip
    connection, and the per-kind totals relative to the decoder-input error; one row per method.
    ``intervals`` (per method, ``mv_interp.report.uncertainty.probe_intervals``'s
    ``contributions``) adds each bar's interval as an error bar."""
    plt = pyplot()
    methods = [m for m in (methods or list(table.contributions)) if m in table.contributions]
    if not methods:
        raise ValueError("the table has no sublayer contributions (it needs the decoder-input site and the "
                         "skip-connection residuals of view 2, evaluated with a pointmap method)")
    fig, axes = plt.subplots(len(methods), 2, figsize=(11, 3.2 * len(methods)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1]}, layout="constrained")
    for row, m in zip(axes, methods):
        c = table.contributions[m]
        blocks = sorted({s.block for s in c.skips})
        width = 0.8 / len(SKIP_KINDS)
        ci = (intervals or {}).get(m)

        def err(ivs: Sequence[Mapping[str, Any] | None], est: Sequence[float]) -> np.ndarray | None:
            if ci is None:
                return None
            lo = [100 * (e - iv["low"]) if iv and iv.get("low") is not None else np.nan for iv, e in zip(ivs, est)]
            hi = [100 * (iv["high"] - e) if iv and iv.get("high") is not None else np.nan for iv, e in zip(ivs, est)]
            return np.nan_to_num(np.array([lo, hi]), nan=0.0).clip(min=0)

        for k, kind in enumerate(SKIP_KINDS):
            vals = {s.block: s.rel_change for s in c.skips if s.kind == kind}
            ivs = {s["block"]: s["rel_change"] for s in (ci or {}).get("skips", ()) if s["kind"] == kind}
            est = [vals.get(b, np.nan) for b in blocks]
            row[0].bar(np.arange(len(blocks)) + (k - 1) * width, [100 * v for v in est], width,
                       label=kind, color=KIND_COLORS[kind], yerr=err([ivs.get(b) for b in blocks], est),
                       error_kw={"elinewidth": 0.9, "capsize": 2, "ecolor": "0.25"})
        row[0].axhline(0, color="0.3", lw=0.8)
        row[0].set_xticks(np.arange(len(blocks)))
        row[0].set_xticklabels([f"block {b}" for b in blocks], fontsize=8)
        row[0].set_ylabel("relative change (%)")
        row[0].set_title(f"{m}: change of the aligned view-2 error across each skip connection", fontsize=10)
        row[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
        kinds = [k for k in SKIP_KINDS if k in c.by_kind]
        est = [c.by_kind[k]["total_rel_to_input"] for k in kinds]
        totals = [100 * t for t in est]
        kind_ci = [(ci or {}).get("by_kind", {}).get(k, {}).get("total_rel_to_input") for k in kinds]
        row[1].bar(kinds, totals, color=[KIND_COLORS[k] for k in kinds], yerr=err(kind_ci, est),
                   error_kw={"elinewidth": 0.9, "capsize": 3, "ecolor": "0.25"})
        row[1].axhline(0, color="0.3", lw=0.8)
        for i, t in enumerate(totals):
            row[1].annotate(f"{t:+.0f}%", (i, 0), xytext=(0, -10 if t >= 0 else 4), textcoords="offset points",
                            ha="center", fontsize=8)
        row[1].set_title("total, % of decoder-input error" + (" (95 % interval)" if ci else ""), fontsize=10)
    return _save(fig, path)


# --------------------------------------------------------------------------------------
# 4D
# --------------------------------------------------------------------------------------


def _pair(pair: Batch, index: int = 0) -> Batch:
    return slice_batch(pair, index, index + 1)


@torch.no_grad()
def probe_frames(model: ModelLike, probes: ProbeSet | None, pair: Batch, kind: str = "mlp", lens: bool = False,
                 normalize: bool = True) -> list[Frame]:
    """Probed pointmaps of every view at every location of ``probes`` (or the lens), in order.

    ``pair`` is a batch of views (its first pair is used). With ``normalize`` each frame is divided
    by its avg_dis factor over the valid pixels of all views, so the scale-free probe outputs keep
    a steady size through the sites. Returns one :class:`~mv_interp.viz.Frame` per location with
    ``[H, W, 3]`` arrays, labelled by location name.

    >>> frames = probe_frames(model, probes, pair, kind="mlp")
    """
    module = as_module(model)
    pair = [{k: v.to(module.device) for k, v in view.items()} for view in _pair(pair)]
    n_views = probes.n_views if probes is not None else len(pair)
    sites = list(probes.sites) if probes is not None else module.probe_sites(n_views=n_views)
    from .sites import group_locations

    locations = group_locations(sites)
    read = lens_sites(module, sites) if lens else sites
    imgs = [v["img"] for v in pair]
    _, acts = module.capture(*imgs, names=sorted({s.hook for s in read}))
    tokens = read_tokens(acts, read, n_views)
    grid = (imgs[0].shape[-2] // module.patch_size, imgs[0].shape[-1] // module.patch_size)
    if lens:
        out = pointmap_lens(module, tokens, sites, grid)
    else:
        if probes is None:
            raise ValueError("probe_frames needs probes (or lens=True)")
        if probes.spec(kind).target != "pointmap":
            raise ValueError(f"probe kind {kind!r} predicts depth; the 4D view needs a pointmap probe "
                             f"({[s.name for s in probes.specs if s.target == 'pointmap']})")
        out = probes(tokens, grid, [kind])[kind]
    valid = [view_valid(v) for v in pair]
    frames = []
    for loc in locations:
        pts = [out[s.name]["pts3d"] for s in loc.sites]
        if normalize:
            pts, _ = normalize_pointmaps(pts, [valid[v - 1] for v in loc.views])
        frames.append(Frame(loc.name, [p[0].cpu().numpy() for p in pts]))
    return frames


def page_inputs(pair: Batch) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray] | None]:
    """Images (uint8), valid masks and avg_dis-normalised ground truth of a one-pair batch: what
    :func:`mv_interp.viz.viewer_data` and the rerun recording take besides the frames. Views
    without ``valid`` count as all valid; without ``pts3d`` the ground truth is ``None``."""
    images = [to_image(v["img"][0]) for v in pair]
    valid = [view_valid(v)[0].cpu().numpy() for v in pair]
    if not all("pts3d" in v for v in pair):
        return images, valid, None  # plain photos: no ground truth to overlay
    gt, _ = normalize_pointmaps([v["pts3d"] for v in pair], [view_valid(v) for v in pair])
    return images, valid, [g[0].cpu().numpy() for g in gt]


@dataclass
class PairFrames:
    """The 4D view of one pair: the probed pointmaps of every method at every site (frames), with
    the pair's images, valid masks and ground truth. Built once by :func:`pair_frames`; drawn by
    either renderer: :meth:`viewer_data` (the HTML slider viewer) or :meth:`write_rerun` (a rerun
    recording)."""

    images: list[np.ndarray]
    valid: list[np.ndarray]
    gt: list[np.ndarray] | None
    """Ground truth per view, ``None`` for plain photos."""
    methods: dict[str, list[Frame]]
    """Frames per method: the probe kind (e.g. ``"mlp"``) and/or ``"lens"``, in that order."""

    def viewer_data(self, method: str, title: str, max_points: int = 6000) -> dict[str, Any]:
        """The HTML viewer's data for one method (:func:`mv_interp.viz.viewer_data`)."""
        return viewer_data(self.methods[method], self.images, self.valid, self.gt, title=title, max_points=max_points)

    def write_rerun(self, path: str | os.PathLike, method: str, app_id: str) -> Path:
        """A rerun recording of one method's frames on the ``site`` timeline."""
        from ..viz import write_rerun_recording

        return write_rerun_recording(path, self.methods[method], self.images, self.valid, self.gt, app_id=app_id)


def pair_frames(model: ModelLike, probes: ProbeSet | None, pair: Batch, kind: str = "mlp",
                lens: bool = True) -> PairFrames:
    """The one 4D-frames builder: the first pair of ``pair`` decoded at every site by the trained
    probes of ``kind`` (when ``probes`` is given) and by the pointmap lens (``lens``)."""
    pair = _pair(pair)
    images, valid, gt = page_inputs(pair)
    methods: dict[str, list[Frame]] = {}
    if probes is not None:
        methods[kind] = probe_frames(model, probes, pair, kind)
    if lens:
        methods[LENS] = probe_frames(model, probes, pair, lens=True)
    return PairFrames(images, valid, gt, methods)


def view_valid(view: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A view's ``valid`` mask ``[batch, H, W]``; a view without one (a plain photo) is all valid."""
    if "valid" in view:
        return view["valid"]
    img = view["img"]
    return torch.ones((img.shape[0],) + tuple(img.shape[-2:]), dtype=torch.bool, device=img.device)


def write_4d(out_dir: str | os.PathLike, model: ModelLike, probes: ProbeSet | None, pairs: Mapping[str, Batch],
             kind: str = "mlp", lens: bool = True, rerun: bool = True, max_points: int = 6000,
             title: str = "Probed pointmaps through the network") -> dict[str, Path]:
    """Write ``probes_4d.html`` (one slider viewer per pair and method, works offline) and one
    ``pair_<label>.rrd`` rerun recording per pair (probe frames on the ``site`` timeline; the lens
    under ``lens/``) when ``rerun`` and rerun-sdk (the ``rerun`` extra) is installed. ``pairs`` maps a
    label (e.g. ``"easy"``) to a batch whose first pair is shown.

    >>> write_4d("runs/show", model, probes, {"easy": easy, "hard": hard})
    """
    from ..viz import rerun_available

    out = Path(out_dir)
    files: dict[str, Path] = {}
    parts = []
    rerun = rerun and rerun_available()
    for label, pair in pairs.items():
        four = pair_frames(model, probes, pair, kind, lens)
        for method, frames in four.methods.items():
            data = four.viewer_data(method, title=f"{label} pair · {method}", max_points=max_points)
            parts.append(viewer_fragment(data, f"mvv-{label}-{method}"))
        if rerun:
            for i, method in enumerate(four.methods):
                suffix = "" if i == 0 else "_lens"
                files[f"rrd_{label}{suffix}"] = four.write_rerun(out / f"pair_{label}{suffix}.rrd", method,
                                                                 app_id=f"mv_interp_probes_{label}{suffix}")
    notes = (f"<h2>{html.escape(title)}</h2><p>Each viewer steps through the probe locations in processing order "
             "(slider or arrow keys); drag to rotate. Points are coloured by their pixel; tick 'ground truth' to "
             "overlay it in grey. "
             "Each frame is normalised by its mean distance to view 1's camera.</p>")
    page = ("<!doctype html>\n<html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title>{viewer_assets()}</head>\n"
            "<body style='background:#222;color:#ddd;font-family:system-ui,sans-serif'>\n"
            f"{notes}\n{''.join(parts)}</body></html>\n")
    files["html"] = atomic_write(out / "probes_4d.html", lambda p: Path(p).write_text(page))
    return files
