"""Where probe training and evaluation get their pairs.

A *pair source* returns the batch of step ``s`` as a pure function of its seed and ``s`` (so a
resumed run sees the same data as an uninterrupted one). Batches are lists of batched views in
the data format (``img``, ``pts3d``, ``valid``, ``depth`` … see :mod:`mv_interp.data`).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

#: First scene seed of the default held-out evaluation pairs; far from any training range
#: (training pair i uses scene data_seed + i).
EVAL_SEED = 1 << 40

Batch = list[dict[str, Tensor]]
REQUIRED_KEYS = ("img", "pts3d", "valid")


@runtime_checkable
class PairSource(Protocol):
    def batch(self, step: int, batch_size: int, device: Any) -> Batch: ...

    def describe(self) -> dict[str, Any]: ...


def _scene_config(image_size: tuple[int, int], scene: Any = None):
    from ..data import SceneConfig

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

    def __init__(self, image_size: tuple[int, int], seed: int = 0, scene: Any = None):
        self.config = _scene_config(image_size, scene)
        self.seed = int(seed)

    def batch(self, step: int, batch_size: int, device: Any = "cpu") -> Batch:
        from ..data import render_views

        return render_views(batch_size, self.config, seed=self.seed + step * batch_size, device=device)

    def batch_slice(self, step: int, batch_size: int, start: int, stop: int, device: Any = "cpu") -> Batch:
        """Pairs ``start:stop`` of :meth:`batch` ``(step, batch_size)``, rendered alone (a rank's shard)."""
        from ..data import render_views

        return render_views(stop - start, self.config, seed=self.seed + step * batch_size + start, device=device)

    def pairs(self, n: int, device: Any = "cpu") -> Batch:
        """The first ``n`` pairs (scenes ``seed … seed + n − 1``) as one batch."""
        from ..data import render_views

        return render_views(n, self.config, seed=self.seed, device=device)

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
            views = collate(ds.__getitems__(list(indices)))
        else:
            views = collate([ds[i] for i in indices])
        return [{k: v.to(device) for k, v in view.items()} for view in views]

    def batch(self, step: int, batch_size: int, device: Any = "cpu") -> Batch:
        return self._items(self._indices(step, batch_size), device)

    def batch_slice(self, step: int, batch_size: int, start: int, stop: int, device: Any = "cpu") -> Batch:
        """Pairs ``start:stop`` of :meth:`batch` ``(step, batch_size)`` (a rank's shard)."""
        return self._items(self._indices(step, batch_size)[start:stop], device)

    def pairs(self, n: int | None = None, device: Any = "cpu") -> Batch:
        """The first ``n`` items (all when None), in order, as one batch (for evaluation)."""
        return self._items(range(min(n or len(self.dataset), len(self.dataset))), device)

    def describe(self) -> dict[str, Any]:
        return {"source": "dataset", "name": self.name, "seed": self.seed, "len": len(self.dataset)}


class TensorSource(DatasetSource):
    """Pairs held in memory as one batch (a list of batched views), visited like :class:`DatasetSource`."""

    def __init__(self, views: Batch, seed: int = 0, name: str = "tensors"):
        check_batch(views)
        self.views = views
        super().__init__(range(batch_size_of(views)), seed, name)

    def _items(self, indices: Sequence[int], device: Any) -> Batch:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return [{k: v[idx.to(v.device)].to(device) for k, v in view.items()} for view in self.views]


def save_pairs(path: str | os.PathLike, views: Batch) -> Path:
    """Write a batch of views as ``.safetensors`` (keys ``view{v}/{key}``), atomically."""
    from safetensors.torch import save_file

    from ..loading import atomic_write

    check_batch(views)
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


def collate(samples: Sequence[Sequence[dict[str, Tensor]]]) -> Batch:
    """Stack samples (lists of unbatched views) into a batch (:func:`mv_interp.data.collate_views`)."""
    from ..data import collate_views

    return collate_views(list(samples))


def open_pairs(path: str | os.PathLike, image_size: tuple[int, int], seed: int = 0) -> DatasetSource:
    """A pair source for a path: a capture directory (``mv-interp data render`` / ``convert-habitat``;
    images cropped to the model's input size) or a pairs file (:func:`save_pairs`)."""
    path = Path(path)
    if path.is_dir():
        from ..data import CaptureDataset

        H, W = image_size
        return DatasetSource(CaptureDataset(path, size=max(H, W), square_ok=H == W), seed, name=str(path))
    return load_pairs_file(path, seed)


def check_batch(views: Batch, need: Sequence[str] = REQUIRED_KEYS) -> None:
    """One clear error for data that is not in the data format."""
    if not isinstance(views, (list, tuple)) or not views or not all(isinstance(v, dict) for v in views):
        raise ValueError("probe data must be a list of batched view dicts (mv_interp.data format: "
                         "[{'img': [B,3,H,W], 'pts3d': [B,H,W,3], 'valid': [B,H,W], ...}, ...])")
    for v, view in enumerate(views, start=1):
        missing = [k for k in need if k not in view]
        if missing:
            raise ValueError(f"view {v} of the probe data lacks {missing}; each view needs {list(need)} "
                             "(see mv_interp.data)")
    B = views[0]["img"].shape[0]
    if any(view["img"].shape[0] != B for view in views):
        raise ValueError("every view of a batch must hold the same number of pairs")


def slice_batch(views: Batch, start: int, stop: int) -> Batch:
    return [{k: v[start:stop] for k, v in view.items()} for view in views]


def batch_size_of(views: Batch) -> int:
    return int(views[0]["img"].shape[0])


def shard_batch(source: PairSource, step: int, batch_size: int, device: Any, start: int, stop: int) -> Batch:
    """Pairs ``start:stop`` of the batch of ``step``: a rank's shard, rendered or read on its own
    (sources with ``batch_slice``); other sources make the whole batch and slice it."""
    if start == 0 and stop == batch_size:
        return source.batch(step, batch_size, device)
    part = getattr(source, "batch_slice", None)
    if part is not None:
        return part(step, batch_size, start, stop, device)
    return slice_batch(source.batch(step, batch_size, device), start, stop)


class Prefetcher:
    """Makes the batches of steps ``first … last − 1`` ahead of use in a background thread.

    The backbone never waits for data while the worker keeps up: ``depth`` batches are made
    ahead. On CUDA the worker renders on its own stream and the consumer's stream waits for
    that batch only. ``stall_s`` is the total time :meth:`get` blocked (the data stall of the run);
    an exception in the worker is raised by the :meth:`get` of that step.

    >>> with Prefetcher(lambda s: source.batch(s, 8, "cuda"), 0, 100, "cuda") as batches:
    ...     views = batches.get(0)
    """

    def __init__(self, make: Any, first: int, last: int, device: Any, depth: int = 2):
        self.make, self.first, self.last = make, first, last
        self.device = torch.device(device)
        self.stall_s = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="mv_interp-prefetch", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        for step in range(self.first, self.last):
            if self._stop.is_set():
                return
            try:
                if stream is not None:
                    with torch.cuda.stream(stream):
                        views = self.make(step)
                        event = torch.cuda.Event()
                        event.record(stream)
                else:
                    views, event = self.make(step), None
                item = (step, views, event, None)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer, with its traceback
                item = (step, None, None, exc)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:  # the consumer is busy: check for close() and retry
                    continue
            if item[3] is not None:
                return

    def get(self, step: int) -> Batch:
        t0 = time.perf_counter()
        got, views, event, exc = self._queue.get()
        self.stall_s += time.perf_counter() - t0
        if exc is not None:
            raise exc
        if got != step:
            raise RuntimeError(f"prefetcher out of order: asked for step {step}, got {got}")
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            for view in views:
                for t in view.values():
                    if isinstance(t, Tensor) and t.is_cuda:
                        t.record_stream(torch.cuda.current_stream(self.device))
        return views

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
