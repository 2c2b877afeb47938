"""Mean activations over a dataset, for mean ablation.

``compute_means`` streams batches through the model once and keeps a running float64 sum
per hook, so memory does not grow with the dataset. Means are stored per *group*: one row
for a hook that holds one view, one row per view for a hook whose views are stacked on the
batch axis (the encoder's), so a mean never mixes views.

Example::

    >>> means = head_means(model, [(a1, a2), (b1, b2)], per_position=True)
    >>> means.save("means.safetensors")
    >>> spec = HeadAblation(layers=1, view=2, heads=[0], mode="mean", means="means.safetensors")
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..data.views import BatchesLike, is_views
from ..errors import UnknownNameError
from ..io import atomic_write
from ..types import ModelLike, as_module
from .sites import hook_info, n_views_for

FORMAT = "mv_interp.mean_activations/1"


class MeanActivations(Mapping):
    """Hook name → mean activation ``[groups, *activation.shape[1:]]`` (token axis of size 1
    for per-head means). Usable directly as ``source=`` of a mean ablation."""

    def __init__(self, means: Mapping[str, Tensor], n_examples: int, per_position: bool,
                 info: Mapping[str, Any] | None = None):
        self._means = dict(means)
        self.n_examples = n_examples
        """Number of examples (model inputs) averaged."""
        self.per_position = per_position
        """True: one mean per token position; False: averaged over positions too (per head/channel)."""
        self.info = dict(info or {})
        """Free-form provenance (model class, input size, …), saved with the means."""

    def __getitem__(self, hook: str) -> Tensor:
        try:
            return self._means[hook]
        except KeyError:
            raise UnknownNameError(f"no mean activation for {hook!r}; these means cover {sorted(self._means)[:6]}"
                           f"{' …' if len(self._means) > 6 else ''}. Compute them with compute_means(..., "
                           f"hooks=[{hook!r}])") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._means)

    def __len__(self) -> int:
        return len(self._means)

    def __repr__(self) -> str:
        kind = "per position" if self.per_position else "per head"
        return f"MeanActivations({len(self)} hooks, {kind}, {self.n_examples} examples)"

    def save(self, path: str | Path) -> Path:
        """Write a safetensors file (metadata in its header), atomically."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in self._means.items()}
        meta = {"format": FORMAT, "n_examples": str(self.n_examples), "per_position": str(self.per_position),
                "info": json.dumps(self.info)}
        return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> MeanActivations:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"mean activations file not found: {path} (write one with "
                                    "compute_means(...).save(path) or `mv-interp means`)")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not an mv_interp mean-activations file (format {meta.get('format')!r}, "
                                 f"expected {FORMAT!r})")
            means = {k: f.get_tensor(k) for k in f.keys()}
        return cls(means, int(meta["n_examples"]), meta["per_position"] == "True", json.loads(meta.get("info", "{}")))


def _batches(inputs: BatchesLike) -> Iterable[Sequence[Any]]:
    """One batch (a sequence of views) or an iterable of batches → iterable of batches."""
    return [inputs] if is_views(inputs) else inputs


def compute_means(model: ModelLike, inputs: BatchesLike, hooks: Sequence[str] | str, *, per_position: bool = True,
                  n_views: int | None = None, progress: bool = False) -> MeanActivations:
    """Mean of each hook's activation over every example of ``inputs``.

    ``inputs``: one batch (a sequence of views, each ``[batch, 3, H, W]`` or a data-format view
    dict) or an iterable of such batches (e.g. a DataLoader over ``mv_interp.data``).
    ``per_position=False`` also averages over the token axis (per-head / per-channel means that
    fit any input size). Runs under ``torch.no_grad``; accumulates in float64.
    """
    hooks = [hooks] if isinstance(hooks, str) else list(dict.fromkeys(hooks))
    if not hooks:
        raise ValueError("compute_means needs at least one hook name")
    infos = {h: hook_info(model, h) for h in hooks}
    sums: dict[str, Tensor] = {}
    count = 0
    size = None
    batches = _batches(inputs)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="mean activations")
    with torch.no_grad():
        for batch in batches:
            views = list(batch)
            _, cache = model.run_with_cache(*views, names_filter=hooks)
            n_batch = None
            for h in hooks:
                info = infos[h]
                act = cache[h].double()
                groups = n_views_for(model, n_views or len(views), info.site) if info.layout == "stacked" else 1
                act = act.reshape(groups, act.shape[0] // groups, *act.shape[1:])
                n_batch = act.shape[1]
                if not per_position:
                    if info.token_axis is None:
                        raise ValueError(f"{h} has no token axis to average over; use per_position=True")
                    act = act.mean(dim=info.token_axis + 1, keepdim=True)
                total = act.sum(dim=1)
                if h in sums and sums[h].shape != total.shape:
                    raise ValueError(f"{h}: batches differ in shape ({tuple(sums[h].shape)} vs {tuple(total.shape)}); "
                                     "per-position means need one input size (or use per_position=False)")
                sums[h] = sums[h] + total if h in sums else total
            count += int(n_batch or 0)
            size = tuple(views[0].shape[-2:]) if isinstance(views[0], Tensor) else size
    if count == 0:
        raise ValueError("compute_means got no examples")
    module = as_module(model)
    info = {"model": type(module).__name__, "input_size": list(size) if size else None}
    return MeanActivations({h: (s / count).float() for h, s in sums.items()}, count, per_position, info)


def head_means(model: ModelLike, inputs: BatchesLike, *, stack: str = "dec", kinds: Sequence[str] | None = None,
               per_position: bool = True, n_views: int | None = None, progress: bool = False) -> MeanActivations:
    """:func:`compute_means` of every attention site's per-head output (``hook_z``) in ``stack``."""
    sites = [s for s in as_module(model).attention_sites() if s.stack == stack]
    if not sites:
        stacks = sorted({s.stack for s in as_module(model).attention_sites()})
        raise ValueError(f"stack={stack!r} has no attention sites; valid stacks: {stacks}")
    if kinds is not None:
        have = sorted({s.kind for s in sites})
        for k in kinds:
            if k not in have:
                raise ValueError(f"kind={k!r}: the {stack} stack has attention kinds {have}")
        sites = [s for s in sites if s.kind in kinds]
    return compute_means(model, inputs, [s.z_hook for s in sites], per_position=per_position, n_views=n_views,
                         progress=progress)
