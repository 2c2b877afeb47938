"""What an activation-patching sweep is made of: its cells (one patch each) and its result.

Shared by :func:`~mv_interp.interventions.patching.patching_sweep` (one forward per cell) and
:func:`~mv_interp.interventions.attribution.attribution_patching` (every cell to first order), so
both select the same things and return the same :class:`PatchingSweep`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import OutOfRangeError, UnknownNameError
from ..io import atomic_write
from ..types import ModelLike, ViewInputs, as_module
from .specs import ActivationPatch

PER = ("site", "head", "position")


def view_args(views: ViewInputs, what: str) -> tuple:
    """``views`` as a tuple of per-view model inputs (two at least); ``what`` names it in the error."""
    if isinstance(views, Tensor) or not isinstance(views, Sequence) or len(views) < 2:
        raise ValueError(f"{what} must be a sequence of views (img1, img2, ...), each [batch, 3, H, W]")
    return tuple(views)


# --------------------------------------------------------------------------------------
# Sweeps
# --------------------------------------------------------------------------------------


@dataclass
class PatchingSweep:
    """The result of :func:`patching_sweep`: one metric value per cell, and how to read it."""

    values: Tensor
    """``[site, layer]`` (``per="site"``) or ``[site, layer, head | position]``; normalised so the clean
    run is 0 and the corrupted run 1 when ``normalized``; NaN where a cell does not exist."""
    raw: Tensor
    """The metric's own values, same shape (not normalised)."""
    sites: list[str]
    """Row labels: ``"{kind}.v{view}"`` of the patched site."""
    layers: list[int]
    """Column labels: block indices."""
    inner: list[int] | None
    """Heads or positions along the third axis (``None`` for ``per="site"``)."""
    hooks: list[list[str | None]]
    """Hook patched at each ``[site][layer]`` (``None`` where the cell does not exist)."""
    per: str
    """``"site"``, ``"head"`` or ``"position"``."""
    metric: str
    """Name of the metric."""
    clean_value: float
    """Metric on the clean run."""
    corrupted_value: float
    """Metric on the corrupted run."""
    normalized: bool
    """True when ``values = (raw - clean) / (corrupted - clean)``."""
    method: str
    """How the runs were made (``hooks``, ``traces``, ``invokes``)."""
    seconds: float = 0.0
    """Wall time of the sweep."""
    extra: dict = field(default_factory=dict)
    """Anything else worth recording (stack, views, input shape)."""

    def cell(self, site: str, layer: int, inner: int | None = None) -> float:
        """The value at one cell, by labels."""
        if site not in self.sites:
            raise UnknownNameError(f"site {site!r} not in this sweep; sites: {self.sites}")
        if layer not in self.layers:
            raise UnknownNameError(f"layer {layer} not in this sweep; layers: {self.layers}")
        v = self.values[self.sites.index(site), self.layers.index(layer)]
        if self.inner is not None:
            if inner is None or inner not in self.inner:
                raise UnknownNameError(f"give the {self.per} (one of {self.inner})")
            v = v[self.inner.index(inner)]
        return float(v)

    def to_dict(self) -> dict[str, Any]:
        return {
            "per": self.per, "metric": self.metric, "normalized": self.normalized, "method": self.method,
            "sites": self.sites, "layers": self.layers, "inner": self.inner, "hooks": self.hooks,
            "clean_value": self.clean_value, "corrupted_value": self.corrupted_value, "seconds": self.seconds,
            "values": _nan_to_none(self.values.tolist()), "raw": _nan_to_none(self.raw.tolist()), **self.extra,
        }

    def save(self, directory: str | Path, name: str = "patching") -> dict[str, Path]:
        """Write ``{name}.json`` (labels + values), ``{name}.safetensors`` and ``{name}.png``, atomically."""
        from safetensors.torch import save_file

        directory = Path(directory)
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        tensors = {"values": self.values.contiguous(), "raw": self.raw.contiguous()}
        return {
            "json": atomic_write(directory / f"{name}.json", lambda p: Path(p).write_text(text)),
            "tensors": atomic_write(directory / f"{name}.safetensors", lambda p: save_file(tensors, str(p))),
            "heatmap": self.heatmap(directory / f"{name}.png"),
        }

    def heatmap(self, path: str | Path, title: str | None = None) -> Path:
        """Save the sweep as a PNG heatmap (one panel per site when there is a third axis)."""
        from matplotlib.figure import Figure

        label = self.metric + (" (normalised)" if self.normalized else "")
        vals = self.values.float().numpy()
        finite = vals[~(vals != vals)]
        vmin = min(0.0, float(finite.min())) if finite.size else 0.0
        vmax = max(1.0, float(finite.max())) if finite.size else 1.0
        kw = dict(cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
        if self.inner is None:
            fig = Figure(figsize=(2.2 + 0.55 * len(self.layers), 1.2 + 0.4 * len(self.sites)), dpi=120,
                         layout="constrained")
            ax = fig.add_subplot(1, 1, 1)
            im = ax.imshow(vals, **kw)
            ax.set_xticks(range(len(self.layers)), [str(x) for x in self.layers])
            ax.set_yticks(range(len(self.sites)), self.sites)
            ax.set_xlabel("layer")
            if vals.size <= 400:
                _annotate(ax, vals, vmin, vmax)
            fig.colorbar(im, ax=ax, label=label)
        else:
            n = len(self.sites)
            cols = min(n, 4)
            rows = math.ceil(n / cols)
            width = min(3.6, 1.0 + 0.3 * len(self.inner))
            fig = Figure(figsize=(1.5 + width * cols, 0.9 + (0.6 + 0.35 * len(self.layers)) * rows), dpi=120,
                         layout="constrained")
            axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
            step = max(1, len(self.inner) // 12)
            for i, (ax, name, panel) in enumerate(zip(axes, self.sites, vals)):
                im = ax.imshow(panel, **kw)
                ax.set_title(name, fontsize=9)
                ax.set_yticks(range(len(self.layers)), [str(x) for x in self.layers])
                ax.set_xticks(range(0, len(self.inner), step), [str(x) for x in self.inner[::step]])
                if i % cols == 0:
                    ax.set_ylabel("layer")
                ax.set_xlabel(self.per)
                if panel.size <= 64:
                    _annotate(ax, panel, vmin, vmax)
            fig.colorbar(im, ax=axes, label=label)
        scale = "; 0 = clean output restored, 1 = as corrupted" if self.normalized else ""
        what = "attribution patching (first-order estimate)" if self.method == "attribution" else "activation patching"
        fig.suptitle(title or f"{what} per {self.per}{scale}", fontsize=10)
        return atomic_write(path, lambda p: fig.savefig(p, format="png", bbox_inches="tight"))


def _annotate(ax: Any, vals: Any, vmin: float, vmax: float) -> None:
    for i in range(vals.shape[0]):
        for j in range(vals.shape[1]):
            v = float(vals[i, j])
            if v == v:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < (vmin + vmax) / 2 else "black")


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return None if isinstance(x, float) and x != x else x


@dataclass(frozen=True)
class SweepCell:
    """One cell of a sweep: its row, column, inner index (head or position) and the patch it makes."""

    row: int
    col: int
    inner: int | None
    spec: ActivationPatch


def sweep_cells(model: ModelLike, per: str = "site", *, stack: str = "dec", kinds: Sequence[str] | None = None,
                views: Sequence[int] | None = None, layers: Sequence[int] | None = None,
                sublayers: bool = True, n_tokens: int | None = None, n_views: int | None = None):
    """(sites, layers, inner, hooks, cells) of a sweep, from the model's probe / attention sites.

    ``per="site"``: every residual after a skip connection (and, with ``sublayers``, every sublayer
    output) of ``stack``; ``per="head"``: every head output (``hook_z``) of every attention site;
    ``per="position"``: the ``per="site"`` hooks one token at a time (``n_tokens`` per view).
    """
    if per not in PER:
        raise ValueError(f"per must be one of {PER}, got {per!r}")
    module = as_module(model)
    entries: list[tuple[str, int, str, int]] = []  # (row label, layer, hook, view)
    if per in ("site", "position"):
        all_sites = module.probe_sites(encoder_blocks=stack == "enc", sublayers=sublayers, n_views=n_views)
        stacks = sorted({s.stack for s in all_sites})
        if stack not in stacks:
            raise ValueError(f"stack={stack!r} has no sites; valid stacks: {stacks}")
        chosen = [s for s in all_sites if s.stack == stack and s.layer >= 0]
        have = sorted({s.kind for s in chosen})
        for s in sorted(chosen, key=lambda s: (s.view, s.order)):
            if n_views is None or s.view <= n_views:
                entries.append((f"{s.kind}.v{s.view}", s.layer, s.hook, s.view))
    else:
        att = module.attention_sites(n_views=n_views)  # per-view sites of a many-view model: the run's views
        stacks = sorted({s.stack for s in att})
        if stack not in stacks:
            raise ValueError(f"stack={stack!r} has no attention sites; valid stacks: {stacks}")
        chosen_att = [s for s in att if s.stack == stack]
        have = sorted({s.kind for s in chosen_att})
        for s in chosen_att:
            if s.query_view:
                query_views: Sequence[int] = (s.query_view,)
            elif s.layout == "global":  # attention over all views' tokens: as many views as the run
                query_views = range(1, (n_views or len(s.key_views)) + 1)
            else:
                query_views = s.key_views
            for v in query_views:
                entries.append((f"{s.kind}.v{v}", s.layer, s.z_hook, v))
    if kinds is not None:
        for k in kinds:
            if k not in have:
                raise ValueError(f"kind {k!r} is not a {'site' if per != 'head' else 'attention'} kind of the "
                                 f"{stack} stack; valid kinds: {have}")
        entries = [e for e in entries if e[0].rsplit(".v", 1)[0] in kinds]
    if views is not None:
        have_views = sorted({e[3] for e in entries})
        for v in views:
            if v not in have_views:
                raise OutOfRangeError(f"view {v} out of range for this sweep (valid views: {have_views})")
        entries = [e for e in entries if e[3] in views]
    all_layers = sorted({e[1] for e in entries})
    if layers is not None:
        for layer in layers:
            if layer not in all_layers:
                raise OutOfRangeError(f"layer {layer} out of range for the {stack} sweep "
                                 f"(valid: {all_layers[0]}..{all_layers[-1]})")
        entries = [e for e in entries if e[1] in layers]
    if not entries:
        raise ValueError("the sweep selects no site; loosen kinds / views / layers")
    rows = list(dict.fromkeys(e[0] for e in entries))
    cols = sorted({e[1] for e in entries})
    hooks: list[list[str | None]] = [[None] * len(cols) for _ in rows]
    inner: list[int] | None = None
    if per == "head":
        n_heads = max(s.n_heads for s in module.attention_sites() if s.stack == stack)
        inner = list(range(n_heads))
    elif per == "position":
        if n_tokens is None:
            raise ValueError("per='position' needs the number of tokens per view (n_tokens)")
        inner = list(range(n_tokens))
    cells: list[SweepCell] = []
    for label, layer, hook, view in entries:
        r, c = rows.index(label), cols.index(layer)
        hooks[r][c] = hook
        if per == "site":
            cells.append(SweepCell(r, c, None, ActivationPatch(hook=hook, view=view)))
        elif per == "head":
            n_h = next(s.n_heads for s in module.attention_sites() if s.z_hook == hook)
            cells += [SweepCell(r, c, h, ActivationPatch(hook=hook, heads=(h,), view=view)) for h in range(n_h)]
        else:
            cells += [SweepCell(r, c, p, ActivationPatch(hook=hook, positions=(p,), view=view)) for p in inner]
    return rows, cols, inner, hooks, cells
