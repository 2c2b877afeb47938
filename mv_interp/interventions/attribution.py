"""Gradient-based attribution: attribution patching and direct pointmap attribution.

**Attribution patching** is the first-order approximation of activation patching: with the
corrupted run's activations ``a'``, the clean run's ``a`` and the gradient ``g`` of the metric at
the corrupted run, patching a part ``S`` of one hook changes the metric by about
``Σ_S (a - a') · g``. One clean forward, one corrupted forward and one backward give every
site, head and token at once, in the format of :func:`~mv_interp.interventions.patching_sweep`::

    >>> approx = attribution_patching(model, clean=(c1, c2), corrupted=(x1, x2), per="head")
    >>> approx.values.shape        # as patching_sweep(..., per="head"): [sites, layers, heads]

**Direct pointmap attribution** is the 3D analogue of direct logit attribution: the final
residual of a view is a sum of components (embedding, every attention head, every MLP —
``cache.decompose_resid(split_heads=True)``); each component, through the final norm with its
scale frozen at the clean run and the head's linearisation there, moves the pointmap by
``J · norm(component)``. For a head that is linear in its input this is exact::

    >>> dpa = direct_pointmap_attribution(model, (img1, img2), view=2)
    >>> dpa.summary()[:3]          # the components that place view 2's points, largest first
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..cache import final_resid_site, frozen_norm, norm_bias
from ..adapters.base import MultiViewModel
from ..model import model_inputs
from ..types import ModelLike, ViewInputs, as_module
from .metrics import Metric, distance_to, metric_name, reduce_metric
from .sweep import PatchingSweep, sweep_cells, view_args

# --------------------------------------------------------------------------------------
# Attribution patching
# --------------------------------------------------------------------------------------


def _selection_mask(model: ModelLike, cell: Any, like: Tensor, n_views: int) -> Tensor:
    """The elements of ``like`` that ``cell``'s patch replaces, as a float mask.

    Patching a zero tensor from a source of ones with the cell's own spec marks exactly the
    elements that activation patching would copy, so both methods select the same things.
    """
    (name, fn), = cell.spec.fwd_hooks(model, source={cell.spec.hook: torch.ones_like(like)}, n_views=n_views)
    out = fn(torch.zeros_like(like), None)
    return out.to(like.dtype)


def attribution_patching(model: ModelLike, clean: ViewInputs, corrupted: ViewInputs, *, per: str = "site",
                         metric: Metric | None = None, normalize: bool = True, stack: str = "dec",
                         kinds: Sequence[str] | None = None, views: Sequence[int] | None = None,
                         layers: Sequence[int] | None = None, sublayers: bool = True,
                         n_views: int | None = None) -> PatchingSweep:
    """Estimate every cell of ``patching_sweep(model, clean, corrupted, ...)`` to first order.

    Same arguments (but no ``method``) and the same :class:`PatchingSweep`, with ``method`` set to
    ``"attribution"``: ``raw`` holds ``m(corrupted) + Σ (a_clean - a_corrupted) · ∂m/∂a`` over the
    elements each cell patches, where ``m`` is the batch mean of ``metric`` (default: the mean
    pointmap distance to the clean run) and the gradient is taken at the corrupted run. Costs two
    forwards and one backward whatever the number of cells. The approximation is good where the
    metric is close to linear in the patched activation; check it against ``patching_sweep`` on
    a few cells (``docs/interventions.md`` reports the rank correlation on ``dust3r-toy``).
    """
    clean, corrupted = view_args(clean, "clean"), view_args(corrupted, "corrupted")
    n_views = n_views if n_views is not None else len(corrupted)
    module = as_module(model)
    t0 = time.perf_counter()
    n_tokens = None
    img = clean[0]["img"] if isinstance(clean[0], dict) else clean[0]
    if per == "position":
        n_tokens = (img.shape[-2] // module.patch_size) * (img.shape[-1] // module.patch_size)
    rows, cols, inner, hooks, cells = sweep_cells(model, per, stack=stack, kinds=kinds, views=views, layers=layers,
                                                  sublayers=sublayers, n_tokens=n_tokens, n_views=n_views)
    needed = list(dict.fromkeys(c.spec.hook for c in cells))
    with torch.no_grad():
        clean_out, clean_cache = model.run_with_cache(*clean, names_filter=needed)
    if metric is None:
        metric = distance_to(module.view_outputs(clean_out))
    corrupted_out, cache = model.run_with_cache(*corrupted, names_filter=needed, incl_bwd=True, metric=metric)
    m_clean = reduce_metric(metric(module.view_outputs(clean_out)))
    m_corrupt = reduce_metric(metric(module.view_outputs(corrupted_out)))
    if normalize and abs(m_corrupt - m_clean) < 1e-12:
        raise ValueError(f"the metric is the same on the clean and the corrupted run ({m_clean:.6g}); nothing to "
                         "normalise — choose pairs or a metric that tell them apart, or pass normalize=False")
    # first-order effect of patching every element of each hook, summed per cell below
    effect = {h: (clean_cache[h].double() - cache[h].double()) * cache[h + "_grad"].double() for h in needed}
    shape = (len(rows), len(cols)) + ((len(inner),) if inner is not None else ())
    raw = torch.full(shape, float("nan"), dtype=torch.float64)
    for cell in cells:
        e = effect[cell.spec.hook]
        idx = (cell.row, cell.col) + ((cell.inner,) if cell.inner is not None else ())
        raw[idx] = m_corrupt + float((e * _selection_mask(model, cell, e, n_views)).sum())
    values = (raw - m_clean) / (m_corrupt - m_clean) if normalize else raw.clone()
    return PatchingSweep(
        values=values.float(), raw=raw.float(), sites=rows, layers=cols, inner=inner, hooks=hooks, per=per,
        metric=metric_name(metric), clean_value=m_clean, corrupted_value=m_corrupt, normalized=normalize,
        method="attribution", seconds=time.perf_counter() - t0,
        extra={"stack": stack, "input_shape": list(img.shape), "n_forwards": 2, "n_backwards": 1,
               "approximation": "first order at the corrupted run (attribution patching)"},
    )


# --------------------------------------------------------------------------------------
# Direct pointmap attribution
# --------------------------------------------------------------------------------------


@dataclass
class PointmapAttribution:
    """What :func:`direct_pointmap_attribution` returns: per-component pointmap contributions."""

    contributions: Tensor
    """``[component, batch, H, W, C]``: how much each component moves the target, per pixel."""
    labels: list[str]
    """Component names: ``"dec_in.v2"`` (embedding), ``"dec1.cross.v2.h3"`` (a head),
    ``"dec1.cross.v2.bias"`` (its layer's out-projection bias), ``"dec1.mlp_out.v2"``, and
    ``"final_norm.bias"`` when there is no reference run."""
    view: int
    """1-based view whose final residual and output are attributed."""
    target: str
    """The output key attributed (``"pts3d"``, ``"conf"``, …)."""
    patch_size: int
    output: Tensor
    """The target on the run attributed, ``[batch, H, W, C]``."""
    change: Tensor
    """What the contributions sum to if the head is linear: the target minus the target when the
    head input is the reference one (the reference run's, or the final norm's bias alone)."""
    reference: str
    """``"run"`` (a reference run's components subtracted) or ``"none"``."""
    extra: dict = field(default_factory=dict)

    @property
    def total(self) -> Tensor:
        """The sum over components, ``[batch, H, W, C]`` (equals :attr:`change` for a linear head)."""
        return self.contributions.sum(0)

    @property
    def relative_error(self) -> float:
        """``‖total − change‖ / ‖change‖``: 0 for a linear head; the head's nonlinearity otherwise."""
        return float((self.total - self.change).norm() / self.change.norm().clamp_min(1e-12))

    def per_patch(self) -> Tensor:
        """Contributions averaged over each patch's pixels: ``[component, batch, pos, C]`` (row-major)."""
        p = self.patch_size
        c = self.contributions
        k, b, H, W, C = c.shape
        return c.reshape(k, b, H // p, p, W // p, p, C).mean(dim=(3, 5)).reshape(k, b, (H // p) * (W // p), C)

    def summary(self) -> list[dict[str, Any]]:
        """One row per component, largest first: ``mean_norm`` (mean ‖contribution‖ per pixel) and
        ``share`` (its projection on :attr:`change` over ‖change‖²; the shares sum to about 1)."""
        c = self.contributions.flatten(1, -2)  # [component, pixels, C]
        ch = self.change.flatten(0, -2)
        norms = c.norm(dim=-1).mean(dim=1)
        share = (c * ch).sum(dim=(1, 2)) / ch.pow(2).sum().clamp_min(1e-12)
        rows = [{"component": lab, "mean_norm": float(n), "share": float(s)}
                for lab, n, s in zip(self.labels, norms, share)]
        return sorted(rows, key=lambda r: -r["mean_norm"])


def _put_view_tokens(full: Tensor, site: Any, n_views: int, tokens: Tensor) -> Tensor:
    """``full`` with ``site.view``'s tokens replaced (the inverse of ``view_tokens``), out of place."""
    v = site.view - 1
    if site.layout == "view":
        return tokens
    out = full.clone()
    if site.layout == "stacked":
        out.reshape(n_views, full.shape[0] // n_views, *full.shape[1:])[v] = tokens
    elif site.layout == "concat":
        per = full.shape[1] // n_views
        out[:, v * per : (v + 1) * per] = tokens
    else:
        raise ValueError(f"unknown token layout {site.layout!r}")
    return out


def _repeat(x: Any, k: int, batch: int) -> Any:
    """``x`` with its batch axis repeated ``k`` times (replica-major), if it has one."""
    if isinstance(x, Tensor) and x.ndim and x.shape[0] == batch:
        return torch.cat([x] * k)
    return x


def _head_map(module: MultiViewModel, views: Sequence[Tensor], kwargs: dict, hook: str, site: Any, n_views: int,
              view: int, target: str, u: Tensor, tangents: Tensor | None) -> Tensor:
    """The target of ``view`` when its head input is ``u`` ``[batch, pos, d]``; with ``tangents``
    ``[k, batch, pos, d]``, the target's Jacobian-vector products along each of them instead,
    ``[k, batch, H, W, …]``.

    The ``k`` products run as one forward on the views repeated ``k`` times and two backward
    passes through the part after the head input (``J t = ∂/∂v ⟨Jᵀ v, t⟩``; reverse mode only, which
    every op supports)."""
    k = 1 if tangents is None else tangents.shape[0]
    batch = u.shape[0]
    views = tuple(_repeat(v, k, batch) for v in views)
    kwargs = {key: _repeat(val, k, batch) for key, val in kwargs.items()}
    primal = torch.cat([u] * k).detach().requires_grad_(tangents is not None)

    def replace(x: Tensor, _hook: Any) -> Tensor:
        return _put_view_tokens(x.detach(), site, n_views, primal.to(x.dtype))

    if tangents is None:
        with torch.no_grad(), module.hooks([(hook, replace)]):
            return module.view_outputs(module(*views, **kwargs))[view - 1][target]
    with torch.enable_grad(), module.hooks([(hook, replace)]):
        y = module.view_outputs(module(*views, **kwargs))[view - 1][target]
        if not y.requires_grad:  # the target does not depend on the head input
            return torch.zeros_like(y).unflatten(0, (k, batch))
        v = torch.zeros_like(y, requires_grad=True)
        (jtv,) = torch.autograd.grad(y, primal, grad_outputs=v, create_graph=True)
        (jt,) = torch.autograd.grad(jtv, v, grad_outputs=tangents.flatten(0, 1).to(jtv.dtype), allow_unused=True)
    jt = torch.zeros_like(y) if jt is None else jt
    return jt.detach().unflatten(0, (k, batch))


def _normed_components(module: MultiViewModel, views: Sequence[Tensor], kwargs: dict, view: int, heads: bool,
                       n_views: int) -> tuple[Tensor, list[str], Tensor, Tensor]:
    """(components through the frozen final norm, labels, the norm's bias, the head input)."""
    names = ({s.hook for s in module.probe_sites(sublayers=True, n_views=n_views) if s.stack == "dec"}
             | {a.z_hook for a in module.attention_sites(n_views=n_views) if a.stack == "dec"}
             | {module.head_input_hook(view)})
    with torch.no_grad():
        _, cache = module.run_with_cache(*views, names_filter=sorted(names), **kwargs)
        parts, labels = cache.decompose_resid(view=view, split_heads=heads, return_labels=True)
        norm = module.resid_norm(view)
        site = final_resid_site(module, view, n_views)
        resid = cache._tokens(site)
        normed = frozen_norm(norm, parts, resid)
        from ..adapters.base import view_tokens

        head_in = view_tokens(cache[module.head_input_hook(view)], site, n_views)
        return normed, labels, norm_bias(norm, normed[0]), head_in


def direct_pointmap_attribution(model: ModelLike, views: ViewInputs, *, view: int = 1, target: str = "pts3d",
                                heads: bool = True, reference: Sequence[Any] | None = None, chunk: int = 16,
                                **kwargs: Any) -> PointmapAttribution:
    """The contribution of each component of ``view``'s final residual to that view's ``target``.

    The residual read by the heads is split into the embedding, every attention head (plus each
    layer's out-projection bias; ``heads=False``: whole attention outputs) and every MLP
    (:meth:`~mv_interp.cache.CacheAlgebra.decompose_resid`). Each component goes through the final
    norm with the scale of the actual residual (so they stay additive) and through the head's
    Jacobian at this run's head input (Jacobian-vector products; exact when the target is linear in
    the head input, e.g. a linear head with ``depth_mode=("linear", ...)``). Only the direct path is
    attributed: heads that also read earlier layers (DPT) see those at their actual values.

    ``reference``: another set of views (e.g. the corrupted pair); contributions are then of each
    component's *change* (this run's minus the reference run's, each through its own run's norm
    scale) and sum, to first order, to the change of the target between the two runs.
    Without it the norm's bias is one more component and the contributions sum to the change from
    a head input of the bias alone. The components' JVPs run ``chunk`` at a time, each chunk as
    one forward on a batch ``chunk`` times larger.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    module = as_module(model)
    views = view_args(views, "views")
    views = model_inputs(views, module)
    n_views = len(views)
    if not 1 <= view <= n_views:
        raise IndexError(f"view {view} out of range for {n_views} views (valid: 1..{n_views})")
    hook, site = module.head_input_hook(view), final_resid_site(module, view, n_views)
    normed, labels, bias, head_in = _normed_components(module, views, kwargs, view, heads, n_views)
    with torch.no_grad():
        out = module.view_outputs(module(*views, **kwargs))[view - 1]
    if target not in out:
        raise KeyError(f"target {target!r} is not an output of view {view}; outputs: {sorted(out)}")
    if reference is not None:
        ref_views = model_inputs(view_args(reference, "reference"), module)
        ref_normed, ref_labels, _, ref_in = _normed_components(module, ref_views, kwargs, view, heads, n_views)
        if ref_labels != labels:
            raise ValueError("the reference run decomposes into other components; give views of the same shape")
        tangents, base_in = normed - ref_normed, ref_in
    else:
        tangents, base_in = torch.cat([normed, bias.unsqueeze(0)]), bias
        labels = labels + ["final_norm.bias"]
    contributions = torch.cat([_head_map(module, views, kwargs, hook, site, n_views, view, target, head_in, t)
                               for t in tangents.split(chunk)])
    base = _head_map(module, views, kwargs, hook, site, n_views, view, target, base_in, None)
    value = out[target]
    expand = (lambda t: t.unsqueeze(-1)) if value.ndim == 3 else (lambda t: t)  # conf: [batch, H, W]
    return PointmapAttribution(
        contributions=expand(contributions), labels=labels, view=view, target=target,
        patch_size=module.patch_size, output=expand(value), change=expand(value - base),
        reference="run" if reference is not None else "none",
        extra={"n_forwards": -(-len(tangents) // chunk) + 3 + (1 if reference is not None else 0),
               "head_input_error": float((normed.sum(0) + bias - head_in).detach().abs().max())},
    )
