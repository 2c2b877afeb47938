"""A batch of views: the one data type every package passes around.

mv_interp's data format (``docs/data.md``) is a *list of views*, view 1 first (the reference
frame of ``pts3d``); each view is a dict of tensors sharing a leading batch axis::

    [{"img": [B, 3, H, W], "depth": [B, H, W], "valid": [B, H, W], "pts3d": [B, H, W, 3], ...},  # view 1
     {"img": ..., ...}]                                                                          # view 2 …

:class:`Views` *is* that list (a ``list`` subclass), so every function that takes or returns the
plain list keeps working, and it adds the operations that used to be re-written per package::

    >>> views = Views.collate([sample0, sample1])        # samples: lists of unbatched view dicts
    >>> len(views), views.n_views, views.batch_size      # len() counts views, as for the plain list
    (2, 2, 2)
    >>> first = views[0]["img"]                          # view 1's images [B, 3, H, W]
    >>> head = views.slice(0, 1)                         # pair 0 only, still a Views
    >>> for chunk in views.batches(8): ...               # chunks of ≤ 8 pairs
    >>> Views.concat([head, views.slice(1, 2)]).batch_size
    2
    >>> views.validate(need=("img", "pts3d", "valid"))   # one clear error for malformed data

:func:`as_views` turns every input form the tools accept (a list of view dicts, a tuple of image
tensors ``[batch, 3, H, W]``, unbatched ``[3, H, W]`` views) into a :class:`Views`.

This module imports nothing from mv_interp beyond torch: it is the bottom of the data layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Union

import torch
from torch import Tensor

__all__ = ["Views", "ViewsLike", "BatchesLike", "as_views", "is_views"]

#: One view: a dict of tensors with a leading batch axis (``img`` at least).
View = dict[str, Tensor]


class Views(list):
    """A batch of multi-view examples: a list of view dicts, tensors batched on axis 0.

    ``len(views)`` is the number of *views* (as for the plain list); :attr:`batch_size` is the
    number of examples (pairs, triplets …). Non-tensor values in a view are kept as they are
    by every operation.
    """

    # -- construction -------------------------------------------------------------------
    @classmethod
    def collate(cls, samples: Sequence[Sequence[Mapping[str, Tensor]]]) -> Views:
        """Stack samples (lists of unbatched view dicts) into one batch.

        Every sample must have the same views, keys and shapes (one image size per batch).
        """
        samples = list(samples)
        if not samples:
            raise ValueError("collate_views needs at least one sample")
        n = len(samples[0])
        for i, s in enumerate(samples):
            if len(s) != n:
                raise ValueError(f"collate_views: sample 0 has {n} views but sample {i} has {len(s)}")
            for v in range(n):
                if s[v].keys() != samples[0][v].keys():
                    raise ValueError(f"collate_views: view {v} of sample {i} has keys {sorted(s[v])}, "
                                     f"sample 0 has {sorted(samples[0][v])}")
        out = []
        for v in range(n):
            view = {}
            for k in samples[0][v]:
                shapes = {tuple(s[v][k].shape) for s in samples}
                if len(shapes) > 1:
                    raise ValueError(f"collate_views: '{k}' of view {v} has different shapes across samples "
                                     f"{sorted(shapes)}; batch samples of one image size (or use batch_size=1)")
                view[k] = torch.stack([s[v][k] for s in samples])
            out.append(view)
        return cls(out)

    @classmethod
    def concat(cls, batches: Sequence[Sequence[Mapping[str, Tensor]]]) -> Views:
        """Concatenate batches with the same views and keys along the batch axis (tensor values
        only: a non-tensor value of a view, such as a name, has no batch axis and is dropped)."""
        batches = [b for b in batches]
        if not batches:
            raise ValueError("Views.concat needs at least one batch")
        n = len(batches[0])
        if any(len(b) != n for b in batches):
            raise ValueError(f"Views.concat: batches have different view counts {sorted({len(b) for b in batches})}")
        return cls([{k: torch.cat([b[v][k] for b in batches]) for k, t in batches[0][v].items() if isinstance(t, Tensor)}
                    for v in range(n)])

    # -- size ---------------------------------------------------------------------------
    @property
    def n_views(self) -> int:
        """Number of views (``len(self)``)."""
        return len(self)

    @property
    def batch_size(self) -> int:
        """Number of examples: the leading size of view 1's ``img`` (or its first tensor)."""
        if not self:
            return 0
        view = self[0]
        t = view["img"] if "img" in view else next(x for x in view.values() if isinstance(x, Tensor))
        return int(t.shape[0])

    # -- slicing and iteration ----------------------------------------------------------
    def slice(self, start: int, stop: int) -> Views:
        """Examples ``start:stop`` of every view."""
        return Views([{k: t[start:stop] if isinstance(t, Tensor) else t for k, t in view.items()} for view in self])

    def select(self, index: Tensor | Sequence[int]) -> Views:
        """The examples at ``index`` (a list or a 1-D integer tensor), in that order."""
        idx = torch.as_tensor(list(index) if not isinstance(index, Tensor) else index, dtype=torch.long)
        return Views([{k: t[idx.to(t.device)] if isinstance(t, Tensor) else t for k, t in view.items()}
                      for view in self])

    def batches(self, size: int) -> Iterator[Views]:
        """Consecutive chunks of at most ``size`` examples."""
        if size < 1:
            raise ValueError(f"batch_size must be >= 1, got {size}")
        for start in range(0, self.batch_size, size):
            yield self.slice(start, start + size)

    def samples(self) -> list[list[dict[str, Tensor]]]:
        """The inverse of :meth:`collate`: one list of unbatched view dicts per example."""
        return [[{k: t[b] for k, t in v.items()} for v in self] for b in range(self.batch_size)]

    def images(self) -> tuple[Tensor, ...]:
        """Each view's ``img`` ``[batch, 3, H, W]``: the model's forward arguments."""
        return tuple(v["img"] for v in self)

    def to(self, device: Any) -> Views:
        """Every tensor moved to ``device``."""
        return Views([{k: t.to(device) if isinstance(t, Tensor) else t for k, t in view.items()} for view in self])

    # -- validation ---------------------------------------------------------------------
    def validate(self, need: Sequence[str] = ("img",), what: str = "data") -> Views:
        """Raise one clear ``ValueError`` unless every view holds ``need`` and the same number of
        examples; returns ``self``."""
        if not self or not all(isinstance(v, Mapping) for v in self):
            raise ValueError(f"{what} must be a list of batched view dicts (mv_interp.data format: "
                             "[{'img': [B,3,H,W], 'pts3d': [B,H,W,3], 'valid': [B,H,W], ...}, ...])")
        for v, view in enumerate(self, start=1):
            missing = [k for k in need if k not in view]
            if missing:
                raise ValueError(f"view {v} of the {what} lacks {missing}; each view needs {list(need)} "
                                 "(see mv_interp.data)")
        B = self.batch_size
        if any(view["img"].shape[0] != B for view in self if "img" in view):
            raise ValueError("every view of a batch must hold the same number of pairs")
        return self


