"""The probes' training losses.

Pointmap probes: :func:`mv_interp.metrics.confidence_loss` (DUSt3R's confidence-aware
scale-invariant loss, α = 0.2) per location — both views of a place normalised jointly — summed
over locations. Depth probes: :func:`depth_confidence_loss` per location, summed.

The sum over locations is computed in one call: the locations are stacked on the batch axis.
With the "pixels" reduction every location contributes the same number of valid pixels, so the
pooled mean times the number of locations is exactly the sum of the per-location losses, and the
normalisation factors stay per item (per location and pair).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..metrics import _fp32_region, confidence_loss
from .config import ProbeSpec
from .sites import Location


def depth_confidence_loss(
    pred_depth: Sequence[Float[Tensor, "batch H W"]],
    conf: Sequence[Float[Tensor, "batch H W"]],
    gt_depth: Sequence[Float[Tensor, "batch H W"]],
    valid: Sequence[Bool[Tensor, "batch H W"]],
    alpha: float = 0.2,
) -> Float[Tensor, ""]:
    """Confidence-aware metric depth loss of the depth probes (appendix E.4's confidence-aware head).

    ``L = Σ_v mean_{i∈M^v}(C^v_i |d̂^v_i − d^v_i| − α log C^v_i)``, the mean pooling the valid
    pixels (``valid & d > 0``) of the whole batch; a view with none contributes 0.

    Units: ``|d̂ − d|`` is in the data's depth units (metric: no normalisation, as the paper's
    "metric depth probe"). Computes in fp32 with autocast off.
    """
    if not (len(pred_depth) == len(conf) == len(gt_depth) == len(valid)):
        raise ValueError("depth_confidence_loss: pass one tensor per view for every argument")
    with _fp32_region(pred_depth[0].device):
        total = torch.zeros((), device=pred_depth[0].device)
        for d_hat, c, d, m in zip(pred_depth, conf, gt_depth, valid):
            m = m & (d > 0)
            c = torch.where(m, c.float(), 1.0).clamp_min(torch.finfo(torch.float32).tiny)
            err = torch.where(m, (d_hat.float() - d.float()).abs(), 0.0)
            term = torch.where(m, c * err - alpha * torch.log(c), 0.0)
            total = total + term.sum() / m.sum().clamp_min(1)
    return total


def _repeat(x: Tensor, n: int) -> Tensor:
    return x.repeat(n, *([1] * (x.ndim - 1)))


Gather = Callable[[int, str], Tensor]


def _kind_loss(spec: ProbeSpec, terms: Sequence[tuple[tuple[int, ...], int, Gather]],
               views: Sequence[Mapping[str, Tensor]], alpha: float, n_locations: int,
               logs: dict) -> Tensor:
    """Σ over location groups of ``L ×`` the pooled loss of the group's ``L`` locations.

    Each term is ``(views, L, gather)``; ``gather(v, field)`` is the ``[L·batch, H, W(, 3)]``
    prediction of view ``v`` for the group's locations, location-major.
    """
    kind_total = torch.zeros((), device=views[0]["img"].device)
    for vs, L, gather in terms:
        gts = [views[v - 1] for v in vs]
        if spec.target == "pointmap":
            loss, parts = confidence_loss([gather(v, "pts3d") for v in vs], [gather(v, "conf") for v in vs],
                                          [_repeat(g["pts3d"], L) for g in gts],
                                          [_repeat(g["valid"], L) for g in gts], alpha=alpha)
            # Σ_v mean ℓ^v, averaged over locations: the geometry fit without the confidence terms
            logs[f"{spec.name}_regr"] = logs.get(f"{spec.name}_regr", 0) + parts["regr"] * L / n_locations
        else:
            missing = [v for v, g in zip(vs, gts) if "depth" not in g]
            if missing:
                raise ValueError(f"depth probes need 'depth' in every view; views {missing} lack it")
            loss = depth_confidence_loss([gather(v, "depth") for v in vs], [gather(v, "conf") for v in vs],
                                         [_repeat(g["depth"], L) for g in gts],
                                         [_repeat(g["valid"], L) for g in gts], alpha=alpha)
        kind_total = kind_total + L * loss
    logs[spec.name] = kind_total.detach()
    return kind_total


def probe_loss(
    outputs: Mapping[str, Mapping[str, Mapping[str, Tensor]]],
    locations: Sequence[Location],
    views: Sequence[Mapping[str, Tensor]],
    specs: Sequence[ProbeSpec],
    alpha: float = 0.2,
) -> tuple[Tensor, dict[str, float | Tensor]]:
    """Sum over probe kinds and locations of each location's joint loss.

    ``outputs`` is a :class:`~mv_interp.probes.ProbeSet`'s output, ``views`` the batch (``pts3d``,
    ``valid``; ``depth`` for depth probes). Returns ``(loss, logs)`` with a detached scalar per kind
    and, for pointmap kinds, ``<kind>_regr``: the plain regression term ``Σ_v mean ℓ^v`` averaged
    over locations (the geometry fit, without the confidence terms).
    """
    # locations with the same set of views fold into one call
    by_views: dict[tuple[int, ...], list[Location]] = {}
    for loc in locations:
        by_views.setdefault(loc.views, []).append(loc)
    total = torch.zeros((), device=views[0]["img"].device)
    logs: dict[str, Tensor] = {}
    for spec in specs:
        out = outputs[spec.name]

        def gather(locs: list[Location]) -> Gather:
            return lambda v, field: torch.cat([out[loc.site(v).name][field] for loc in locs])

        terms = [(vs, len(locs), gather(locs)) for vs, locs in by_views.items()]
        total = total + _kind_loss(spec, terms, views, alpha, len(locations), logs)
    return total, logs


@dataclass(frozen=True)
class LossPlan:
    """Which rows of the stacked probe outputs make up each location group (see :func:`stacked_probe_loss`).

    ``terms[kind]`` lists ``(group key, views, L, {view: member indices})``: the ``L`` locations of
    one input width and one set of views, location-major.
    """

    terms: dict[str, list[tuple[str, tuple[int, ...], int, dict[int, Tensor]]]]
    n_locations: int

    @classmethod
    def build(cls, locations: Sequence[Location], specs: Sequence[ProbeSpec],
              index: Mapping[tuple[str, str], tuple[str, int]], device: Any) -> LossPlan:
        terms: dict[str, list] = {}
        for spec in specs:
            groups: dict[tuple[str, tuple[int, ...]], list[Location]] = {}
            for loc in locations:
                groups.setdefault((index[(spec.name, loc.sites[0].name)][0], loc.views), []).append(loc)
            terms[spec.name] = [
                (key, vs, len(locs), {v: torch.tensor([index[(spec.name, loc.site(v).name)][1] for loc in locs],
                                                      device=device) for v in vs})
                for (key, vs), locs in groups.items()]
        return cls(terms, len(locations))


def stacked_probe_loss(
    outputs: Mapping[str, Mapping[str, Tensor]],
    plan: LossPlan,
    views: Sequence[Mapping[str, Tensor]],
    specs: Sequence[ProbeSpec],
    alpha: float = 0.2,
) -> tuple[Tensor, dict[str, float | Tensor]]:
    """:func:`probe_loss` on :meth:`ProbeBank.stacked` outputs (``{group key: {field: [site, batch, …]}}``):
    one gather per view and location group, no operation per site. Same value and logs."""
    total = torch.zeros((), device=views[0]["img"].device)
    logs: dict[str, Tensor] = {}
    for spec in specs:
        def gather(key: str, idx: dict[int, Tensor]) -> Gather:
            return lambda v, field: outputs[key][field].index_select(0, idx[v]).flatten(0, 1)

        terms = [(vs, L, gather(key, idx)) for key, vs, L, idx in plan.terms[spec.name]]
        total = total + _kind_loss(spec, terms, views, alpha, plan.n_locations, logs)
    return total, logs
