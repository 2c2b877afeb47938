"""The 4D view: pointmaps of every view stepping through model sites, as a self-contained HTML page.

The page works offline from disk: the viewer script (``viewer.js``, plain canvas 2D, no library)
and the data are inlined. Point coordinates are quantised to int16 per frame and view.

Example::

    >>> frames = [Frame("dec0.self", [pts1, pts2]), Frame("dec0.cross", [pts1b, pts2b])]   # [H, W, 3] each
    >>> write_viewer_html("geometry.html", frames, images=[rgb1, rgb2], valid=[m1, m2])
"""

from __future__ import annotations

import base64
import html
import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io import atomic_write

VIEWER_JS = Path(__file__).with_name("viewer.js")
VIEWER_CSS = """
.mvv { font-family: system-ui, sans-serif; color: #ddd; background: #1b1b1b; padding: 8px; border-radius: 6px;
       display: inline-block; margin: 6px; }
.mvv-title { font-weight: 600; margin-bottom: 4px; }
.mvv-canvas { display: block; cursor: grab; background: #111; max-width: 100%; }
.mvv-controls { display: flex; gap: 8px; align-items: center; margin-top: 6px; }
.mvv-slider { flex: 1; }
.mvv-label { font-family: monospace; min-width: 14em; }
.mvv-toggles, .mvv-help { font-size: 12px; margin-top: 4px; color: #aaa; }
"""


@dataclass
class Frame:
    """One step of the 4D view: a label (the site) and one ``[H, W, 3]`` (or ``[N, 3]``) pointmap per view."""

    label: str
    views: Sequence[np.ndarray]


def to_numpy(a) -> np.ndarray:
    """A tensor (any device/dtype, detached, as float) or array-like as a numpy array."""
    if hasattr(a, "detach"):
        a = a.detach().float().cpu().numpy()
    return np.asarray(a)


def _quantise(xyz: np.ndarray) -> dict:
    xyz = xyz.astype(np.float64)
    finite = np.isfinite(xyz).all(-1)
    if not finite.any():
        xyz = np.zeros_like(xyz)
        finite[:] = True
    good = xyz[finite]
    # robust bounds so one exploded point does not flatten the rest to a dot
    lo, hi = np.percentile(good, 0.5, axis=0), np.percentile(good, 99.5, axis=0)
    pad = (hi - lo) * 0.05 + 1e-6
    lo, hi = lo - pad, hi + pad
    xyz = np.where(finite[:, None], xyz, np.median(good, axis=0))
    t = (np.clip(xyz, lo, hi) - lo) / (hi - lo)
    q = np.round(t * 65534 - 32767).astype("<i2")
    return {"q": base64.b64encode(q.tobytes()).decode(), "lo": lo.tolist(), "hi": hi.tolist()}


def _select(shape: tuple[int, int], valid: np.ndarray | None, max_points: int, seed: int = 0) -> np.ndarray:
    """Flat indices of at most ``max_points`` pixels (valid ones when a mask is given), fixed across frames."""
    idx = np.flatnonzero(valid.reshape(-1)) if valid is not None else np.arange(shape[0] * shape[1])
    if len(idx) > max_points:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_points, replace=False))
    return idx


def viewer_data(frames: Sequence[Frame], images: Sequence[np.ndarray], valid: Sequence[np.ndarray] | None = None,
                gt: Sequence[np.ndarray] | None = None, title: str = "", view_names: Sequence[str] | None = None,
                max_points: int = 6000) -> dict:
    """The JSON the viewer script reads (see viewer.js)."""
    if not frames:
        raise ValueError("the 4D view needs at least one frame")
    n_views = len(frames[0].views)
    if len(images) != n_views:
        raise ValueError(f"got {len(images)} images for {n_views} views")
    view_names = list(view_names or [f"view {v + 1}" for v in range(n_views)])
    sel, colors = [], []
    for v in range(n_views):
        img = to_numpy(images[v])
        if img.dtype != np.uint8:
            raise ValueError("images must be uint8 [H, W, 3] (use mv_interp.images.to_image)")
        H, W = img.shape[:2]
        mask = None if valid is None else to_numpy(valid[v]).astype(bool)
        idx = _select((H, W), mask, max_points, seed=v)
        sel.append(idx)
        colors.append(base64.b64encode(np.ascontiguousarray(img.reshape(-1, 3)[idx]).tobytes()).decode())
    out_frames = []
    for f in frames:
        if len(f.views) != n_views:
            raise ValueError(f"frame {f.label!r} has {len(f.views)} views, expected {n_views}")
        out_frames.append({"label": f.label, "views": [_quantise(to_numpy(p).reshape(-1, 3)[sel[v]]) for v, p in enumerate(f.views)]})
    gt_enc = [_quantise(to_numpy(p).reshape(-1, 3)[sel[v]]) for v, p in enumerate(gt)] if gt is not None else None
    return {"title": title, "frames": out_frames, "colors": colors, "view_names": view_names,
            "gt": gt_enc, "n": [len(s) for s in sel]}


def viewer_fragment(data: dict, element_id: str | None = None) -> str:
    """An HTML fragment (container + data) for one viewer; the page must include :func:`viewer_assets`."""
    element_id = element_id or f"mvv-{uuid.uuid4().hex[:8]}"
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return (f'<div id="{element_id}"></div>\n'
            f'<script type="application/json" data-mvviewer="{element_id}">{payload}</script>\n')


def viewer_assets() -> str:
    """The ``<style>`` and ``<script>`` every page with viewers includes once."""
    return f"<style>{VIEWER_CSS}</style>\n<script>{VIEWER_JS.read_text()}</script>\n"


def write_viewer_html(path: str | os.PathLike, frames: Sequence[Frame], images: Sequence[np.ndarray],
                      valid: Sequence[np.ndarray] | None = None, gt: Sequence[np.ndarray] | None = None,
                      title: str = "4D view", view_names: Sequence[str] | None = None, max_points: int = 6000,
                      notes: str = "") -> Path:
    """Write a standalone page with one 4D viewer (atomically)."""
    data = viewer_data(frames, images, valid, gt, title, view_names, max_points)
    page = (
        "<!doctype html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>{viewer_assets()}</head>\n"
        "<body style='background:#222;color:#ddd;font-family:system-ui,sans-serif'>\n"
        f"{notes}\n{viewer_fragment(data, 'viewer')}</body></html>\n"
    )
    return atomic_write(path, lambda p: Path(p).write_text(page))
