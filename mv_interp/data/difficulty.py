"""How hard a pair is, and the one rule that picks an easy and a hard pair to show.

The paper's Figure 3 contrasts a pair with large overlap and one seen from very different
viewpoints. :func:`pair_stats` measures both per pair (the fraction of view 2's valid pixels
with a visible correspondence in view 1, and the relative rotation of the cameras);
:func:`pick_pairs` picks the easiest and the hardest pair by the ranks of one or both. The probes'
4D views (``mv-interp probes show``: ``by=("overlap",)``) and the report (``by=("overlap",
"rotation")``) both use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..metrics import rotation_angle
from .correspondence import pixel_correspondences
from .views import Views

__all__ = ["GEOMETRY", "pair_stats", "pick_indices", "pick_pairs"]

#: View keys the statistics need (views without them get NaN statistics).
GEOMETRY = ("depth", "valid", "intrinsics", "cam2world")


def pair_stats(views: Sequence[dict[str, Tensor]], batch_size: int = 8) -> list[dict[str, Any]]:
    """Per example: ``{"index", "overlap", "rotation_deg"}`` (NaN without geometry).

    For a pair, ``overlap`` is the share of view 2's valid pixels seen in view 1 and
    ``rotation_deg`` the relative rotation of the two cameras. For N views each other view is
    compared with view 1 (the reference frame): ``overlap`` is the mean over views 2…N and
    ``rotation_deg`` the largest rotation, so the hardest view decides.
    """
    views = Views(views)
    stats: list[dict[str, Any]] = []
    for chunk in views.batches(batch_size):
        v1, others = chunk[0], list(chunk[1:])
        if not all(k in v for v in (v1, *others) for k in GEOMETRY):
            stats += [{"overlap": math.nan, "rotation_deg": math.nan} for _ in range(chunk.batch_size)]
            continue
        overlaps, rots = [], []
        for v in others:
            _, ok = pixel_correspondences(v, v1)
            overlaps.append(ok.flatten(1).float().sum(1) / v["valid"].flatten(1).float().sum(1).clamp_min(1))
            rots.append(rotation_angle(v1["cam2world"][:, :3, :3], v["cam2world"][:, :3, :3]))
        overlap, rot = torch.stack(overlaps).mean(0), torch.stack(rots).amax(0)
        stats += [{"overlap": float(o), "rotation_deg": float(r)} for o, r in zip(overlap.cpu(), rot.cpu())]
    for i, s in enumerate(stats):
        s["index"] = i
    return stats


def pick_indices(stats: Sequence[dict[str, Any]], by: Sequence[str] = ("overlap", "rotation")) -> dict[str, int]:
    """``{"easy": i, "hard": j}``: the pairs with the best and the worst summed rank of the
    criteria ``by`` — ``"overlap"`` (more is easier) and/or ``"rotation"`` (less is easier).
    Without geometry (all NaN) the first two pairs."""
    unknown = sorted(set(by) - {"overlap", "rotation"})
    if unknown or not by:
        raise ValueError(f"pick_pairs: by={list(by)}; choose from 'overlap', 'rotation'")
    n = len(stats)
    overlap = np.array([s["overlap"] for s in stats], dtype=float)
    rot = np.array([s["rotation_deg"] for s in stats], dtype=float)
    if not np.isfinite(overlap).any():
        return {"easy": 0, "hard": min(1, n - 1)}
    overlap, rot = np.nan_to_num(overlap, nan=0.0), np.nan_to_num(rot, nan=0.0)
    difficulty = np.zeros(n)
    if "overlap" in by:
        difficulty += np.argsort(np.argsort(-overlap, kind="stable"), kind="stable")
    if "rotation" in by:
        difficulty += np.argsort(np.argsort(rot, kind="stable"), kind="stable")
    easy, hard = int(np.argmin(difficulty)), int(np.argmax(difficulty))
    if easy == hard:
        hard = (easy + 1) % n
    return {"easy": easy, "hard": hard}


def pick_pairs(views: Sequence[dict[str, Tensor]], labels: Sequence[str] = ("easy", "hard"),
               by: Sequence[str] = ("overlap",), batch_size: int = 8) -> dict[str, Views]:
    """The easy and the hard pair of a batch (:func:`pick_indices` on :func:`pair_stats`), each a
    one-pair :class:`~mv_interp.data.views.Views`."""
    picks = pick_indices(pair_stats(views, batch_size), by)
    return {lab: Views(views).slice(picks[lab], picks[lab] + 1) for lab in labels if lab in picks}
