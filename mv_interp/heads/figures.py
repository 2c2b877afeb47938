"""Figures of head scores: heatmaps, the label map, the Figure 5 curve, attention overlays and
correspondence lines. Every function writes one PNG (atomically) and returns its path.

The score figures need only a :class:`~mv_interp.heads.HeadScores`; the overlays and lines run
the model once on one pair (``views``: a batch in the :mod:`mv_interp.data` format, or image
tensors) to read the chosen heads' patterns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..adapters.base import pattern_blocks
from ..data.views import ViewsLike, as_views
from ..errors import OutOfRangeError, UnknownNameError
from ..metrics import patch_centres
from ..types import ModelLike, as_module
from ..viz.plotting import pyplot, save_figure
from .result import HeadRef, HeadScores, figure_groups, group_title, panel_rows, px_label
from .scoring import GEOMETRY_KEYS
from .targets import Correspondence, correspondence_targets

__all__ = [
    "DEFAULT_HEATMAP_SCORES",
    "plot_heatmaps",
    "plot_label_map",
    "plot_correspondence_curve",
    "plot_attention_overlays",
    "plot_correspondence_lines",
    "default_queries",
    "save_score_figures",
    "save_example_figures",
]

#: Scores drawn as heatmaps by default (``{primary}`` is the deciding pixel threshold).
DEFAULT_HEATMAP_SCORES = ("corr_recall@{primary}", "corr_abs", "register_lift", "register_norm_ratio",
                          "local_lift", "diag_mass")
LABEL_COLOURS = {"correspondence": "#2ca02c", "register": "#d62728", "local": "#1f77b4", "other": "#d9d9d9"}


def _save(fig, path: str | Path, dpi: int = 110) -> Path:
    return save_figure(fig, path, dpi=dpi)


def _grid_of(rows: Sequence[Mapping[str, Any]], column: str) -> tuple[list[int], int, list[list[float]]]:
    layers = sorted({r["layer"] for r in rows})
    n_heads = max(r["head"] for r in rows) + 1
    mat = [[math.nan] * n_heads for _ in layers]
    for r in rows:
        v = r.get(column, math.nan)
        mat[layers.index(r["layer"])][r["head"]] = float(v) if v is not None else math.nan
    return layers, n_heads, mat


def _panels(n: int) -> tuple[int, int]:
    cols = min(n, 3)
    return math.ceil(n / cols), cols


def plot_heatmaps(scores: HeadScores, out_dir: str | Path, columns: Sequence[str] = DEFAULT_HEATMAP_SCORES
                  ) -> list[Path]:
    """One PNG per score: a [layer × head] heatmap per block group (stack, kind, query → key
    view; with many views the view pairs merged into within / across views, see
    :func:`~mv_interp.heads.result.panel_rows`). Groups where the score does not apply are left
    out; cells print their value when the grid is small enough to read."""
    plt = pyplot()
    rows = scores.table()
    groups = panel_rows(rows)
    paths = []
    for col in columns:
        col = col.format(primary=px_label(scores.primary_px))
        if not rows or col not in rows[0]:
            raise ValueError(f"plot_heatmaps: no score named {col!r}; scores: "
                             f"{[k for k, v in (rows[0] if rows else {}).items() if isinstance(v, float)]}")
        panels = [(title, _grid_of(rs, col)) for title, rs in groups.values()]
        panels = [(g, p) for g, p in panels if any(not math.isnan(v) for line in p[2] for v in line)]
        if not panels:
            continue
        nr, nc = _panels(len(panels))
        fig, axes = plt.subplots(nr, nc, figsize=(4.2 * nc, 0.35 * max(len(p[0]) for _, p in panels) * nr + 1.6 * nr),
                                 squeeze=False, layout="constrained")
        # one colour scale for the whole figure, so panels compare at a glance
        values = [v for _, p in panels for line in p[2] for v in line if not math.isnan(v)]
        if col.endswith(("_lift", "_abs")):
            vmin, vmax = -0.2, 1.0
        elif col.startswith("register_norm"):
            vmin, vmax = min(values), max(max(values), min(values) + 1e-6)
        else:
            vmin, vmax = 0.0, 1.0
        im = None
        for ax, (title, (layers, n_heads, mat)) in zip(axes.flat, panels):
            im = ax.imshow(mat, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_xticks(range(n_heads))
            ax.set_yticks(range(len(layers)), [str(x) for x in layers])
            if len(layers) * n_heads <= 200:
                mid = (vmin + vmax) / 2
                for i, line in enumerate(mat):
                    for j, v in enumerate(line):
                        if not math.isnan(v):
                            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                                    color="white" if v < mid else "black")
        fig.colorbar(im, ax=axes, fraction=0.03, pad=0.02, label=col)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.suptitle(f"{scores.model_name}: {col} ({scores.n_pairs} pairs)", fontsize=10)
        safe = col.replace("@", "_at_")
        paths.append(_save(fig, Path(out_dir) / f"heatmap_{safe}.png"))
    return paths


def plot_label_map(scores: HeadScores, path: str | Path) -> Path:
    """Every head's labels as a coloured [layer × head] grid per block group
    (C = correspondence, R = register, L = local, · = other; with many views the view pairs
    merged, a label shown where it holds in at least half of them)."""
    plt = pyplot()
    from matplotlib.patches import Patch

    rows = scores.table()
    groups = panel_rows(rows)
    nr, nc = _panels(len(groups))
    max_layers = max(len({r["layer"] for r in rs}) for _, rs in groups.values())
    fig, axes = plt.subplots(nr, nc, figsize=(4.2 * nc, 0.35 * max_layers * nr + 1.6 * nr), squeeze=False,
                             layout="constrained")
    order = ("correspondence", "register", "local")
    for ax, (title, rs) in zip(axes.flat, groups.values()):
        layers = sorted({r["layer"] for r in rs})
        n_heads = max(r["head"] for r in rs) + 1
        ax.set_xlim(-0.5, n_heads - 0.5)
        ax.set_ylim(len(layers) - 0.5, -0.5)
        for r in rs:
            labs = r["labels"].split("+")
            y, x = layers.index(r["layer"]), r["head"]
            main = next((lab for lab in order if lab in labs), "other")
            ax.add_patch(plt.Rectangle((x - 0.48, y - 0.48), 0.96, 0.96, color=LABEL_COLOURS[main]))
            text = "".join(lab[0].upper() for lab in order if lab in labs) or "·"
            ax.text(x, y, text, ha="center", va="center", fontsize=7, color="white" if main != "other" else "black")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(len(layers)), [str(x) for x in layers])
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    handles = [Patch(color=c, label=k) for k, c in LABEL_COLOURS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(f"{scores.model_name}: head labels ({scores.n_pairs} pairs)", fontsize=10)
    return _save(fig, path)


def plot_correspondence_curve(scores: HeadScores, path: str | Path, threshold_px: float | None = None) -> Path:
    """The paper's Figure 5: recall of the best correspondence head per layer (chosen at
    ``threshold_px``), one line per pixel threshold, with uniform attention (dotted) and the
    same-grid-position baseline (dashed). One panel per cross-view block group."""
    plt = pyplot()
    best = scores.best_per_layer(threshold_px)
    if not best:
        raise ValueError("plot_correspondence_curve: no correspondence scores (the model has no cross-view attention "
                         "block, or the data had no depth/cameras)")
    groups: dict[tuple, list] = {}
    for b in best:
        groups.setdefault(b.group, []).append(b)
    groups = {g: groups[g] for g in figure_groups(groups)}  # many views: the queries into view 1
    nr, nc = _panels(len(groups))
    fig, axes = plt.subplots(nr, nc, figsize=(5.0 * nc, 3.6 * nr), squeeze=False, layout="constrained")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (g, bs) in zip(axes.flat, groups.items()):
        bs = sorted(bs, key=lambda b: b.layer)
        xs = [b.layer for b in bs]
        for i, t in enumerate(scores.thresholds_px):
            c = colours[i % len(colours)]
            ax.plot(xs, [b.recall[t] for b in bs], "o-", color=c, label=f"best head, ≤ {t:g} px")
            ax.plot(xs, [b.chance[t] for b in bs], ":", color=c, label=f"uniform attention, ≤ {t:g} px")
            ax.plot(xs, [b.same_position[t] for b in bs], "--", color=c, alpha=0.6,
                    label=f"same grid position, ≤ {t:g} px")
        t0 = threshold_px if threshold_px is not None else scores.primary_px
        for b in bs:
            ax.annotate(f"h{b.head}", (b.layer, b.recall[t0]), textcoords="offset points", xytext=(0, 5),
                        ha="center", fontsize=7)
        ax.set_xticks(xs)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("layer")
        ax.set_ylabel("correct correspondences (fraction)")
        ax.set_title(group_title(g), fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6, loc="best")
    fig.suptitle(f"{scores.model_name}: best correspondence head per layer ({scores.n_pairs_with_geometry} pairs)",
                 fontsize=10)
    return _save(fig, path)


def save_score_figures(scores: HeadScores, out_dir: str | Path) -> dict[str, Path]:
    """Heatmaps (``heatmaps/``), the label map and, when scored, the correspondence curve."""
    out = Path(out_dir)
    paths: dict[str, Path] = {"labels": plot_label_map(scores, out / "labels.png")}
    for p in plot_heatmaps(scores, out / "heatmaps"):
        paths[p.stem] = p
    if scores.best_per_layer():
        paths["correspondence_curve"] = plot_correspondence_curve(scores, out / "correspondence_curve.png")
    return paths


# the figures of HeadScores.save(figures=True): registered here so result.py needs no import of this layer
HeadScores.figure_writer = save_score_figures


# --------------------------------------------------------------------------------------
# Pictures of single pairs
# --------------------------------------------------------------------------------------


def _display(img: Tensor) -> Tensor:
    """[3, H, W] in [-1, 1] → [H, W, 3] in [0, 1] for imshow."""
    return ((img.detach().float().cpu() + 1) / 2).clamp(0, 1).permute(1, 2, 0)


def _blend(img: Tensor, attn: Tensor, patch: int, cmap) -> Tensor:
    """An attention map [h, w] blended on an image [H, W, 3]: colour where the head attends
    (scaled to the map's maximum), the plain image where it does not. One RGB array, so a
    panel is a single image (fast to draw)."""
    heat = (attn / attn.max().clamp_min(1e-12)).clamp(0, 1)
    heat = heat.repeat_interleave(patch, 0).repeat_interleave(patch, 1)
    colour = torch.from_numpy(cmap(heat.numpy())[..., :3]).float()
    alpha = 0.85 * heat[..., None].sqrt()  # sqrt: weak but non-zero attention stays visible
    return img * (1 - alpha) + colour * alpha


def _one_pair(model: ModelLike, views: ViewsLike, sample: int) -> tuple[Any, list[dict[str, Tensor]]]:
    module = as_module(model)
    vs = as_views(views, "views")
    n = vs[0]["img"].shape[0]
    if not 0 <= sample < n:
        raise OutOfRangeError(f"sample={sample} but the batch holds {n} pairs")
    return module, [{k: t[sample : sample + 1] for k, t in v.items() if isinstance(t, Tensor)} for v in vs]


def _read_blocks(module, views: list[dict[str, Tensor]], refs: Sequence[HeadRef]) -> dict[tuple, Tensor]:
    """``{(site, qv, kv): [head, q_pos, k_pos]}`` of one pair for the sites of ``refs`` (between patches:
    a site's special tokens are left out)."""
    n_views = len(views)

    sites = {s.name: s for s in module.attention_sites(n_views=n_views)}
    missing = sorted({r.site for r in refs} - set(sites))
    if missing:
        raise UnknownNameError(f"no attention site named {missing}; sites: {sorted(sites)[:12]}")
    wanted = {r.site for r in refs}
    imgs = [v["img"].to(module.device) for v in views]
    with torch.no_grad():
        _, cache = module.run_with_cache(*imgs, names_filter=[sites[s].pattern_hook for s in wanted])
    out = {}
    for s in wanted:
        for (qv, kv), block in pattern_blocks(cache[sites[s].pattern_hook], sites[s], n_views).items():
            n = sites[s].n_prefix
            out[(s, qv, kv)] = block[0, :, n:, n:].float().cpu()
    return out


def _targets(views: list[dict[str, Tensor]], qv: int, kv: int, p: int) -> Correspondence | None:
    if qv == kv or not all(all(k in v for k in GEOMETRY_KEYS) for v in (views[qv - 1], views[kv - 1])):
        return None
    return correspondence_targets(views[qv - 1], views[kv - 1], p)


def default_queries(grid: tuple[int, int], n: int = 4, match: Tensor | None = None) -> list[int]:
    """``n`` query patches spread over the grid (only among those with a ground-truth match when
    ``match`` ``[q_pos]`` is given)."""
    h, w = grid
    candidates = list(range(h * w)) if match is None else [int(i) for i in torch.nonzero(match >= 0).flatten()]
    if not candidates:
        candidates = list(range(h * w))
    # farthest-point order from the grid centre keeps the picks apart
    pos = torch.tensor([[c // w, c % w] for c in candidates], dtype=torch.float32)
    chosen = [int(torch.cdist(pos, torch.tensor([[(h - 1) / 2, (w - 1) / 2]])).argmin())]
    while len(chosen) < min(n, len(candidates)):
        d = torch.cdist(pos, pos[chosen]).min(-1).values
        chosen.append(int(d.argmax()))
    return [candidates[i] for i in chosen]


def plot_attention_overlays(model: ModelLike, views: ViewsLike, heads: Sequence[HeadRef], path: str | Path,
                            queries: Sequence[int] | None = None, sample: int = 0,
                            labels: Mapping[HeadRef, Sequence[str]] | None = None) -> Path:
    """Attention maps of chosen heads for chosen query patches (the paper's Figure 15 style).

    One row per query patch: the query view with the query patch outlined, then one panel per
    head with its attention over the key view blended on the key view's image (the same image
    for a self-attention block). Where ground truth is known, the true match is circled (white)
    and the argmax marked (×). ``heads`` must share one query view. ``queries`` are patch indices
    of the query view (default: 4 spread over the patches that have a match).
    """
    plt = pyplot()
    if not heads:
        raise ValueError("plot_attention_overlays: give at least one HeadRef")
    qvs = {r.query_view for r in heads}
    if len(qvs) != 1:
        raise ValueError(f"plot_attention_overlays: heads have query views {sorted(qvs)}; draw one query view per "
                         "figure")
    qv = qvs.pop()
    module, pair = _one_pair(model, views, sample)
    p = module.patch_size
    H, W = pair[0]["img"].shape[-2:]
    grid = (H // p, W // p)
    blocks = _read_blocks(module, pair, heads)
    targets = {kv: _targets(pair, qv, kv, p) for kv in {r.key_view for r in heads}}
    if queries is None:
        other = next((t for t in targets.values() if t is not None), None)
        queries = default_queries(grid, 4, other.match[0] if other is not None else None)
    centres = patch_centres(*grid, p)
    cmap = plt.get_cmap("inferno")
    n_cols = len(heads) + 1
    size = (2.3 * n_cols * W / max(H, W) + 0.4, 2.3 * len(queries) * H / max(H, W) + 0.6)
    fig, axes = plt.subplots(len(queries), n_cols, figsize=size, squeeze=False, layout="constrained")
    for i, q in enumerate(queries):
        ax = axes[i, 0]
        ax.imshow(_display(pair[qv - 1]["img"][0]))
        r, c = divmod(int(q), grid[1])
        ax.add_patch(plt.Rectangle((c * p - 0.5, r * p - 0.5), p, p, fill=False, edgecolor="red", linewidth=2))
        ax.set_title(f"query {q} (view {qv})" if i == 0 else f"query {q}", fontsize=8)
        for j, ref in enumerate(heads, start=1):
            ax = axes[i, j]
            attn = blocks[(ref.site, ref.query_view, ref.key_view)][ref.head, int(q)]
            ax.imshow(_blend(_display(pair[ref.key_view - 1]["img"][0]), attn.view(*grid), p, cmap))
            if ref.key_view == qv:
                ax.add_patch(plt.Rectangle((c * p - 0.5, r * p - 0.5), p, p, fill=False, edgecolor="red", linewidth=1))
            am = int(attn.argmax())
            ax.plot(*centres[am].tolist(), "x", color="cyan", markersize=6, markeredgewidth=2)
            t = targets.get(ref.key_view)
            if t is not None and int(t.match[0, q]) >= 0:
                ax.plot(*centres[int(t.match[0, q])].tolist(), "o", markersize=9, markerfacecolor="none",
                        markeredgecolor="white", markeredgewidth=1.5)
            if i == 0:
                tag = "+".join(labels.get(ref, ())) if labels else ""
                ax.set_title(f"{ref.site} {ref.query_view}→{ref.key_view} h{ref.head}" + (f"\n{tag}" if tag else ""),
                             fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path)


def plot_correspondence_lines(model: ModelLike, views: ViewsLike, scores: HeadScores, path: str | Path, sample: int = 0,
                              max_lines: int = 40, threshold_px: float | None = None) -> Path:
    """Correspondences of the best head per layer on one pair: the key view (left) and the query
    view (right) side by side, a line from each query patch to the key patch its head attends to
    most, green when within ``threshold_px`` (default the scores' primary threshold) of the true
    match and red otherwise. One panel per layer of each cross-view block group (with many views,
    the groups :func:`~mv_interp.heads.result.figure_groups` keeps: the queries into view 1)."""
    plt = pyplot()
    best = scores.best_per_layer(threshold_px)
    if not best:
        raise ValueError("plot_correspondence_lines: no correspondence scores to pick heads from")
    keep = set(figure_groups(b.group for b in best))  # many views: the queries into view 1
    best = [b for b in best if b.group in keep]
    t0 = float(threshold_px) if threshold_px is not None else scores.primary_px
    module, pair = _one_pair(model, views, sample)
    p = module.patch_size
    H, W = pair[0]["img"].shape[-2:]
    grid = (H // p, W // p)
    refs = [HeadRef(b.site, b.query_view, b.key_view, b.head) for b in best]
    blocks = _read_blocks(module, pair, refs)
    centres = patch_centres(*grid, p)
    nr, nc = _panels(len(best))
    fig, axes = plt.subplots(nr, nc, figsize=(5.2 * nc * W / max(H, W), 2.9 * nr * H / max(H, W) + 0.4),
                             squeeze=False, layout="constrained")
    for ax, b, ref in zip(axes.flat, best, refs):
        t = _targets(pair, b.query_view, b.key_view, p)
        if t is None:
            raise ValueError("plot_correspondence_lines: the views need depth and cameras (mv_interp.data format)")
        match = t.match[0]
        attn = blocks[(ref.site, ref.query_view, ref.key_view)][ref.head]
        pred = attn.argmax(-1)
        scored = [int(i) for i in torch.nonzero(match >= 0).flatten()]
        if len(scored) > max_lines:
            scored = [scored[round(i * (len(scored) - 1) / (max_lines - 1))] for i in range(max_lines)]
        canvas = torch.cat([_display(pair[b.key_view - 1]["img"][0]), _display(pair[b.query_view - 1]["img"][0])], 1)
        ax.imshow(canvas)
        good = 0
        for q in scored:
            x0, y0 = centres[q].tolist()
            x1, y1 = centres[int(pred[q])].tolist()
            ok = float(torch.linalg.vector_norm(centres[int(pred[q])] - centres[int(match[q])])) <= t0
            good += ok
            ax.plot([x0 + W, x1], [y0, y1], "-", color="#2ca02c" if ok else "#d62728", linewidth=0.9, alpha=0.85)
            ax.plot([x0 + W], [y0], ".", color="yellow", markersize=3)
        ax.axvline(W - 0.5, color="white", linewidth=1)
        ax.set_title(f"{b.site} h{b.head}: {good}/{len(scored)} within {t0:g}px "
                     f"(keys v{b.key_view} | queries v{b.query_view})", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(best):]:
        ax.axis("off")
    return _save(fig, path)


def _example_blocks(scores: HeadScores) -> list[tuple[str, tuple[str, int, int]]]:
    """The blocks worth drawing: the best correspondence block, the strongest register block and
    the most local same-view block (deduplicated)."""
    picks: list[tuple[str, tuple[str, int, int]]] = []
    best = scores.best_per_layer()
    if best:
        b = max(best, key=lambda b: (b.recall[scores.primary_px], -b.layer))
        picks.append(("correspondence", (b.site, b.query_view, b.key_view)))
    for label, column, same_only in (("register", "register_lift", False), ("local", "local_lift", True)):
        cands = [(float(scores.metrics(u)[column].nan_to_num(-1).max()), u) for u in scores.units
                 if (u.same_view or not same_only)]
        cands = [(v, u) for v, u in cands if v > -1]
        if cands:
            v, u = max(cands, key=lambda c: c[0])
            picks.append((label, u.key))
    seen, out = set(), []
    for label, key in picks:
        if key not in seen:
            seen.add(key)
            out.append((label, key))
    return out


def save_example_figures(model: ModelLike, views: ViewsLike, scores: HeadScores, out_dir: str | Path, n_queries: int = 4,
                         sample: int = 0, labels: Mapping[HeadRef, Sequence[str]] | None = None,
                         queries: Sequence[int] | None = None) -> dict[str, Path]:
    """Figure-15-style overlays (every head of the best correspondence block, the strongest register
    block and the most local block) and the correspondence lines of the best head per layer, on
    pair ``sample`` of ``views``. ``labels`` replaces the heads' titles (default: their labels);
    ``queries`` fixes the query patches (default: ``n_queries`` spread over the matched patches).
    Returns ``{name: path}``."""
    out = Path(out_dir)
    labels = labels if labels is not None else scores.labels()
    paths: dict[str, Path] = {}
    _, pair = _one_pair(model, views, sample)
    p = as_module(model).patch_size
    for label, (site, qv, kv) in _example_blocks(scores):
        unit = scores.unit(site, qv, kv)
        refs = [HeadRef(site, qv, kv, h) for h in range(unit.site.n_heads)]
        t = _targets(pair, qv, kv, p)
        chosen = [q for q in queries or () if q < unit.n_tokens]
        queries_ = chosen or default_queries(unit.grid, n_queries, t.match[0] if t is not None else None)
        name = f"overlay_{label}_{site}_q{qv}k{kv}"
        paths[name] = plot_attention_overlays(model, pair, refs, out / "overlays" / f"{name}.png", queries=queries_,
                                              labels=labels)
    has_geometry = all(all(k in v for k in GEOMETRY_KEYS) for v in pair)
    if scores.best_per_layer() and has_geometry:
        paths["correspondence_lines"] = plot_correspondence_lines(model, pair, scores, out / "correspondence_lines.png")
    return paths
