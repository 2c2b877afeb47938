"""``torch.utils.data`` glue: batching views and a synthetic-pairs dataset with a disk cache."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..io import atomic_write
from .geometry import complete_view
from .synthetic import SceneConfig, render_views
from .views import Views

#: bump when the renderer's output changes, so stale caches are not reused
RENDER_VERSION = 1
STORED = ("img", "depth", "valid", "intrinsics", "cam2world")


def collate_views(samples: Sequence[Sequence[dict[str, Tensor]]]) -> list[dict[str, Tensor]]:
    """Stack samples (lists of unbatched view dicts) into a batch (:meth:`Views.collate`).

    >>> loader = DataLoader(SyntheticPairs(1000), batch_size=32, collate_fn=collate_views)
    >>> view1, view2 = next(iter(loader))          # view1["img"]: [32, 3, 224, 224]
    """
    return Views.collate(samples)


def split_views(views: Sequence[dict[str, Tensor]]) -> list[list[dict[str, Tensor]]]:
    """The inverse of :func:`collate_views`: a batch → a list of samples (:meth:`Views.samples`)."""
    return Views(views).samples()


def _config_key(config: SceneConfig, seed: int) -> str:
    text = json.dumps({"config": config.to_dict(), "seed": seed, "version": RENDER_VERSION}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


class SyntheticPairs(torch.utils.data.Dataset):
    """``n`` synthetic scenes (item ``i`` = scene with seed ``seed + i``), each a list of
    ``config.n_views`` unbatched view dicts.

    Without ``cache_dir`` every item is rendered on the fly on ``device``. With it, scenes are
    rendered ``shard_size`` at a time into ``cache_dir/<config hash>/shard_XXXXXX.safetensors``
    (written atomically; images stored as 8-bit like a PNG, geometry exactly) and reused by
    later runs with the same config and seed. DataLoader batches are rendered in one call
    (``__getitems__``), so on a GPU use ``num_workers=0`` and a large ``batch_size``;
    ``compile=True`` renders through ``torch.compile`` (see :func:`render_views`).

    >>> ds = SyntheticPairs(10_000, SceneConfig(image_size=(224, 224)), cache_dir="~/.cache/mv_interp/rooms")
    >>> loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True, collate_fn=collate_views)
    """

    def __init__(self, n: int, config: SceneConfig | None = None, seed: int = 0, device="cpu",
                 cache_dir: str | os.PathLike | None = None, shard_size: int = 64, compile: bool = False):
        if n < 1:
            raise ValueError(f"SyntheticPairs needs n >= 1, got {n}")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.n, self.config, self.seed, self.device = n, config or SceneConfig(), seed, torch.device(device)
        self.shard_size = shard_size
        self.compile = compile
        self.cache = None
        if cache_dir is not None:
            self.cache = Path(cache_dir).expanduser() / f"{_config_key(self.config, seed)}-s{shard_size}"
        self._shard: tuple[int, list[dict[str, Tensor]]] | None = None

    def __len__(self) -> int:
        return self.n

    def _check(self, i: int) -> int:
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for SyntheticPairs of length {self.n}")
        return i % self.n

    def __getitem__(self, i: int) -> list[dict[str, Tensor]]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[list[dict[str, Tensor]]]:
        """Several items at once (what ``DataLoader`` calls): one render call for the whole batch."""
        if self.cache is None:
            return split_views(self.batch(indices))
        idx = [self._check(int(i)) for i in indices]
        return [[{k: t[i % self.shard_size] for k, t in v.items()} for v in self._load_shard(i // self.shard_size)]
                for i in idx]

    def batch(self, indices: Sequence[int]) -> list[dict[str, Tensor]]:
        """Items ``indices`` as one batch (a list of batched views), without splitting and
        re-stacking — the fast path for a training loop that draws its own indices.

        >>> views = ds.batch(range(i * 256, (i + 1) * 256))   # on ds.device
        """
        idx = [self._check(int(i)) for i in indices]
        if self.cache is None:
            return render_views(len(idx), self.config, device=self.device, compile=self.compile,
                                seeds=torch.tensor(idx, dtype=torch.int64) + self.seed)
        return collate_views(self.__getitems__(idx))

    # ---- cache -------------------------------------------------------------------------

    def shard_path(self, k: int) -> Path:
        return self.cache / f"shard_{k:06d}.safetensors"

    def _metadata(self, k: int) -> dict[str, str]:
        return {"format": "mv-interp-synthetic-shard", "version": str(RENDER_VERSION), "seed": str(self.seed),
                "shard": str(k), "shard_size": str(self.shard_size), "config": self.config.to_json()}

    def _render_shard(self, k: int) -> None:
        from safetensors.torch import save_file

        start = self.seed + k * self.shard_size
        views = render_views(self.shard_size, self.config, device=self.device, compile=self.compile,
                             seeds=torch.arange(start, start + self.shard_size, dtype=torch.int64))
        tensors = {}
        for v, view in enumerate(views):
            for key in STORED:
                t = view[key].detach().cpu()
                if key == "img":  # 8-bit, as an image file would hold it
                    t = t.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
                tensors[f"{v}.{key}"] = t.contiguous()
        self.cache.mkdir(parents=True, exist_ok=True)
        atomic_write(self.shard_path(k), lambda tmp: save_file(tensors, tmp, metadata=self._metadata(k)))

    def _load_shard(self, k: int) -> list[dict[str, Tensor]]:
        if self._shard is not None and self._shard[0] == k:
            return self._shard[1]
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = self.shard_path(k)
        fresh = False
        if path.is_file():
            try:
                with safe_open(str(path), "pt") as f:
                    fresh = f.metadata() == self._metadata(k)
            except Exception:  # noqa: BLE001 - an unreadable shard is re-rendered
                fresh = False
        if not fresh:
            self._render_shard(k)
        data = load_file(str(path))
        views = []
        for v in range(self.config.n_views):
            img = data[f"{v}.img"].to(torch.float32).div(127.5).sub(1)
            views.append(complete_view(img, data[f"{v}.depth"], data[f"{v}.valid"], data[f"{v}.intrinsics"],
                                       data[f"{v}.cam2world"], data["0.cam2world"]))
        self._shard = (k, views)
        return views

    def prepare(self, progress: bool = True) -> int:
        """Render every missing shard now (resumable); returns how many were rendered."""
        if self.cache is None:
            raise ValueError("SyntheticPairs.prepare() needs cache_dir")
        shards = range((self.n + self.shard_size - 1) // self.shard_size)
        if progress:
            from tqdm import tqdm

            shards = tqdm(shards, desc="rendering shards", unit="shard")
        done = 0
        for k in shards:
            if not self.shard_path(k).is_file():
                self._render_shard(k)
                done += 1
        return done
