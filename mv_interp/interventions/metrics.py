"""Metrics on model outputs that need no ground truth: how far an intervened run moved.

A *metric* for the patching sweeps is any callable ``metric(outputs) -> Tensor`` where
``outputs`` is the model's per-view list (``model.view_outputs(out)``: dicts with ``pts3d``
``[batch, H, W, 3]`` in view 1's frame and ``conf`` ``[batch, H, W]``) and the result is a
scalar or one value per example (averaged over the batch). A metric that needs ground truth
(e.g. the aligned view-2 error of ``mv_interp.metrics``) is a closure over it::

    metric = lambda outs: view2_error(outs, gt)     # your own, per example
"""

from __future__ import annotations

from ..errors import OutOfRangeError

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

Outputs = Sequence[Mapping[str, Tensor]]
Metric = Callable[[Outputs], Tensor]


def _pick(outputs: Outputs, views: Sequence[int] | None) -> list[Mapping[str, Tensor]]:
    if views is None:
        return list(outputs)
    for v in views:
        if not 1 <= v <= len(outputs):
            raise OutOfRangeError(f"view {v} out of range: the outputs hold {len(outputs)} views (valid: 1..{len(outputs)})")
    return [outputs[v - 1] for v in views]


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"pointmaps to compare differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")


def pointmap_distance(outputs: Outputs, reference: Outputs,
                      views: Sequence[int] | None = None) -> Float[Tensor, " batch"]:
    """Mean Euclidean distance between corresponding points of two runs, per example.

    Averaged over every pixel of the chosen 1-based ``views`` (default: all). In the model's
    output units (view 1's camera frame); zero exactly when the pointmaps are identical; not
    invariant to scale (see :func:`scale_invariant_pointmap_distance`).
    """
    mine, ref = _pick(outputs, views), _pick(reference, views)
    dists = []
    for a, b in zip(mine, ref):
        pa, pb = a["pts3d"].float(), b["pts3d"].float().to(a["pts3d"].device)
        _check_pair(pa, pb)
        dists.append((pa - pb).norm(dim=-1).flatten(1).mean(dim=1))
    return torch.stack(dists).mean(dim=0)


def _normalised(points: list[Tensor]) -> list[Tensor]:
    # DUSt3R's "avg_dis": one factor per run, over every pixel of every view
    norms = torch.cat([p.norm(dim=-1).flatten(1) for p in points], dim=1)
    scale = norms.mean(dim=1).clip(min=1e-8)
    return [p / scale[:, None, None, None] for p in points]


def scale_invariant_pointmap_distance(outputs: Outputs, reference: Outputs,
                                      views: Sequence[int] | None = None) -> Float[Tensor, " batch"]:
    """:func:`pointmap_distance` after dividing each run's pointmaps by their mean point norm.

    The normalisation factor of a run is the mean distance to the origin (view 1's camera) over
    every pixel of the chosen views, as in DUSt3R's ``avg_dis``. Unitless; invariant to a global
    scale of either run (DUSt3R-family outputs are defined up to scale), not to rotation.
    """
    mine, ref = _pick(outputs, views), _pick(reference, views)
    pa = _normalised([o["pts3d"].float() for o in mine])
    pb = _normalised([o["pts3d"].float().to(pa[0].device) for o in ref])
    dists = []
    for a, b in zip(pa, pb):
        _check_pair(a, b)
        dists.append((a - b).norm(dim=-1).flatten(1).mean(dim=1))
    return torch.stack(dists).mean(dim=0)


def distance_to(reference: Outputs, views: Sequence[int] | None = None, scale_invariant: bool = False) -> Metric:
    """A metric: distance of a run's pointmaps to ``reference`` (e.g. the clean run's outputs).

    In a patching sweep it is 0 on the clean run, so the normalised value is
    ``distance(patched) / distance(corrupted)``: 0 = fully restored, 1 = as corrupted.
    """
    ref = [{k: v.detach() for k, v in o.items()} for o in reference]
    fn = scale_invariant_pointmap_distance if scale_invariant else pointmap_distance

    def metric(outputs: Outputs) -> Tensor:
        return fn(outputs, ref, views)

    metric.__name__ = ("scale_invariant_" if scale_invariant else "") + "pointmap_distance" + (
        f"_v{''.join(map(str, views))}" if views else "")
    return metric


BUILTIN_METRICS: dict[str, Callable[..., Metric]] = {
    "distance": lambda ref, views=None: distance_to(ref, views),
    "scale_invariant": lambda ref, views=None: distance_to(ref, views, scale_invariant=True),
}
"""Built-in metrics by name (what the CLI's ``--metric`` takes): factories of ``(clean outputs, views)``."""


def metric_name(metric: Any) -> str:
    return getattr(metric, "__name__", None) or type(metric).__name__


def reduce_metric(value: Any) -> float:
    """A metric's value as one number (mean over examples)."""
    t = torch.as_tensor(value, dtype=torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"the metric returned a non-finite value: {t.flatten()[:4].tolist()}")
    return float(t.mean())
