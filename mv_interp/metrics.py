"""The paper's metrics as pure, batched torch functions.

Every function takes a batch of items with boolean ``valid`` masks (any number of valid
pixels per item, invalid pixels may hold garbage, NaN included) and never loops over
pixels in Python. Inputs may live on any device in any float dtype; the losses compute in
fp32 (autocast off), the evaluation metrics in fp64 (fp32 on MPS, which has no fp64),
and results come back as fp32.

Conventions (see ``docs/metrics.md`` for the full definitions):

- A *pointmap list* is one ``[batch, H, W, 3]`` tensor per view, all in the reference
  frame (view 1's camera, OpenCV axes, so ``z`` is depth for view 1); masks are
  ``[batch, H, W]`` bool.
- *Median* is the exact median of the valid values with torch's convention: for an even
  count, the lower of the two middle values (``torch.nanmedian``).
- Lengths are unitless wherever a normalisation comes first: the errors of E.1 / E.2 are in
  units of the ground truth's average distance to the camera centre (DUSt3R "avg_dis").

>>> from mv_interp import metrics
>>> err = metrics.scale_shift_invariant_error([p1, p2], [g1, g2], [m1, m2])
>>> err.mean            # [batch], the paper's E.1 error
>>> metrics.aligned_view2_error(p2, g2, c2, m2)   # [batch], E.2
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = [
    "normalize_pointmaps",
    "confidence_loss",
    "regression_loss",
    "PointmapError",
    "scale_shift_invariant_error",
    "Similarity",
    "weighted_procrustes",
    "aligned_view2_error",
    "DepthMetrics",
    "depth_metrics",
    "SkipChange",
    "SublayerContributions",
    "sublayer_contributions",
    "SKIP_KINDS",
    "rotation_angle",
    "camera_points",
    "relative_pose",
    "estimate_relative_rotation",
    "relative_rotation_error",
    "identity_pose_baseline",
    "patch_centres",
    "CorrespondenceRecall",
    "correspondence_recall",
]

#: DUSt3R's floor on the avg_dis normalisation factor.
NORM_EPS = 1e-8
#: E.1's clip on the predicted scale before the prediction is rescaled to the ground truth's.
SCALE_CLIP = (1e-3, 1e3)
#: The residual skip connections of a decoder block, in processing order (``ProbeSite.kind``).
SKIP_KINDS = ("self", "cross", "mlp")

PointList = Sequence[Float[Tensor, "batch _H _W 3"]]
MaskList = Sequence[Bool[Tensor, "batch _H _W"]]


# --------------------------------------------------------------------------------------
# Internal helpers
# --------------------------------------------------------------------------------------


def _acc_dtype(device: torch.device) -> torch.dtype:
    # Medians, SVDs and least squares over ~1e5 points lose digits in fp32; MPS has no fp64.
    return torch.float32 if device.type == "mps" else torch.float64


@contextlib.contextmanager
def fp32_region(device: torch.device):
    """Autocast off: the loss must see fp32 even inside a bf16 training step."""
    if device.type in ("cuda", "cpu", "xpu", "mps", "hpu"):
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    else:
        yield


def _check_views(fn: str, valid: MaskList, **lists: Sequence[Tensor]) -> None:
    """One clear error for mismatched view lists / shapes / mask dtypes."""
    n = len(valid)
    if n == 0:
        raise ValueError(f"{fn}: got no views; pass one [batch, H, W] mask (and one tensor per input) per view")
    for name, seq in lists.items():
        if len(seq) != n:
            raise ValueError(f"{fn}: {name} has {len(seq)} views but valid has {n}; "
                             "pass one entry per view in the same order")
    batch = valid[0].shape[0]
    for v, m in enumerate(valid):
        if m.dtype != torch.bool:
            raise ValueError(f"{fn}: valid[{v}] has dtype {m.dtype}; pass a bool mask (e.g. `depth > 0`)")
        if m.ndim != 3 or m.shape[0] != batch:
            raise ValueError(f"{fn}: valid[{v}] has shape {tuple(m.shape)}; every mask must be [batch={batch}, H, W]")
        for name, seq in lists.items():
            x = seq[v]
            if tuple(x.shape[:3]) != tuple(m.shape):
                raise ValueError(
                    f"{fn}: {name}[{v}] has shape {tuple(x.shape)} but valid[{v}] is {tuple(m.shape)}; "
                    "pointmaps must be [batch, H, W, 3] and confidences [batch, H, W] matching their mask"
                )


def _flat(pts: Sequence[Tensor], valid: Sequence[Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Views concatenated along one pixel axis: ``[batch, n, ...]`` values (zero where invalid) and mask."""
    batch = valid[0].shape[0]
    mask = torch.cat([m.reshape(batch, -1) for m in valid], dim=1)
    vals = torch.cat([p.reshape(batch, m[0].numel(), *p.shape[m.ndim:]).to(dtype) for p, m in zip(pts, valid)], dim=1)
    # where(), not multiply: 0 * NaN garbage is NaN, and NaN would also poison gradients.
    return torch.where(mask.reshape(*mask.shape, *([1] * (vals.ndim - 2))), vals, 0.0), mask


def _split(flat: Tensor, valid: Sequence[Tensor]) -> list[Tensor]:
    sizes = [m[0].numel() for m in valid]
    return [chunk.reshape(*m.shape, *flat.shape[2:]) for chunk, m in zip(flat.split(sizes, dim=1), valid)]


