"""Where the tools get their multi-view examples: one pair-source abstraction.

A *pair source* hands out batches of views (:class:`~mv_interp.data.views.Views`) in two ways:

* ``batch(step, batch_size, device)`` — the training order: batch ``step`` is a pure function of
  the source's seed and ``step`` (so a resumed run sees the same data as an uninterrupted one);
* ``take(start, count, device)`` — examples ``start … start + count − 1`` in their natural order
  (evaluation, head scoring; every built-in source has it);

and says what it is with ``describe()`` (JSON-able; part of a run's identity, see
:mod:`mv_interp.resume`). :func:`open_source` turns every form of data the tools accept into one:

==========================================  =============================================
``None``                                    :class:`SyntheticSource` (rendered rooms, exact geometry)
a capture directory                         :class:`DatasetSource` over :class:`~mv_interp.data.CaptureDataset`
a pairs file (``.safetensors`` / ``.pt``)   :class:`TensorSource` (:func:`save_pairs` writes one)
user images (files: one pair = one group)   :class:`ImageSource` (``img`` only: no geometry)
a batch of views (list of view dicts)       :class:`TensorSource`
a dataset of samples                        :class:`DatasetSource`
==========================================  =============================================

Probes (training and evaluation), head scoring (``mv-interp heads``) and the report read their
data through these sources.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, Union, runtime_checkable

import torch
from torch import Tensor

from ..images import load_images
from ..io import atomic_write
from .capture import CaptureDataset
from .synthetic import SceneConfig, render_views
from .views import Views

Batch = list[dict[str, Tensor]]
#: What :func:`open_source` (and so ``train_probes``, the report, ``mv-interp heads``) takes as
#: data: ``None`` (synthetic pairs), a :class:`PairSource`, a capture directory or pairs file, a
#: list of image files (``n_views`` per example), one batch of view dicts, or a
#: ``torch.utils.data.Dataset`` of samples.
SourceLike = Union[None, "PairSource", str, os.PathLike, Sequence[Union[str, os.PathLike]], Views,
                   Sequence[Mapping[str, Tensor]], "torch.utils.data.Dataset"]
#: image file suffixes :func:`open_source` reads as user images
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@runtime_checkable
class PairSource(Protocol):
    """What every pair source offers: ``batch`` and ``describe`` (a source of your own needs no
    more to train probes); the built-in sources also offer ``take`` (see the module docstring)."""

    def batch(self, step: int, batch_size: int, device: Any) -> Batch: ...

    def describe(self) -> dict[str, Any]: ...


def _scene_config(image_size: tuple[int, int], scene: Any = None):
    if scene is None:
        return SceneConfig(image_size=tuple(image_size))
    if isinstance(scene, dict):
        return SceneConfig.from_dict({"image_size": tuple(image_size), **scene})
    return scene


class SyntheticSource:
    """Synthetic rooms rendered on the fly: pair ``i`` of step ``s`` is scene ``seed + s·B + i``.

    >>> src = SyntheticSource((224, 224), seed=0)
    >>> views = src.batch(step=3, batch_size=8, device="cuda")
    """

    def __init__(self, image_size: tuple[int, int], seed: int = 0, scene: Any = None, compile: bool = False):
        self.config = _scene_config(image_size, scene)
        self.seed = int(seed)
        self.compile = bool(compile)  # render through torch.compile (faster on a GPU after a one-off compile)

    def batch(self, step: int, batch_size: int, device: Any = "cpu") -> Batch:
        return render_views(batch_size, self.config, seed=self.seed + step * batch_size, device=device,
                            compile=self.compile)

    def pairs(self, n: int, device: Any = "cpu") -> Batch:
        """The first ``n`` pairs (scenes ``seed … seed + n − 1``) as one batch."""
        return render_views(n, self.config, seed=self.seed, device=device)

    def take(self, start: int, count: int, device: Any = "cpu") -> Batch:
        """Scenes ``seed + start … seed + start + count − 1``."""
        return render_views(count, self.config, seed=self.seed + start, device=device)

    def describe(self) -> dict[str, Any]:
        return {"source": "synthetic", "seed": self.seed, "scene": self.config.to_dict()}


class DatasetSource:
    """Pairs from a dataset whose items are samples (lists of unbatched view dicts), e.g.
    :class:`mv_interp.data.CaptureDataset` or :class:`mv_interp.data.SyntheticPairs`.

    Each epoch visits the items in a permutation drawn from ``(seed, epoch)``; global pair
    ``g = step · B + b`` is item ``perm(g // len)[g % len]``. Datasets with ``batch(indices)``
    (``SyntheticPairs``) or ``__getitems__`` are asked for a whole batch at once.
    """

    def __init__(self, dataset: Any, seed: int = 0, name: str = ""):
        if len(dataset) == 0:
            raise ValueError("the probe dataset is empty")
        self.dataset, self.seed, self.name = dataset, int(seed), name or type(dataset).__name__
        self._perms: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self.dataset), generator=g)}
        return self._perms[epoch]

    def _indices(self, step: int, batch_size: int) -> list[int]:
        n = len(self.dataset)
        return [int(self._perm(g // n)[g % n]) for g in range(step * batch_size, (step + 1) * batch_size)]

    def _items(self, indices: Sequence[int], device: Any) -> Batch:
        ds = self.dataset
        if hasattr(ds, "batch") and callable(ds.batch):
            views = ds.batch(indices)
        elif hasattr(ds, "__getitems__"):
            views = Views.collate(ds.__getitems__(list(indices)))
        else:
            views = Views.collate([ds[i] for i in indices])
        return [{k: v.to(device) for k, v in view.items()} for view in views]

    def batch(self, step: int, batch_size: int, device: Any = "cpu") -> Batch:
        return self._items(self._indices(step, batch_size), device)

    def pairs(self, n: int | None = None, device: Any = "cpu") -> Batch:
        """The first ``n`` items (all when None), in order, as one batch (for evaluation)."""
        return self._items(range(min(n or len(self.dataset), len(self.dataset))), device)

    def take(self, start: int, count: int, device: Any = "cpu") -> Batch:
        """Items ``start … start + count − 1`` in order (fewer at the end of the dataset)."""
        return self._items(range(start, min(start + count, len(self.dataset))), device)

    def describe(self) -> dict[str, Any]:
        return {"source": "dataset", "name": self.name, "seed": self.seed, "len": len(self.dataset)}


class TensorSource(DatasetSource):
    """Pairs held in memory as one batch (a list of batched views), visited like :class:`DatasetSource`."""

    def __init__(self, views: Batch, seed: int = 0, name: str = "tensors"):
        self.views = Views(views).validate(what="pairs")
        super().__init__(range(self.views.batch_size), seed, name)

    def _items(self, indices: Sequence[int], device: Any) -> Batch:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return [{k: v[idx.to(v.device)].to(device) for k, v in view.items()} for view in self.views]


def save_pairs(path: str | os.PathLike, views: Batch) -> Path:
    """Write a batch of views as ``.safetensors`` (keys ``view{v}/{key}``), atomically."""
    from safetensors.torch import save_file

    Views(views).validate(what="pairs")
    tensors = {f"view{v}/{k}": t.detach().cpu().contiguous() for v, view in enumerate(views, start=1)
               for k, t in view.items()}
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"format": "mv_interp.pairs/1"}))


def load_pairs_file(path: str | os.PathLike, seed: int = 0) -> TensorSource:
    """Pairs from a file written by :func:`save_pairs` (or a ``.pt`` holding a list of batched view dicts)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file not found: {path} (write one with mv_interp.probes.data.save_pairs)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        flat = load_file(str(path))
        n = max(int(k.split("/")[0][4:]) for k in flat)
        views = [{k.split("/", 1)[1]: t for k, t in flat.items() if k.startswith(f"view{v}/")} for v in range(1, n + 1)]
    else:
        views = torch.load(path, map_location="cpu", weights_only=True)
    return TensorSource(list(views), seed, name=path.name)


def open_pairs(path: str | os.PathLike, image_size: tuple[int, int], seed: int = 0) -> DatasetSource:
    """A pair source for a path: a capture directory (``mv-interp data render`` / ``convert-habitat``;
    images cropped to the model's input size) or a pairs file (:func:`save_pairs`)."""
    path = Path(path)
    if path.is_dir():
        H, W = image_size
        return DatasetSource(CaptureDataset(path, size=max(H, W), square_ok=H == W), seed, name=str(path))
    return load_pairs_file(path, seed)


class ImageSource(TensorSource):
    """The user's own images: each group of files is one example (view 1 first), loaded at the
    model's input size (:func:`mv_interp.images.load_images`). Views hold ``img`` only — no
    depth or cameras — so only tools that need no ground truth run on them (head patterns,
    register knockout, the pointmap lens, the model's own predictions).

    >>> src = ImageSource([["a1.jpg", "a2.jpg"], ["b1.jpg", "b2.jpg"]], size=224)
    """

    def __init__(self, groups: Sequence[Sequence[str | os.PathLike]], size: int = 224, square_ok: bool = False,
                 patch: int = 16, seed: int = 0):
        groups = [list(g) for g in groups]
        if not groups or any(len(g) < 2 for g in groups):
            raise ValueError("ImageSource needs groups of at least two image files (one group per example, view 1 "
                             "first)")
        if len({len(g) for g in groups}) != 1:
            raise ValueError(f"every group must have the same number of views, got {sorted({len(g) for g in groups})}")
        missing = [str(p) for g in groups for p in g if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"image file(s) not found: {missing[:5]}")
        imgs = [load_images(g, size=size, square_ok=square_ok, patch=patch) for g in groups]
        shapes = {tuple(t.shape[-2:]) for t in imgs}
        if len(shapes) != 1:  # every example of a batch must share one size: crop to the common one
            h, w = min(s[0] for s in shapes), min(s[1] for s in shapes)
            imgs = [t[..., (t.shape[-2] - h) // 2:(t.shape[-2] - h) // 2 + h, (t.shape[-1] - w) // 2:(t.shape[-1] - w) // 2 + w]
                    for t in imgs]
        views = [{"img": torch.stack([t[v] for t in imgs])} for v in range(len(groups[0]))]
        self.files = [[str(p) for p in g] for g in groups]
        super().__init__(views, seed, name="images")

    def describe(self) -> dict[str, Any]:
        return {"source": "images", "files": self.files, "seed": self.seed}


def open_source(data: SourceLike, image_size: tuple[int, int], seed: int = 0, n_views: int = 2) -> PairSource:
    """A pair source for any form of data the tools accept (module docstring).

    ``image_size`` is the model's input size ``(H, W)`` (synthetic scenes are rendered, captures
    and images cropped, at it); ``n_views`` the views per synthetic example. A list of image
    paths is one group per ``n_views`` consecutive files.
    """
    if data is None:
        return SyntheticSource(tuple(image_size), seed=seed, scene={"n_views": n_views} if n_views != 2 else None)
    if isinstance(data, (SyntheticSource, DatasetSource)) or (hasattr(data, "batch") and hasattr(data, "describe")):
        return data
    if isinstance(data, (str, os.PathLike)) and Path(data).suffix.lower() not in IMAGE_SUFFIXES:
        return open_pairs(data, tuple(image_size), seed=seed)
    if isinstance(data, (list, tuple)) and data and all(isinstance(p, (str, os.PathLike)) for p in data):
        if len(data) % n_views:
            raise ValueError(f"{len(data)} image files do not split into examples of {n_views} views")
        groups = [list(data[i:i + n_views]) for i in range(0, len(data), n_views)]
        H, W = image_size
        return ImageSource(groups, size=max(H, W), square_ok=H == W, seed=seed)
    if isinstance(data, (str, os.PathLike)):
        raise ValueError(f"{data}: one image is not an example; give the views of each example (two or more files)")
    if isinstance(data, (list, tuple)) and data and isinstance(data[0], dict):
        return TensorSource(list(data), seed=seed)  # one batch of views held in memory
    return DatasetSource(data, seed=seed)
