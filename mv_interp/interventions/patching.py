"""Activation patching runs and sweeps (layers × sites, × heads or × positions) with heatmaps.

Three ways to run a clean → corrupted patch, with the same result:

* ``"hooks"``: ``run_with_cache`` on the clean pair, then ``run_with_hooks`` on the corrupted one;
* ``"traces"``: two nnsight traces (read the clean activations, then edit the corrupted run);
* ``"invokes"``: one nnsight trace with two invokes — clean and corrupted run as one batch,
  a barrier hands each clean activation to the corrupted invoke.

Example::

    >>> sweep = patching_sweep(model, clean=(c1, c2), corrupted=(x1, x2), per="site")
    >>> sweep.values.shape        # [sites, layers]; 0 = clean behaviour restored, 1 = as corrupted
    >>> sweep.heatmap("patching.png")
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import nnsight
import torch
from torch import Tensor

from ..errors import WrongTypeError
from ..types import ModelLike, ViewInputs, as_module, is_traced
from .metrics import Metric, distance_to, metric_name, reduce_metric
from .sites import hook_info
from .attribution import attribution_patching
from .specs import Intervention, read_source_nnsight
from .sweep import PER, PatchingSweep, sweep_cells, view_args  # noqa: F401 - re-exported

METHODS = ("hooks", "traces", "invokes")


def run_patched(model: ModelLike, spec: Intervention, clean: ViewInputs, corrupted: ViewInputs, *,
                method: str = "hooks", n_views: int | None = None) -> Any:
    """Run ``corrupted`` with ``spec``'s source activations taken from a run of ``clean``.

    Works for any spec; specs without a source (knockout, zero ablation) just run on
    ``corrupted``. Returns the raw model output of the patched run.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    clean, corrupted = view_args(clean, "clean"), view_args(corrupted, "corrupted")
    n_views = n_views if n_views is not None else len(corrupted)
    hooks = spec.source_hooks(model)
    with torch.no_grad():
        if method == "hooks":
            cache = {}
            if hooks:
                _, cache = model.run_with_cache(*clean, names_filter=hooks)
            return model.run_with_hooks(*corrupted, fwd_hooks=spec.fwd_hooks(model, source=cache, n_views=n_views))
        _require_nnsight(model)
        if method == "traces":
            source = read_clean_nnsight(model, clean, hooks)
            with model.trace(*corrupted):
                spec.apply_nnsight(model, source=source, n_views=n_views)
                out = model.output.save()
            return out
        with model.trace() as tracer:
            barrier, source = tracer.barrier(2), {}
            with tracer.invoke(*clean):
                read_source_nnsight(model, hooks, barrier, into=source)
            with tracer.invoke(*corrupted):
                spec.apply_nnsight(model, source=source, n_views=n_views, barrier=barrier)
                out = model.output.save()
        return out


def read_clean_nnsight(model: ModelLike, clean: ViewInputs, hooks: Sequence[str]) -> dict[str, Tensor]:
    """The activations of ``hooks`` on ``clean``, read in one nnsight trace."""
    with torch.no_grad():
        with model.trace(*clean):
            source = nnsight.save(read_source_nnsight(model, hooks))
    return dict(source)


def _require_nnsight(model: ModelLike) -> None:
    if not is_traced(model):
        raise WrongTypeError("methods 'traces' and 'invokes' need the nnsight-wrapped model (mv_interp.MVModel); "
                             "use method='hooks' with a plain module")


# --------------------------------------------------------------------------------------
# Sweeps (the result type and the cells are in sweep.py, shared with attribution patching)
# --------------------------------------------------------------------------------------