def _masked_median(x: Tensor, mask: Tensor) -> Tensor:
    """Exact median over dim 1 of the masked values (lower middle for even counts); NaN if none."""
    if x.ndim == 3:
        mask = mask[..., None]
    return torch.nanmedian(torch.where(mask, x, math.nan), dim=1).values


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Per-item mean over all non-batch dims of the masked values; NaN for an item with none."""
    b = x.shape[0]
    total = torch.where(mask, x, 0.0).reshape(b, -1).sum(-1)
    count = mask.reshape(b, -1).sum(-1)
    return torch.where(count > 0, total / count.clamp_min(1), math.nan)


def _avg_dis(flat_pts: Tensor, mask: Tensor) -> Tensor:
    """DUSt3R "avg_dis": mean distance to the origin over the valid points, floored at NORM_EPS."""
    dist = torch.linalg.vector_norm(flat_pts, dim=-1)
    total = torch.where(mask, dist, 0.0).sum(-1)
    return (total / mask.sum(-1).clamp_min(1)).clamp_min(NORM_EPS)


# --------------------------------------------------------------------------------------
# Normalisation and the training loss
# --------------------------------------------------------------------------------------


def normalize_pointmaps(pts: PointList, valid: MaskList) -> tuple[list[Tensor], Float[Tensor, "batch"]]:
    """Divide every view of each item by one factor: DUSt3R's "avg_dis" normalisation.

    ``z[b] = Σ_v Σ_{i∈M^v} ‖X^v_i‖ / (|M^1| + … + |M^V|)``, floored at 1e-8 (an item with
    no valid pixel gets the floor). Invalid pixels do not enter the factor but are divided
    like the others (garbage stays garbage).

    Units: the result is unitless (average valid distance to the camera centre = 1).
    Invariances: the normalised points are invariant to a positive global scale of the input
    and to rotations about the origin; not to translations.

    Returns:
        the normalised pointmaps (input dtype) and the factors ``[batch]`` (fp32, in the
        input's units). Differentiable.
    """
    _check_views("normalize_pointmaps", valid, pts=pts)
    flat, mask = _flat(pts, valid, torch.float32)
    factor = _avg_dis(flat, mask)
    return [p / factor.to(p.dtype).view(-1, 1, 1, 1) for p in pts], factor


def _reduce(x: Tensor, mask: Tensor, reduction: str) -> Tensor:
    if reduction == "pixels":
        # DUSt3R's training loss: mean over every valid pixel of the batch pooled together.
        return torch.where(mask, x, 0.0).sum() / mask.sum().clamp_min(1)
    per_item = torch.where(mask, x, 0.0).flatten(1).sum(-1) / mask.flatten(1).sum(-1).clamp_min(1)
    has = mask.flatten(1).any(-1)
    return (per_item * has).sum() / has.sum().clamp_min(1)


def _regression_terms(pred_pts: PointList, gt_pts: PointList, valid: MaskList) -> list[Tensor]:
    """Per-pixel ``ℓ = ‖X̂/ẑ − X/z‖`` in fp32 (0 at invalid pixels); both factors over the GT's valid pixels."""
    pred, mask = _flat(pred_pts, valid, torch.float32)
    gt, _ = _flat(gt_pts, valid, torch.float32)
    pred = pred / _avg_dis(pred, mask)[:, None, None]
    gt = gt / _avg_dis(gt, mask)[:, None, None]
    dist = torch.linalg.vector_norm(pred - gt, dim=-1)
    return _split(dist, valid)


def _check_reduction(fn: str, reduction: str) -> None:
    if reduction not in ("pixels", "items"):
        raise ValueError(f"{fn}: reduction must be 'pixels' (DUSt3R: pool the batch's valid pixels) or 'items' "
                         f"(mean per item, then over items); got {reduction!r}")


def confidence_loss(
    pred_pts: PointList,
    pred_conf: Sequence[Float[Tensor, "batch _H _W"]],
    gt_pts: PointList,
    valid: MaskList,
    alpha: float = 0.2,
    reduction: str = "pixels",
) -> tuple[Float[Tensor, ""], dict[str, Tensor]]:
    """DUSt3R's confidence-aware scale-invariant regression loss (the probes' training loss).

    Ground truth and prediction are each divided by their own avg_dis factor over the same
    (ground-truth valid) pixels of all views (:func:`normalize_pointmaps`); then
    ``ℓ^v_i = ‖X̂^v_i/ẑ − X^v_i/z‖₂`` and ``L = Σ_v mean_{i∈M^v}(C^v_i ℓ^v_i − α log C^v_i)``.

    ``reduction="pixels"`` (default, as DUSt3R trains) takes each view's mean over the valid
    pixels of the whole batch pooled; ``"items"`` averages per item, then over the items that
    have valid pixels in that view. A view with no valid pixel in the batch contributes 0.

    Units: ℓ is unitless (normalised space). Invariance: ``L`` is unchanged when the
    prediction or the ground truth is multiplied by a positive scalar per item.
    Computes in fp32 with autocast off (safe inside a bf16 autocast region); differentiable
    in ``pred_pts`` (through ẑ too) and ``pred_conf``. Confidences must be positive
    (the model's ``1 + exp(·)``); they are floored at fp32's smallest normal for the log.

    Returns:
        ``(loss, logs)``: the scalar loss and detached per-view scalars ``loss_v{v}`` (the
        confidence-weighted term), ``regr_v{v}`` (plain mean ℓ), ``conf_v{v}`` (mean
        confidence), plus ``regr`` (Σ_v regr_v, the :func:`regression_loss` value).
    """
    _check_views("confidence_loss", valid, pred_pts=pred_pts, pred_conf=pred_conf, gt_pts=gt_pts)
    _check_reduction("confidence_loss", reduction)
    device = pred_pts[0].device
    with fp32_region(device):
        dists = _regression_terms(pred_pts, gt_pts, valid)
        total = torch.zeros((), device=device)
        logs: dict[str, Tensor] = {}
        regr = torch.zeros((), device=device)
        for v, (dist, conf, mask) in enumerate(zip(dists, pred_conf, valid), start=1):
            c = torch.where(mask, conf.float(), 1.0).clamp_min(torch.finfo(torch.float32).tiny)
            view_loss = _reduce(c * dist - alpha * torch.log(c), mask, reduction)
            view_regr = _reduce(dist, mask, reduction)
            total = total + view_loss
            regr = regr + view_regr.detach()
            logs[f"loss_v{v}"] = view_loss.detach()
            logs[f"regr_v{v}"] = view_regr.detach()
            logs[f"conf_v{v}"] = _reduce(c, mask, reduction).detach()
        logs["regr"] = regr
    return total, logs


def regression_loss(
    pred_pts: PointList, gt_pts: PointList, valid: MaskList, reduction: str = "pixels"
) -> tuple[Float[Tensor, ""], dict[str, Tensor]]:
    """The scale-invariant regression loss without confidence: ``L = Σ_v mean_{i∈M^v} ℓ^v_i``.

    Same normalisation, ``ℓ``, reduction, units and invariances as :func:`confidence_loss`.
    Returns ``(loss, logs)`` with detached ``regr_v{v}`` per view.
    """
    _check_views("regression_loss", valid, pred_pts=pred_pts, gt_pts=gt_pts)
    _check_reduction("regression_loss", reduction)
    device = pred_pts[0].device
    with fp32_region(device):
        dists = _regression_terms(pred_pts, gt_pts, valid)
        terms = [_reduce(d, m, reduction) for d, m in zip(dists, valid)]
        total = torch.stack(terms).sum()
    return total, {f"regr_v{v}": t.detach() for v, t in enumerate(terms, start=1)}


# --------------------------------------------------------------------------------------
# E.1: scale-shift-invariant pointmap error
# --------------------------------------------------------------------------------------


class PointmapError(NamedTuple):
    """Per-item errors: ``per_view`` ``[batch, view]`` and their mean over views ``[batch]``."""

    per_view: Tensor
    mean: Tensor


def _ssi_frame(flat: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """E.1's canonical frame of one point set: avg_dis-normalised, median depth subtracted.

    Returns the shifted points ``[batch, n, 3]`` and the scale ``s`` = median distance of the
    valid points to their coordinate-wise median ``[batch]``.
    """
    flat = flat / _avg_dis(flat, mask)[:, None, None]
    z_med = _masked_median(flat[..., 2], mask)
    flat = flat - torch.stack([torch.zeros_like(z_med), torch.zeros_like(z_med), z_med], dim=-1)[:, None]
    origin = _masked_median(flat, mask)
    scale = _masked_median(torch.linalg.vector_norm(flat - origin[:, None], dim=-1), mask)
    return flat, scale


def scale_shift_invariant_error(pred: PointList, gt: PointList, valid: MaskList) -> PointmapError:
    """The paper's scale–shift-invariant pointmap error (appendix E.1), per item and view.

    For the ground truth and, separately, the prediction, over all views' valid pixels:
    (1) divide by the avg_dis factor (:func:`normalize_pointmaps`); (2) subtract the median
    ``z`` from every point's ``z``; (3) take the coordinate-wise median of the points as an
    origin and ``s`` = median ‖p − origin‖. The prediction is multiplied by
    ``s_gt / clip(s_pred, 1e-3, 1e3)`` about the (shifted) camera centre — no re-centring —
    and the error of view ``v`` is ``mean_{i∈M^v} ‖p̂^v_i − p^v_i‖₂``. ``mean`` averages the
    views that have valid pixels (NaN only if none has).

    Units: the ground truth's normalised units (its average valid distance to the camera
    centre = 1). Invariances: exactly zero for ``pred = a·gt + (0, 0, t)`` with ``a > 0``
    (while the predicted scale stays inside the clip); not invariant to rotations or to x/y
    shifts. An item whose view has no valid pixel gets NaN for that view.
    """
    _check_views("scale_shift_invariant_error", valid, pred=pred, gt=gt)
    dtype = _acc_dtype(pred[0].device)
    p, mask = _flat(pred, valid, dtype)
    g, _ = _flat(gt, valid, dtype)
    p, s_pred = _ssi_frame(p, mask)
    g, s_gt = _ssi_frame(g, mask)
    p = p * (s_gt / s_pred.clamp(*SCALE_CLIP))[:, None, None]
    dist = torch.linalg.vector_norm(p - g, dim=-1)
    per_view = torch.stack([_masked_mean(d, m) for d, m in zip(_split(dist, valid), valid)], dim=1)
    return PointmapError(per_view.float(), per_view.nanmean(dim=1).float())


# --------------------------------------------------------------------------------------
# Procrustes and E.2: the aligned second-view error
# --------------------------------------------------------------------------------------


class Similarity(NamedTuple):
    """A batch of similarity transforms ``x ↦ s · R x + t``.

    ``R`` ``[batch, 3, 3]`` (proper rotations), ``t`` ``[batch, 3]``, ``s`` ``[batch]``.
    """

    R: Tensor
    t: Tensor
    s: Tensor

    def apply(self, pts: Tensor) -> Tensor:
        """Transform points ``[batch, ..., 3]`` (computed in the transform's dtype)."""
        flat = pts.reshape(pts.shape[0], -1, 3).to(self.R.dtype)
        out = self.s[:, None, None] * flat @ self.R.transpose(1, 2) + self.t[:, None]
        return out.reshape(pts.shape)


def _procrustes(src: Tensor, dst: Tensor, w: Tensor, with_scale: bool) -> Similarity:
    """Weighted Kabsch / Umeyama on flat ``[batch, n, 3]`` sets with weights ``w`` (0 = ignored)."""
    total = w.sum(-1).clamp_min(torch.finfo(w.dtype).tiny)
    mu_s = (w[..., None] * src).sum(1) / total[:, None]
    mu_d = (w[..., None] * dst).sum(1) / total[:, None]
    src_c, dst_c = src - mu_s[:, None], dst - mu_d[:, None]
    cov = torch.einsum("bn,bni,bnj->bij", w, dst_c, src_c) / total[:, None, None]
    U, sig, Vh = torch.linalg.svd(cov)
    # Flip the least singular direction when U·Vh is a reflection, so R is a proper rotation.
    d = torch.sign(torch.linalg.det(U) * torch.linalg.det(Vh))
    d = torch.where(d == 0, torch.ones_like(d), d)
    flip = torch.stack([torch.ones_like(d), torch.ones_like(d), d], dim=-1)
    R = U @ (flip[..., None] * Vh)
    if with_scale:
        var_src = (w * src_c.square().sum(-1)).sum(-1) / total
        s = (sig * flip).sum(-1) / var_src.clamp_min(torch.finfo(w.dtype).tiny)
    else:
        s = torch.ones_like(total)
    t = mu_d - s[:, None] * (R @ mu_s[..., None]).squeeze(-1)
    return Similarity(R, t, s)


def weighted_procrustes(
    src: Float[Tensor, "batch *pos 3"],
    dst: Float[Tensor, "batch *pos 3"],
    weights: Float[Tensor, "batch *pos"],
    valid: Bool[Tensor, "batch *pos"],
    with_scale: bool = False,
) -> Similarity:
    """The transform minimising ``Σ_{i valid} w_i ‖s·R·src_i + t − dst_i‖²`` per item.

    Rigid (``s = 1``, Kabsch) or, with ``with_scale``, similarity (Umeyama). ``R`` is always
    a proper rotation (det +1, reflections excluded). Weights are clamped at 0; invalid
    pixels are ignored. Computed in fp64 (fp32 on MPS), returned in ``src``'s float dtype
    (at least fp32). Apply with ``T.apply(points)``.

    Units: ``t`` in ``dst``'s units; ``s`` is dst-units per src-unit. Invariances: the
    result is equivariant (transforming ``dst`` by a similarity composes with the result)
    and unchanged by a positive global factor on the weights. Degenerate sets (fewer than
    three non-collinear weighted points) give a valid but non-unique rotation.

    >>> T = weighted_procrustes(pred, gt, conf, valid)
    >>> aligned = T.apply(pred)
    """
    if dst.shape != src.shape or weights.shape != src.shape[:-1] or valid.shape != src.shape[:-1]:
        raise ValueError(
            f"weighted_procrustes: src {tuple(src.shape)}, dst {tuple(dst.shape)}, weights {tuple(weights.shape)}, "
            f"valid {tuple(valid.shape)}; src and dst must match and weights/valid be their shape without the last axis"
        )
    dtype = _acc_dtype(src.device)
    s, mask = _flat([src], [valid], dtype)
    d, _ = _flat([dst], [valid], dtype)
    w, _ = _flat([weights], [valid], dtype)
    T = _procrustes(s, d, w.clamp_min(0), with_scale)
    out = torch.promote_types(src.dtype, torch.float32)
    return Similarity(T.R.to(out), T.t.to(out), T.s.to(out))


def _weighted_spread(flat: Tensor, w: Tensor) -> Tensor:
    """Weighted RMS distance to the weighted centroid ``[batch]`` (translation and rotation invariant)."""
    total = w.sum(-1).clamp_min(torch.finfo(w.dtype).tiny)
    mu = (w[..., None] * flat).sum(1) / total[:, None]
    return ((w * (flat - mu[:, None]).square().sum(-1)).sum(-1) / total).sqrt()


def aligned_view2_error(
    pred2: Float[Tensor, "batch H W 3"],
    gt2: Float[Tensor, "batch H W 3"],
    conf2: Float[Tensor, "batch H W"],
    valid2: Bool[Tensor, "batch H W"],
    with_scale: bool = False,
) -> Float[Tensor, "batch"]:
    """The paper's Procrustes-aligned second-view error (appendix E.2), per item.

    Order of operations (the paper fixes the alignment and the E.1 part; the scale matching
    before the rigid fit is ours, see below):

    1. *Scale matching.* The prediction is multiplied by ``σ_gt / σ_pred``, where ``σ`` is the
       confidence-weighted RMS distance of the valid points to their weighted centroid.
       A rigid fit between sets of different scale is biased: it moves the predicted centroid
       onto the ground truth's while the shape keeps the wrong size, and E.1's rescaling about
       the camera centre cannot undo that offset. ``σ`` ignores rotation and translation, so
       this step changes nothing when the scales already agree.
    2. *Alignment.* Weighted rigid Procrustes of the prediction onto the ground truth
       (weights = predicted confidences ``C²`` on valid pixels; :func:`weighted_procrustes`),
       applied to the prediction. With ``with_scale=True`` steps 1–2 are replaced by one
       similarity (Umeyama) fit instead.
    3. *E.1 on view 2 alone* (:func:`scale_shift_invariant_error` with V = 1): view 1 is
       discarded because the alignment moved view 2 relative to it, so the avg_dis
       normalisation, the median-depth shift and the scale use view 2's pixels only.

    Units: the ground truth's normalised units (view 2's average valid distance to view 1's
    camera centre = 1). Invariances: exactly zero for any similarity transform of the
    ground truth (rotation, translation, positive scale) — in particular for any error in the
    relative pose of view 2 — for any positive confidences.
    """
    _check_views("aligned_view2_error", [valid2], pred2=[pred2], gt2=[gt2], conf2=[conf2])
    dtype = _acc_dtype(pred2.device)
    p, mask = _flat([pred2], [valid2], dtype)
    g, _ = _flat([gt2], [valid2], dtype)
    w, _ = _flat([conf2], [valid2], dtype)
    w = w.clamp_min(0)
    if not with_scale:
        p = p * (_weighted_spread(g, w) / _weighted_spread(p, w).clamp_min(torch.finfo(dtype).tiny))[:, None, None]
    aligned = _procrustes(p, g, w, with_scale).apply(p)
    return scale_shift_invariant_error([aligned.reshape(pred2.shape)], [g.reshape(gt2.shape)], [valid2]).per_view[:, 0]


# --------------------------------------------------------------------------------------
# Depth metrics (Table 1)
# --------------------------------------------------------------------------------------


class DepthMetrics(NamedTuple):
    """Per-item depth metrics ``[batch]`` and the fitted alignment ``d ≈ scale · d̂ + shift``."""

    absrel: Tensor
    delta1: Tensor
    scale: Tensor
    shift: Tensor


def depth_metrics(
    pred_depth: Float[Tensor, "batch H W"], gt_depth: Float[Tensor, "batch H W"], valid: Bool[Tensor, "batch H W"]
) -> DepthMetrics:
    """absrel and δ1 after a least-squares scale-and-shift alignment (the paper's Table 1).

    Per item, ``(a, b) = argmin Σ_{i valid} (a·d̂_i + b − d_i)²`` (``a = 0`` when the
    prediction is constant), ``d̃ = a·d̂ + b``; then ``absrel = mean |d̃ − d| / d`` and
    ``δ1 = fraction of pixels with max(d̃/d, d/d̃) < 1.25``, where a non-positive ``d̃`` counts
    as a failure. Pixels with ``d ≤ 0`` are treated as invalid.

    Units: both metrics are unitless (absrel a fraction of the true depth, δ1 a fraction of
    pixels). Invariance: unchanged by any affine map ``d̂ ↦ α·d̂ + β`` with ``α ≠ 0``.
    Items with no valid pixel get NaN.
    """
    _check_views("depth_metrics", [valid], pred_depth=[pred_depth], gt_depth=[gt_depth])
    dtype = _acc_dtype(pred_depth.device)
    b = valid.shape[0]
    mask = (valid & (gt_depth > 0)).reshape(b, -1)
    x = torch.where(mask, pred_depth.reshape(b, -1).to(dtype), 0.0)
    y = torch.where(mask, gt_depth.reshape(b, -1).to(dtype), 0.0)
    n = mask.sum(-1).clamp_min(1)
    mx, my = x.sum(-1) / n, y.sum(-1) / n
    xc = torch.where(mask, x - mx[:, None], 0.0)
    yc = torch.where(mask, y - my[:, None], 0.0)
    var = xc.square().sum(-1) / n
    cov = (xc * yc).sum(-1) / n
    # A constant prediction leaves rounding-level variance: fit the shift alone there.
    flat = var <= 1e-12 * (x.square().sum(-1) / n).clamp_min(torch.finfo(dtype).tiny)
    scale = torch.where(flat, torch.zeros_like(var), cov / var.clamp_min(torch.finfo(dtype).tiny))
    shift = my - scale * mx
    d = scale[:, None] * x + shift[:, None]
    y_safe = torch.where(mask, y, 1.0)
    absrel = _masked_mean((d - y).abs() / y_safe, mask)
    # Both one-sided tests instead of max(d̃/d, d/d̃): with d > 0, y < 1.25·d̃ already rejects d̃ ≤ 0,
    # where the ratio form would call a negative d̃ an inlier (max(-1, -1) < 1.25).
    ok = (d < 1.25 * y) & (y < 1.25 * d)
    delta1 = _masked_mean(ok.to(dtype), mask)
    return DepthMetrics(absrel.float(), delta1.float(), scale.float(), shift.float())


# --------------------------------------------------------------------------------------
# Sublayer contributions (Figure 4)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SkipChange:
    """The change of an error across one skip connection.

    Attributes:
        block: decoder block index.
        kind: ``"self"``, ``"cross"`` or ``"mlp"``.
        error_before: error at the site just before this skip (the previous entry).
        error_after: error at the residual after this skip.
        delta: ``error_after − error_before``.
        rel_change: ``delta / error_before`` (NaN if ``error_before`` is 0): the change relative
            to the error entering this skip (Figure 4's per-block bars).
        rel_to_input: ``delta / input_error``: the change as a fraction of the decoder-input
            error; these add up over all skips to ``(final − input) / input``.
    """

    block: int
    kind: str
    error_before: float
    error_after: float
    delta: float
    rel_change: float
    rel_to_input: float


@dataclass(frozen=True)
class SublayerContributions:
    """Per-skip and per-kind changes of an error along the decoder (see :func:`sublayer_contributions`).

    Attributes:
        input_error: error at the first entry (the decoder input).
        final_error: error at the last entry.
        skips: one :class:`SkipChange` per skip connection, in processing order.
        by_kind: for each kind in ``SKIP_KINDS`` present: ``total_rel_to_input`` (Σ over blocks
            of ``rel_to_input``, the paper's headline "self-attention decreases the error at the
            decoder input by 94%" is ``-0.94``), ``mean_rel_change`` (mean over blocks of
            ``rel_change``), ``share_of_total_change`` (Σ delta of this kind / Σ delta of all
            skips; shares add to 1, and can leave [0, 1] when kinds act in opposite directions)
            and ``n_blocks``.
        average: how samples were averaged (``"errors"`` or ``"samples"``).
    """

    input_error: float
    final_error: float
    skips: tuple[SkipChange, ...]
    by_kind: Mapping[str, Mapping[str, float]]
    average: str

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per skip (for a CSV)."""
        return [dataclasses.asdict(s) for s in self.skips]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN stays a float NaN; ``json.dumps`` writes it as ``NaN``)."""
        return {
            "input_error": self.input_error,
            "final_error": self.final_error,
            "average": self.average,
            "skips": self.rows(),
            "by_kind": {k: dict(v) for k, v in self.by_kind.items()},
        }


def _as_errors(value: Any) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
    return t.reshape(-1) if t.ndim else t.reshape(1)


def _entry(item: Any, position: int) -> tuple[int, str, Tensor]:
    if isinstance(item, Sequence) and len(item) == 3:
        block, kind, err = item
    elif isinstance(item, Sequence) and len(item) == 2 and hasattr(item[0], "kind") and hasattr(item[0], "layer"):
        block, kind, err = item[0].layer, item[0].kind, item[1]
    else:
        raise ValueError(
            f"sublayer_contributions: entry {position} is {item!r}; pass (block, kind, error) tuples or "
            "(ProbeSite, error) pairs in processing order, starting at the decoder input"
        )
    return int(block), str(kind), _as_errors(err)


def sublayer_contributions(entries: Iterable[Any], average: str = "errors") -> SublayerContributions:
    """How much each skip connection changes an error along the decoder (the paper's Figure 4).

    ``entries`` is a sequence in processing order of one view's path: the first entry is the
    decoder input (its kind is not used, e.g. ``"dec_in"``), each later one the residual after a
    skip connection, ``(block, kind, error)`` with kind in ``("self", "cross", "mlp")`` — or
    ``(ProbeSite, error)`` pairs. ``error`` is a number or per-sample errors ``[N]`` (same N
    for every entry), typically :func:`aligned_view2_error` over a test set.

    Definitions, with ``e_k`` the error after skip ``k``, ``e_{k-1}`` the entry before it and
    ``e_in`` the decoder-input error:

    - ``rel_change_k = (e_k − e_{k−1}) / e_{k−1}``: per skip, relative to the error entering it.
    - ``rel_to_input_k = (e_k − e_{k−1}) / e_in``; per kind, ``total_rel_to_input`` sums it over
      blocks. The kinds' totals add up to ``(e_final − e_in) / e_in``; this is the reading of
      the paper's "self-attention decreases the aligned view-2 error at the decoder input by
      94% on average" (self: −0.94, cross: +0.11, MLP: +0.07).
    - ``mean_rel_change``: per kind, the mean over blocks of ``rel_change``.
    - ``share_of_total_change``: per kind, ``Σ_k (e_k − e_{k−1}) / (e_final − e_in)``.

    ``average="errors"`` (default) first averages each entry's errors over samples (ignoring
    NaN) and computes the ratios on those means (stable when a sample's error is near 0);
    ``"samples"`` computes ``rel_change`` and ``rel_to_input`` per sample and averages them
    (``share_of_total_change`` then divides the averaged totals).
    """
    if average not in ("errors", "samples"):
        raise ValueError(f"sublayer_contributions: average must be 'errors' or 'samples'; got {average!r}")
    parsed = [_entry(item, i) for i, item in enumerate(entries)]
    if len(parsed) < 2:
        raise ValueError("sublayer_contributions: need the decoder input and at least one skip connection; "
                         f"got {len(parsed)} entr{'y' if len(parsed) == 1 else 'ies'}")
    for i, (block, kind, _) in enumerate(parsed[1:], start=1):
        if kind not in SKIP_KINDS:
            raise ValueError(
                f"sublayer_contributions: entry {i} has kind {kind!r}; entries after the first must be residuals "
                f"after a skip connection, kind in {SKIP_KINDS} — start at the decoder input and drop encoder / "
                "sublayer-output sites"
            )
    sizes = {e.numel() for _, _, e in parsed}
    if len(sizes) != 1:
        raise ValueError(f"sublayer_contributions: entries hold different numbers of samples {sorted(sizes)}; "
                         "pass one error per sample for the same samples at every site")
    errors = torch.stack([e for _, _, e in parsed])  # [entries, N]
    if average == "errors":
        errors = errors.nanmean(dim=1, keepdim=True)
    before, after = errors[:-1], errors[1:]
    delta = after - before
    nan = torch.tensor(math.nan, dtype=torch.float64)
    rel = torch.where(before != 0, delta / before, nan)
    rel_in = torch.where(errors[:1] != 0, delta / errors[:1], nan)
    # Mean over samples (a no-op for "errors", where each entry already holds one mean).
    delta_m, rel_m, rel_in_m = delta.nanmean(dim=-1), rel.nanmean(dim=-1), rel_in.nanmean(dim=-1)
    mean_errors = errors.nanmean(dim=1)
    skips = tuple(
        SkipChange(block, kind, float(mean_errors[k]), float(mean_errors[k + 1]), float(delta_m[k]), float(rel_m[k]),
                   float(rel_in_m[k]))
        for k, (block, kind, _) in enumerate(parsed[1:])
    )
    total_in = float(rel_in_m.sum())
    by_kind: dict[str, dict[str, float]] = {}
    for kind in SKIP_KINDS:
        idx = [k for k, s in enumerate(skips) if s.kind == kind]
        if not idx:
            continue
        kind_in = float(rel_in_m[idx].sum())
        by_kind[kind] = {
            "total_rel_to_input": kind_in,
            "mean_rel_change": float(rel_m[idx].mean()),
            "share_of_total_change": kind_in / total_in if total_in != 0 else math.nan,
            "n_blocks": len(idx),
        }
    return SublayerContributions(float(mean_errors[0]), float(mean_errors[-1]), skips, by_kind, average)


# --------------------------------------------------------------------------------------
# Poses: rotations, camera-frame points, the identity-pose baseline
# --------------------------------------------------------------------------------------


def rotation_angle(Ra: Float[Tensor, "*batch 3 3"], Rb: Float[Tensor, "*batch 3 3"]) -> Float[Tensor, "*batch"]:
    """Geodesic angle between rotations, ``∠(Raᵀ·Rb)``, in degrees in [0, 180].

    Uses ``atan2(sin, cos)`` from the antisymmetric part and the trace, which stays accurate
    near 0° where ``acos((tr − 1)/2)`` loses half the digits. Symmetric in its arguments and
    invariant to a common rotation applied to both (on either side).
    """
    dtype = _acc_dtype(Ra.device)
    M = Ra.to(dtype).transpose(-1, -2) @ Rb.to(dtype)
    cos = (M.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    axis = torch.stack([M[..., 2, 1] - M[..., 1, 2], M[..., 0, 2] - M[..., 2, 0], M[..., 1, 0] - M[..., 0, 1]], -1)
    sin = torch.linalg.vector_norm(axis, dim=-1) / 2
    return torch.rad2deg(torch.atan2(sin, cos)).float()


def camera_points(
    depth: Float[Tensor, "batch H W"], intrinsics: Float[Tensor, "batch 3 3"]
) -> Float[Tensor, "batch H W 3"]:
    """Back-project a z-depth map into its own camera frame: ``X = depth · K⁻¹ [u, v, 1]ᵀ``.

    Pixel ``(u, v)`` = (column, row) integer index (the data format's convention). Units: those
    of ``depth``. Pixels with depth 0 map to the camera centre.
    """
    b, h, w = depth.shape
    dtype = _acc_dtype(depth.device)
    v, u = torch.meshgrid(torch.arange(h, device=depth.device, dtype=dtype),
                          torch.arange(w, device=depth.device, dtype=dtype), indexing="ij")
    pix = torch.stack([u, v, torch.ones_like(u)], dim=-1)  # [H, W, 3]
    rays = torch.einsum("bij,hwj->bhwi", torch.linalg.inv(intrinsics.to(dtype)), pix)
    return (rays * depth.to(dtype)[..., None]).to(torch.promote_types(depth.dtype, torch.float32))


def relative_pose(
    cam2world_ref: Float[Tensor, "batch 4 4"], cam2world: Float[Tensor, "batch 4 4"]
) -> Float[Tensor, "batch 4 4"]:
    """The transform from a camera's frame to the reference camera's frame: ``ref_T_world · world_T_cam``.

    For view 2 against view 1 this maps view-2 camera coordinates to view-1 camera coordinates
    (cam2 → cam1), the pose DUSt3R's view-2 pointmap implicitly contains.
    """
    dtype = _acc_dtype(cam2world.device)
    out = torch.linalg.inv(cam2world_ref.to(dtype)) @ cam2world.to(dtype)
    return out.to(torch.promote_types(cam2world.dtype, torch.float32))


def estimate_relative_rotation(
    pred_pts: Float[Tensor, "batch H W 3"],
    own_pts: Float[Tensor, "batch H W 3"],
    conf: Float[Tensor, "batch H W"],
    valid: Bool[Tensor, "batch H W"],
) -> Float[Tensor, "batch 3 3"]:
    """The rotation implied by a view's predicted pointmap in the reference frame.

    Similarity Procrustes from the view's ground-truth points in its *own* camera frame
    (``own_pts``, e.g. :func:`camera_points`) to the prediction (reference frame), weights =
    ``conf`` on valid pixels; the rotation of that fit maps this camera's axes to the
    reference camera's (cam → ref). Independent of the prediction's scale and translation.
    """
    return weighted_procrustes(own_pts, pred_pts, conf, valid, with_scale=True).R


def relative_rotation_error(
    pred2: Float[Tensor, "batch H W 3"],
    conf2: Float[Tensor, "batch H W"],
    own_pts2: Float[Tensor, "batch H W 3"],
    valid2: Bool[Tensor, "batch H W"],
    cam2world1: Float[Tensor, "batch 4 4"],
    cam2world2: Float[Tensor, "batch 4 4"],
) -> Float[Tensor, "batch"]:
    """Angle in degrees between the relative rotation implied by a predicted view-2 pointmap and the truth.

    ``R̂`` = :func:`estimate_relative_rotation` ``(pred2, own_pts2, conf2, valid2)`` with
    ``own_pts2`` view 2's ground-truth points in view 2's camera frame; the truth is the
    rotation of :func:`relative_pose` ``(cam2world1, cam2world2)`` (cam2 → cam1). Returns
    :func:`rotation_angle` ``(R̂, R_gt)`` ``[batch]``. Invariant to the prediction's global
    scale and translation; blind to a wrong translation direction.
    """
    R_hat = estimate_relative_rotation(pred2, own_pts2, conf2, valid2)
    R_gt = relative_pose(cam2world1, cam2world2)[:, :3, :3]
    return rotation_angle(R_hat, R_gt)


def identity_pose_baseline(views: Sequence[Mapping[str, Tensor]]) -> list[dict[str, Tensor]]:
    """Predictions of a baseline that knows every view's geometry but not the relative pose.

    Each view's "prediction" is its ground-truth pointmap in its *own* camera frame
    (:func:`camera_points` of ``depth`` and ``intrinsics``), reported as if it were in view 1's
    frame, i.e. the identity relative pose; confidences are 1. View 1 is therefore exact, and
    view 2's error measures what knowing the relative pose is worth: its
    :func:`relative_rotation_error` is the true relative rotation angle, its
    :func:`aligned_view2_error` is 0 and its E.1 error is what a model has to beat.

    ``views`` are batched views of the data format (``depth`` ``[batch, H, W]``,
    ``intrinsics`` ``[batch, 3, 3]``). Returns one ``{"pts3d", "conf"}`` dict per view, like a
    model's output.
    """
    out = []
    for v, view in enumerate(views, start=1):
        missing = [k for k in ("depth", "intrinsics") if k not in view]
        if missing:
            raise ValueError(f"identity_pose_baseline: view {v} lacks {missing}; pass views of the data format "
                             "(dicts with 'depth' [batch, H, W] and 'intrinsics' [batch, 3, 3])")
        pts = camera_points(view["depth"], view["intrinsics"])
        out.append({"pts3d": pts, "conf": torch.ones(pts.shape[:-1], dtype=pts.dtype, device=pts.device)})
    return out


# --------------------------------------------------------------------------------------
# Patch-level correspondences (E.3)
# --------------------------------------------------------------------------------------


def patch_centres(h: int, w: int, patch: int, device: torch.device | str | None = None) -> Float[Tensor, "pos 2"]:
    """Pixel coordinates ``(u, v)`` = (column, row) of the centres of an ``h × w`` patch grid.

    Patch ``n`` sits at grid (row ``n // w``, column ``n % w``) and covers pixels
    ``[col·p, col·p + p − 1]``, so its centre is ``col·p + (p − 1)/2`` (likewise for rows).
    """
    n = torch.arange(h * w, device=device)
    centre = (patch - 1) / 2
    return torch.stack([(n % w) * patch + centre, (n // w) * patch + centre], dim=-1).float()


class CorrespondenceRecall(NamedTuple):
    """``distance`` ``[batch, q_pos]`` in pixels (NaN where there is no ground truth),
    ``recall`` ``[thresholds]`` pooled over all scored queries of the batch, and
    ``recall_per_item`` ``[batch, thresholds]`` (NaN for an item with nothing to score)."""

    distance: Tensor
    recall: Tensor
    recall_per_item: Tensor


def correspondence_recall(
    pred_idx: Int[Tensor, "batch q_pos"],
    gt_idx: Int[Tensor, "batch q_pos"],
    grid: tuple[int, int],
    patch: int,
    thresholds_px: Sequence[float | int],
) -> CorrespondenceRecall:
    """Patch-level correspondence recall (appendix E.3).

    For each query patch (of view 2), ``pred_idx`` and ``gt_idx`` index patches of the other
    view's ``grid = (h, w)`` patch grid; ``gt_idx == -1`` (no ground-truth match) is not
    scored. The error is the distance in pixels between the two patch centres; recall at
    threshold ``t`` is the fraction of scored queries with distance ``≤ t`` (so ``t = 0``
    counts exact patch hits and ``t = patch`` also the 4-neighbours).

    Units: pixels. Invariant to the pixel offset convention of patch centres.
    """
    h, w = grid
    n = h * w
    if pred_idx.shape != gt_idx.shape:
        raise ValueError(f"correspondence_recall: pred_idx {tuple(pred_idx.shape)} and gt_idx {tuple(gt_idx.shape)} "
                         "must have the same [batch, q_pos] shape")
    if pred_idx.numel() and (int(pred_idx.min()) < 0 or int(pred_idx.max()) >= n):
        raise ValueError(f"correspondence_recall: pred_idx must index the {h}x{w} grid (0..{n - 1}); check `grid`")
    if gt_idx.numel() and (int(gt_idx.min()) < -1 or int(gt_idx.max()) >= n):
        raise ValueError(f"correspondence_recall: gt_idx must be -1 or index the {h}x{w} grid (0..{n - 1}); "
                         "check `grid`")
    dtype = _acc_dtype(pred_idx.device)
    centres = patch_centres(h, w, patch, device=pred_idx.device).to(dtype)
    scored = gt_idx >= 0
    dist = torch.linalg.vector_norm(centres[pred_idx] - centres[gt_idx.clamp_min(0)], dim=-1)
    dist = torch.where(scored, dist, math.nan)
    thr = torch.as_tensor(list(thresholds_px), dtype=dtype, device=pred_idx.device)
    hit = (dist[..., None] <= thr) & scored[..., None]  # [batch, q_pos, T]
    count = scored.sum(-1, keepdim=True)  # [batch, 1]
    per_item = torch.where(count > 0, hit.sum(1) / count.clamp_min(1), math.nan)
    pooled = hit.sum((0, 1)) / scored.sum().clamp_min(1)
    if not bool(scored.any()):
        pooled = torch.full_like(pooled, math.nan)
    return CorrespondenceRecall(dist.float(), pooled.float(), per_item.float())
