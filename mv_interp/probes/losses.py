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

from collections.abc import Mapping, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..metrics import fp32_region, confidence_loss
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
    with fp32_region(pred_depth[0].device):
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
    total = torch.zeros((), device=views[0]["img"].device)
    logs: dict[str, Tensor] = {}
    for spec in specs:
        out = outputs[spec.name]
        # locations with the same set of views fold into one call
        by_views: dict[tuple[int, ...], list[Location]] = {}
        for loc in locations:
            by_views.setdefault(loc.views, []).append(loc)
        kind_total = torch.zeros((), device=total.device)
        for vs, locs in by_views.items():
            L = len(locs)
            gts = [views[v - 1] for v in vs]
            if spec.target == "pointmap":
                pred = [torch.cat([out[loc.site(v).name]["pts3d"] for loc in locs]) for v in vs]
                conf = [torch.cat([out[loc.site(v).name]["conf"] for loc in locs]) for v in vs]
                loss, parts = confidence_loss(pred, conf, [_repeat(g["pts3d"], L) for g in gts],
                                              [_repeat(g["valid"], L) for g in gts], alpha=alpha)
                # Σ_v mean ℓ^v, averaged over locations: the geometry fit without the confidence terms
                logs[f"{spec.name}_regr"] = logs.get(f"{spec.name}_regr", 0) + parts["regr"] * L / len(locations)
            else:
                missing = [v for v, g in zip(vs, gts) if "depth" not in g]
                if missing:
                    raise ValueError(f"depth probes need 'depth' in every view; views {missing} lack it")
                pred = [torch.cat([out[loc.site(v).name]["depth"] for loc in locs]) for v in vs]
                conf = [torch.cat([out[loc.site(v).name]["conf"] for loc in locs]) for v in vs]
                loss = depth_confidence_loss(pred, conf, [_repeat(g["depth"], L) for g in gts],
                                             [_repeat(g["valid"], L) for g in gts], alpha=alpha)
            kind_total = kind_total + L * loss
        logs[spec.name] = kind_total.detach()
        total = total + kind_total
    return total, logs
