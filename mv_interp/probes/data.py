"""Where probe training and evaluation get their pairs: the pair sources of
:mod:`mv_interp.data.sources` (re-exported here) and the probes' data checks.

Batches are lists of batched views in the data format (``img``, ``pts3d``, ``valid``, ``depth`` …
see :mod:`mv_interp.data`); probes need ``img``, ``pts3d`` and ``valid``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..data.sources import (
    DatasetSource,
    ImageSource,
    PairSource,
    SyntheticSource,
    TensorSource,
    load_pairs_file,
    open_pairs,
    open_source,
    save_pairs,
)
from ..data.views import Views

__all__ = ["EVAL_SEED", "REQUIRED_KEYS", "DatasetSource", "ImageSource", "PairSource", "SyntheticSource",
           "TensorSource", "batch_size_of", "check_batch", "collate", "load_pairs_file", "open_pairs", "open_source",
           "save_pairs", "slice_batch"]

#: First scene seed of the default held-out evaluation pairs; far from any training range
#: (training pair i uses scene data_seed + i).
EVAL_SEED = 1 << 40

Batch = list[dict[str, Tensor]]
REQUIRED_KEYS = ("img", "pts3d", "valid")


def collate(samples: Sequence[Sequence[dict[str, Tensor]]]) -> Batch:
    """Stack samples (lists of unbatched views) into a batch (:meth:`mv_interp.data.views.Views.collate`)."""
    return Views.collate(samples)


def check_batch(views: Batch, need: Sequence[str] = REQUIRED_KEYS) -> None:
    """One clear error for data that is not in the data format (:meth:`Views.validate`)."""
    Views(views if isinstance(views, (list, tuple)) else ()).validate(need, what="probe data")


def slice_batch(views: Batch, start: int, stop: int) -> Batch:
    """Pairs ``start:stop`` of every view (:meth:`Views.slice`)."""
    return Views(views).slice(start, stop)


def batch_size_of(views: Batch) -> int:
    """Number of pairs in a batch (:attr:`Views.batch_size`)."""
    return Views(views).batch_size