def patching_sweep(model: ModelLike, clean: ViewInputs, corrupted: ViewInputs, *, per: str = "site",
                   metric: Metric | None = None, normalize: bool = True, stack: str = "dec",
                   kinds: Sequence[str] | None = None, views: Sequence[int] | None = None,
                   layers: Sequence[int] | None = None, sublayers: bool = True, method: str = "hooks",
                   n_views: int | None = None, progress: bool = False, cells_per_forward: int = 1) -> PatchingSweep:
    """Patch each site (or head, or token) from the clean run into the corrupted run, one at a time.

    ``metric(outputs) -> Tensor`` takes the per-view outputs (``model.view_outputs(out)``) and returns a
    scalar or per-example values; default: the mean pointmap distance to the clean run
    (:func:`~mv_interp.interventions.metrics.distance_to`). With ``normalize``, values are
    ``(m - m_clean) / (m_corrupted - m_clean)``: 0 where patching restores the clean output, 1 where it
    does nothing. One forward per cell (two with ``method="invokes"``, which also re-runs the clean pair);
    with ``method="hooks"``, ``cells_per_forward=K`` runs K cells in one forward of the corrupted
    inputs repeated K times, each cell's hooks patching only its own copy (the same values up to
    float rounding; fewer, larger forwards: faster on a GPU).
    ``method="attribution"``: the first-order estimate of every cell from two forwards and one backward
    (:func:`~mv_interp.interventions.attribution.attribution_patching`).
    """
    if method == "attribution":
        return attribution_patching(model, clean, corrupted, per=per, metric=metric, normalize=normalize, stack=stack,
                                    kinds=kinds, views=views, layers=layers, sublayers=sublayers, n_views=n_views)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    clean, corrupted = view_args(clean, "clean"), view_args(corrupted, "corrupted")
    n_views = n_views if n_views is not None else len(corrupted)
    module = as_module(model)
    t0 = time.perf_counter()
    with torch.no_grad():
        clean_out = model.forward(*clean) if is_traced(model) else model(*clean)
        corrupted_out = model.forward(*corrupted) if is_traced(model) else model(*corrupted)
    n_tokens = None
    if per == "position":
        img = clean[0]["img"] if isinstance(clean[0], dict) else clean[0]
        n_tokens = (img.shape[-2] // module.patch_size) * (img.shape[-1] // module.patch_size)
    rows, cols, inner, hooks, cells = sweep_cells(model, per, stack=stack, kinds=kinds, views=views,
                                                  layers=layers, sublayers=sublayers, n_tokens=n_tokens,
                                                  n_views=n_views)
    if metric is None:
        metric = distance_to(module.view_outputs(clean_out))
    evaluate: Callable[[Any], float] = lambda out: reduce_metric(metric(module.view_outputs(out)))  # noqa: E731
    m_clean, m_corrupt = evaluate(clean_out), evaluate(corrupted_out)
    if normalize and abs(m_corrupt - m_clean) < 1e-12:
        raise ValueError(f"the metric is the same on the clean and the corrupted run ({m_clean:.6g}); nothing to "
                         "normalise — choose pairs or a metric that tell them apart, or pass normalize=False")
    shape = (len(rows), len(cols)) + ((len(inner),) if inner is not None else ())
    raw = torch.full(shape, float("nan"), dtype=torch.float64)
    source: dict[str, Tensor] | Any = {}
    needed = list(dict.fromkeys(c.spec.hook for c in cells))
    with torch.no_grad():
        if method == "hooks":
            _, source = model.run_with_cache(*clean, names_filter=needed)
        elif method == "traces":
            _require_nnsight(model)
            source = read_clean_nnsight(model, clean, needed)
    if cells_per_forward < 1:
        raise ValueError(f"cells_per_forward must be >= 1, got {cells_per_forward}")
    if cells_per_forward > 1 and method != "hooks":
        raise ValueError(f"cells_per_forward={cells_per_forward} needs method='hooks' (got {method!r})")
    iterator = cells if cells_per_forward == 1 else []
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=f"patching per {per}")
    for chunk in _chunks(cells, cells_per_forward) if cells_per_forward > 1 else ():
        with torch.no_grad():
            outs = _run_cells(model, module, chunk, corrupted, source, n_views)
        for cell, out in zip(chunk, outs):
            idx = (cell.row, cell.col) + ((cell.inner,) if cell.inner is not None else ())
            raw[idx] = reduce_metric(metric(out))
    for cell in iterator:
        with torch.no_grad():
            if method == "hooks":
                out = model.run_with_hooks(*corrupted, fwd_hooks=cell.spec.fwd_hooks(model, source=source,
                                                                                       n_views=n_views))
            elif method == "traces":
                with model.trace(*corrupted):
                    cell.spec.apply_nnsight(model, source=source, n_views=n_views)
                    out = model.output.save()
            else:
                out = run_patched(model, cell.spec, clean, corrupted, method="invokes", n_views=n_views)
        idx = (cell.row, cell.col) + ((cell.inner,) if cell.inner is not None else ())
        raw[idx] = evaluate(out)
    values = (raw - m_clean) / (m_corrupt - m_clean) if normalize else raw.clone()
    img = clean[0]["img"] if isinstance(clean[0], dict) else clean[0]
    return PatchingSweep(
        values=values.float(), raw=raw.float(), sites=rows, layers=cols, inner=inner, hooks=hooks, per=per,
        metric=metric_name(metric), clean_value=m_clean, corrupted_value=m_corrupt, normalized=normalize,
        method=method, seconds=time.perf_counter() - t0,
        extra={"stack": stack, "input_shape": list(img.shape), "cells_per_forward": cells_per_forward,
               "n_forwards": math.ceil(len(cells) / cells_per_forward) * (2 if method == "invokes" else 1)},
    )


