"""Where probe training and evaluation get their pairs: the pair sources of
:mod:`mv_interp.data.sources` (re-exported here) and the probes' data checks.

Batches are lists of batched views in the data format (``img``, ``pts3d``, ``valid``, ``depth`` …
see :mod:`mv_interp.data`); probes need ``img``, ``pts3d`` and ``valid``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch
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
           "save_pairs", "slice_batch", "shard_batch", "Prefetcher"]

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


def shard_batch(source: PairSource, step: int, batch_size: int, device: Any, start: int, stop: int) -> Batch:
    """Pairs ``start:stop`` of the batch of ``step``: a rank's shard, rendered or read on its own
    (sources with ``batch_slice``, synthetic and dataset sources); other sources make the whole
    batch and slice it."""
    if start == 0 and stop == batch_size:
        return source.batch(step, batch_size, device)
    part = getattr(source, "batch_slice", None)
    if part is not None:
        return part(step, batch_size, start, stop, device)
    if isinstance(source, SyntheticSource):  # pair i of step s is scene seed + s·B + i
        return source.take(step * batch_size + start, stop - start, device)
    if isinstance(source, DatasetSource):  # the same permuted items as batch(step), only this shard read
        return source._items(source._indices(step, batch_size)[start:stop], device)
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