#: What :func:`as_views` accepts.
ViewsLike = Union[Views, Sequence[Mapping[str, Tensor]], Sequence[Tensor]]
#: What the batch-by-batch tools (head scores, means, probe evaluation) take as data: one batch,
#: an iterable of batches (a ``DataLoader`` with ``collate_fn=Views.collate``), or a
#: ``torch.utils.data.Dataset`` of samples (lists of unbatched view dicts), collated in chunks.
BatchesLike = Union[ViewsLike, Iterable, "torch.utils.data.Dataset"]  # an iterable's batches are checked as read


def is_views(obj: Any) -> bool:
    """Whether ``obj`` looks like one batch: a non-empty list/tuple of view dicts or ``[B, 3, H, W]`` images."""
    return isinstance(obj, (list, tuple)) and len(obj) > 0 and all(
        isinstance(v, Mapping) or (isinstance(v, Tensor) and v.ndim == 4) for v in obj)


def as_views(item: Any, where: str = "views", min_views: int = 2) -> Views:
    """``item`` as a :class:`Views`: a list of view dicts, or of image tensors (each becomes
    ``{"img": tensor}``); unbatched ``[3, H, W]`` views get a batch axis of one.

    ``where`` names the argument in the error messages.
    """
    if isinstance(item, Views):
        return item
    if isinstance(item, Tensor):
        raise ValueError(f"{where}: a bare tensor is not a batch; pass a list of views (dicts with 'img') "
                         "or a tuple of images [batch, 3, H, W]")
    if isinstance(item, Mapping):
        raise ValueError(f"{where}: got one view dict; pass a list of views (view 1 first)")
    if not isinstance(item, Iterable):
        raise ValueError(f"{where}: expected a list of views, got {type(item).__name__}")
    views = list(item)
    if len(views) < min_views:
        raise ValueError(f"{where}: need at least {'two' if min_views == 2 else min_views} views, got {len(views)}")
    out = []
    for i, v in enumerate(views, start=1):
        if isinstance(v, Tensor):
            v = {"img": v}
        if not isinstance(v, Mapping) or "img" not in v:
            raise ValueError(f"{where}: view {i} is a {type(v).__name__}; each view must be a dict with 'img' "
                             "[batch, 3, H, W] (the mv_interp.data format) or an image tensor")
        if v["img"].ndim == 3:
            v = {k: t[None] if isinstance(t, Tensor) else t for k, t in v.items()}
        out.append(dict(v))
    return Views(out)