def _chunks(items: Sequence[Any], k: int) -> list[Sequence[Any]]:
    return [items[i : i + k] for i in range(0, len(items), k)]


def _run_cells(model: ModelLike, module: Any, chunk: Sequence[Any], corrupted: ViewInputs, source: Any,
               n_views: int) -> list[list[dict[str, Tensor]]]:
    """One forward of ``corrupted`` repeated ``len(chunk)`` times along the batch, cell ``j``'s hooks
    patching copy ``j`` only; returns each cell's per-view outputs (as one forward per cell gives).

    Copy ``j`` is examples ``j·B … (j+1)·B − 1`` of the batch axis; where a hook stacks views on the
    batch axis (view-major, :data:`~mv_interp.adapters.base.TokenLayout` ``"stacked"``), it is that
    range within each view's block."""
    K = len(chunk)
    views = [v["img"] if isinstance(v, dict) else v for v in corrupted]
    B = views[0].shape[0]
    repeated = [v.repeat(K, *([1] * (v.ndim - 1))) for v in views]
    per_hook: dict[str, list[tuple[int, Callable]]] = {}
    for j, cell in enumerate(chunk):
        for name, fn in cell.spec.fwd_hooks(model, source=source, n_views=n_views):
            per_hook.setdefault(name, []).append((j, fn))

    def hook_for(name: str, items: list[tuple[int, Callable]]) -> Callable:
        stacked = hook_info(model, name).layout == "stacked"

        def hook(act: Tensor, hook: Any) -> Tensor:
            act = act.contiguous()
            rest = act.shape[1:]
            grid = act.view(n_views, K, B, *rest) if stacked else act.view(K, B, *rest)
            for j, fn in items:
                sub = grid[:, j].reshape(n_views * B, *rest) if stacked else grid[j]
                res = fn(sub, hook)
                res = sub if res is None else res
                if stacked:
                    grid[:, j] = res.view(n_views, B, *rest)
                elif res is not sub:
                    grid[j] = res
            return act

        return hook

    out = module.run_with_hooks(*repeated, fwd_hooks=[(name, hook_for(name, items)) for name, items in per_hook.items()])
    outs = module.view_outputs(out)
    return [[{k: (t[j * B : (j + 1) * B] if isinstance(t, Tensor) and t.shape[:1] == (K * B,) else t)
              for k, t in o.items()} for o in outs] for j in range(K)]
