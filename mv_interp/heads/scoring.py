"""Scores of every attention head, streamed over a dataset.

The core is :func:`block_statistics`, a pure function of one view-to-view block of an
attention pattern ``[batch, head, q_pos, k_pos]`` that returns *sums* (over queries and
samples). Sums add across batches, so streaming over a dataset is exact: scoring 4 batches
of 2 pairs gives the same numbers as one batch of 8 (up to float summation order).
:class:`HeadScorer` runs the model once per batch with a hook on every attention pattern the
model declares (``model.attention_sites()``), splits each pattern into view-to-view blocks with
:func:`~mv_interp.adapters.base.pattern_blocks` and folds the block's statistics into its
running sums inside the hook, so only one pattern is alive at a time whatever the model's size.

Three families of scores (``docs/heads.md`` has the definitions):

- **correspondence** (query view ≠ key view): the paper's zero-shot estimator (E.3) — the
  argmax of a query patch's attention row over the other view's patches, against the
  ground-truth patch correspondence — as recall at pixel thresholds on the distance between
  patch centres; TransformerLens' detection-pattern scores ``mul`` (attention mass on the target
  pairs) and ``abs`` (one minus the L1 distance to the target distribution); their chance levels
  (uniform attention) and the recall of the "same grid position" baseline.
- **register**: the attention mass on the ``k`` keys that receive most attention averaged over
  all queries of a sample (the same few keys whatever the query), which keys those are, and the
  norm of the residual stream entering the layer at those keys over the median key's (the
  high-norm tokens of "Vision Transformers Need Registers").
- **local**: the attention mass within ``local_radius`` patches (Chebyshev) of the query's own
  grid position, and on the own position alone; for a cross-view block the same numbers around
  the same grid position in the other view.
"""

from __future__ import annotations

import functools
import itertools
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from .. import distributed as D
from ..adapters.base import AttentionSite, ProbeSite, pattern_blocks, view_tokens
from ..data.views import BatchesLike, Views, ViewsLike, as_views, is_views
from ..resume import StateFile, fingerprint, tensor_digest
from ..types import ModelLike, as_module
from .result import GEOMETRY_KEYS, KINDS, HeadScores, ScoreConfig, UnitInfo
from .targets import Correspondence, centre_distance, correspondence_targets, grid_distance

__all__ = [
    "KINDS",
    "ScoreConfig",
    "BlockStatistics",
    "block_statistics",
    "UnitInfo",
    "HeadScorer",
    "score_heads",
    "iter_batches",
]

# --------------------------------------------------------------------------------------
# The pure core: statistics of one pattern block
# --------------------------------------------------------------------------------------


class BlockStatistics(NamedTuple):
    """Sums of one block over its queries and samples, and the per-sample register keys.

    ``sums`` maps a statistic to a tensor (``[head]``, ``[head, thresholds]``, ``[head, k_pos]``
    or a scalar); every entry is a sum, so the statistics of two batches add.
    ``top_keys`` is ``(indices, shares)``, both ``[batch, head, k]``: each sample's top-k keys of
    the query-averaged attention and their shares of it, or ``None``.
    ``per_sample``: the :data:`PER_SAMPLE_SUMS` of each sample, with a leading ``[batch]`` axis
    (``sums`` holds their totals): what per-example intervals resample, from one batched forward.
    """

    sums: dict[str, Tensor]
    top_keys: tuple[Tensor, Tensor] | None
    per_sample: dict[str, Tensor] | None = None


#: The sums :func:`block_statistics` also returns per sample (``BlockStatistics.per_sample``).
PER_SAMPLE_SUMS = ("rows", "samples", "block_mass", "corr_rows", "corr_hits", "corr_chance", "corr_same_pos",
                   "register_mass", "register_chance", "local_mass", "local_chance")


@functools.lru_cache(maxsize=16)
def _grid_tables(h: int, w: int, patch: int, radius: int, device: str) -> tuple[Tensor, Tensor]:
    window = (grid_distance(h, w, device=device) <= radius).float()
    return window, centre_distance(h, w, patch, device=device)


def block_statistics(
    pattern: Float[Tensor, "batch head q_pos k_pos"],
    grid: tuple[int, int],
    patch_size: int,
    thresholds_px: Sequence[float],
    kinds: Sequence[str] = KINDS,
    register_k: int = 5,
    local_radius: int = 1,
    correspondence: Correspondence | None = None,
    n_prefix: int = 0,
    query_index: Tensor | Sequence[int] | None = None,
) -> BlockStatistics:
    """Statistics of one view-to-view attention block (queries of view b, keys of view a).

    ``pattern`` rows need not sum to 1 (a block of a pattern over several key views holds part
    of each row): every mass below is the fraction of the row's mass *in this block*, and
    ``block_mass`` records how much that is. Both views share the ``grid = (h, w)`` patch grid.
    ``correspondence`` (targets of b in a, only for a block between two different views)
    enables the correspondence sums; queries with ``match == -1`` are not scored.
    ``n_prefix``: special tokens (camera, registers, cls) before each view's patches on both
    axes. Only patch queries are scored; local and correspondence scores use the patch keys,
    the register scores every key — a model's real register tokens are keys like any other, at
    indices ``0 … n_prefix - 1`` of ``register_counts`` / ``register_key_mass``.
    ``query_index``: the block holds only these patch queries (indices into the ``h × w`` grid, no
    special-token rows), e.g. rows from :class:`~mv_interp.layers.QueryPatterns`; every sum is then
    over those queries.

    Sums returned (``rows`` = batch · q_pos queries):

    - ``rows``, ``samples``; ``block_mass`` ``[head]``.
    - local: ``local_mass`` ``[head]`` (mass within ``local_radius`` of the query's grid
      position), ``local_chance`` (the same for uniform attention), ``diag_mass`` ``[head]``
      (mass on the query's own position). TransformerLens' ``abs`` score against a one-hot
      target equals ``2 · mul − 1`` on normalised rows, so only ``mul`` is kept there.
    - register: ``register_mass`` ``[head]`` (per sample, the share of the query-averaged
      attention on its top ``register_k`` keys), ``register_chance``, ``register_counts``
      ``[head, k_pos]`` (how often each key is in a sample's top set with more than its uniform
      share ``1 / k_pos``), ``register_key_mass`` ``[head, k_pos]`` (each key's share).
    - correspondence: ``corr_rows``; ``corr_hits`` ``[head, thresholds]`` (argmax within the
      threshold of the true patch centre, as :func:`mv_interp.metrics.correspondence_recall`
      measures it; a row with several exact maxima counts the share of them within it);
      ``corr_chance`` ``[thresholds]`` (expected hits of a uniformly random key);
      ``corr_same_pos`` ``[thresholds]`` (hits of predicting the same grid position);
      ``corr_mul_num`` / ``corr_mul_den`` ``[head]`` (mass on the target pairs — keys holding any
      corresponding pixel — over the block mass, TransformerLens' ``mul``); ``corr_mul_chance``;
      ``corr_abs`` ``[head]`` (``1 − ‖row − overlap‖₁`` with the row normalised, TL's ``abs``
      against the pixel-overlap distribution, in [−1, 1]) and ``corr_abs_chance``.
    """
    B, H, Nq, Nk = pattern.shape
    h, w = grid
    n_rows = n_prefix + h * w if query_index is None else len(query_index)
    if Nq != n_rows or Nk != n_prefix + h * w:
        raise ValueError(
            f"block_statistics: a pattern block is {Nq}x{Nk} but the {h}x{w} patch grid has {h * w} tokens "
            f"after {n_prefix} special tokens ({n_rows} query rows expected); the head scores need attention "
            "between patch tokens only (declare extra tokens before the patches with the site's n_prefix)"
        )
    dev = pattern.device
    A_all = pattern.detach().float()  # patch queries, every key
    if query_index is None:
        A_all = A_all[:, :, n_prefix:]
        qsel = torch.arange(h * w, device=dev)
    else:
        qsel = torch.as_tensor(query_index, dtype=torch.long, device=dev)
    A = A_all[..., n_prefix:]  # patch queries, patch keys
    Nq, Nk = A.shape[2], h * w
    window, centre_px = _grid_tables(h, w, patch_size, local_radius, str(dev))
    window = window[qsel]  # [Nq, Nk]: the scored queries' neighbourhoods
    mass = A_all.sum(-1)  # [B, H, Nq]: the rows' mass in this block, on its special tokens too
    safe = mass.clamp_min(1e-12)
    ones = torch.ones(B, device=dev)
    # per sample first (leading [batch] axis), summed over the batch at the end: one set of formulas
    per: dict[str, Tensor] = {"rows": ones * Nq, "samples": ones, "block_mass": mass.sum(2)}
    sums: dict[str, Tensor] = {}
    top_keys = None
    if "local" in kinds:
        per["local_mass"] = (torch.einsum("bhqk,qk->bhq", A, window) / safe).sum(2)
        per["local_chance"] = ones * (window.sum() / Nk)
        own = A.gather(-1, qsel.view(1, 1, -1, 1).expand(B, H, -1, 1))[..., 0]  # [B, H, Nq]: own position
        sums["diag_mass"] = (own / safe).sum((0, 2))
    if "register" in kinds:
        n_keys = A_all.shape[-1]
        k = min(register_k, n_keys)
        # [B, H, keys]: query-averaged attention over every key of the block (special tokens too)
        avg = A_all.sum(2) / A_all.sum((2, 3))[..., None].clamp_min(1e-12)
        top = avg.topk(k, dim=-1)
        top_keys = (top.indices, top.values)
        per["register_mass"] = top.values.sum(-1)
        per["register_chance"] = ones * (k / n_keys)
        # a key counts as a sample's register only if it also gets more than its uniform share, so
        # the filler of a top-k set (a head with two registers and k = 5) is not reported
        above = (top.values > 1 / n_keys).float()
        sums["register_counts"] = torch.einsum("bhjn,bhj->hn", F.one_hot(top.indices, n_keys).float(), above)
        sums["register_key_mass"] = avg.sum(0)  # [H, keys]
    if "correspondence" in kinds and correspondence is not None:
        match, overlap = correspondence.match.to(dev), correspondence.overlap.to(dev).float()
        if match.shape != (B, h * w) or overlap.shape != (B, h * w, Nk):
            raise ValueError(f"block_statistics: correspondence match {tuple(match.shape)} / overlap "
                             f"{tuple(overlap.shape)} do not fit a {h}x{w} grid of a batch of {B}")
        match, overlap = match[:, qsel], overlap[:, qsel]
        scored = match >= 0  # [B, Nq]
        sel = scored.float()
        gt = match.clamp_min(0)
        thr = torch.as_tensor(list(thresholds_px), dtype=torch.float32, device=dev)
        near_gt = (centre_px[gt][..., None] <= thr).float()  # [B, Nq, Nk, T]: keys within t of the truth
        # The argmax of each row; exact ties (a uniform row) share the credit evenly, so a head that
        # cannot decide scores the chance level instead of whatever its first key happens to give.
        is_max = (A == A.amax(-1, keepdim=True)).float()
        hits = torch.einsum("bhqk,bqkt->bhqt", is_max, near_gt) / is_max.sum(-1)[..., None]
        per["corr_rows"] = sel.sum(1)
        per["corr_hits"] = torch.einsum("bhqt,bq->bht", hits, sel)
        per["corr_chance"] = torch.einsum("bqkt,bq->bt", near_gt, sel) / Nk
        same = centre_px[qsel[None].expand(B, -1), gt][..., None] <= thr  # [B, Nq, T]
        per["corr_same_pos"] = torch.einsum("bqt,bq->bt", same.float(), sel)
        support = (overlap > 0).float()
        sums["corr_mul_num"] = torch.einsum("bhqk,bqk,bq->h", A, support, sel)
        sums["corr_mul_den"] = torch.einsum("bhq,bq->h", mass, sel)
        sums["corr_mul_chance"] = torch.einsum("bq,bq->", support.sum(-1) / Nk, sel)
        l1 = ((A / safe[..., None]) - overlap[:, None]).abs().sum(-1)  # [B, H, Nq]
        if n_prefix:  # mass on the special tokens is off the target distribution
            l1 = l1 + A_all[..., :n_prefix].sum(-1) / safe
        sums["corr_abs"] = torch.einsum("bhq,bq->h", 1 - l1, sel)
        sums["corr_abs_chance"] = torch.einsum("bq,bq->", 1 - (overlap - 1 / Nk).abs().sum(-1), sel)
    sums.update({name: t.sum(0) for name, t in per.items()})
    return BlockStatistics(sums, top_keys, per)


# --------------------------------------------------------------------------------------
# Units: one (attention site, query view, key view) block
# --------------------------------------------------------------------------------------


def _key_offsets(site: AttentionSite, n_views: int, per: int) -> dict[tuple[int, int], int]:
    """Offset along the pattern's key axis of each block (mirrors ``pattern_blocks``)."""
    if site.layout == "view":
        return {(site.query_view, kv): i * per for i, kv in enumerate(site.key_views)}
    if site.layout == "stacked":
        return {(v, v): 0 for v in range(1, n_views + 1)}
    if site.layout == "global":
        return {(qv, kv): (kv - 1) * per for qv in range(1, n_views + 1) for kv in range(1, n_views + 1)}
    raise ValueError(f"attention site {site.name!r} has unknown layout {site.layout!r}")


def _input_residual(site: AttentionSite, key_view: int, probes: Sequence[ProbeSite]) -> ProbeSite | None:
    """The residual stream entering ``site``'s block for ``key_view``: the last residual probe site
    of that view in the same stack that comes before the block (the stack's input for block 0)."""
    before = [p for p in probes if p.view == key_view and p.stack == site.stack and p.is_residual
              and p.kind != "enc_out" and p.layer < site.layer]
    return max(before, key=lambda p: p.order) if before else None


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def iter_batches(data: BatchesLike, batch_size: int = 8) -> Iterable[list[dict[str, Tensor]]]:
    """Batches (lists of batched view dicts) from any of the forms :func:`score_heads` takes.

    - one batch: a list of view dicts (``mv_interp.data.render_views`` output) or a tuple of
      image tensors ``[batch, 3, H, W]`` — split into chunks of ``batch_size`` pairs;
    - a ``torch.utils.data.Dataset`` of samples (lists of unbatched view dicts) — collated in
      chunks of ``batch_size``;
    - any other iterable of batches (a ``DataLoader`` with ``collate_fn=collate_views``, a
      generator, a list of batches) — used as given.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(data, Mapping):
        as_views(data, "score_heads data")  # raises the "one view dict" message
    if is_views(data):
        yield from as_views(data, "score_heads data").batches(batch_size)
        return
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__") and not isinstance(data, (list, tuple)):
        n = len(data)
        for start in range(0, n, batch_size):
            yield Views.concat([as_views(data[i], f"dataset item {i}") for i in range(start, min(n, start + batch_size))])
        return
    if not isinstance(data, Iterable):
        raise ValueError(f"score_heads: cannot read data of type {type(data).__name__}; pass a batch (list of view "
                         "dicts), a Dataset of samples or an iterable of batches")
    for i, item in enumerate(data):
        yield as_views(item, f"batch {i}")


# --------------------------------------------------------------------------------------
# The streaming scorer
# --------------------------------------------------------------------------------------


class HeadScorer:
    """Accumulates head statistics batch by batch; :meth:`result` gives a :class:`HeadScores`.

    >>> scorer = HeadScorer(model)
    >>> for batch in loader:          # lists of batched view dicts (mv_interp.data format)
    ...     scorer.update(batch)
    >>> scores = scorer.result()

    The model runs under ``no_grad`` with one forward hook per attention pattern; hooks already
    on the model (e.g. an edit of a pattern) run first, so the scorer reads edited patterns.
    ``correspondence_fn(view_b, view_a, patch_size) -> Correspondence`` replaces the ground
    truth computed from depth and cameras (:func:`~mv_interp.heads.targets.correspondence_targets`).
    """

    def __init__(self, model: ModelLike, config: ScoreConfig | None = None,
                 correspondence_fn: Callable[..., Correspondence] | None = None) -> None:
        self.model = model
        self.module = as_module(model)
        self.config = config or ScoreConfig()
        self.correspondence_fn = correspondence_fn or correspondence_targets
        self.thresholds = self.config.resolved_thresholds(self.module.patch_size)
        self.units: dict[tuple[str, int, int], UnitInfo] = {}
        self.sums: dict[tuple[str, int, int], dict[str, Tensor]] = {}
        self.n_pairs = 0
        self.n_batches = 0
        self.n_pairs_with_geometry = 0
        self._grid: tuple[int, int] | None = None
        self._n_views: int | None = None
        self._warned_no_geometry = False
        self.per_sample: dict[tuple[str, int, int], dict[str, list[Tensor]]] | None = None
        """Set to ``{}`` to also keep every example's :data:`PER_SAMPLE_SUMS` (on the CPU, in float64):
        ``per_sample[unit key][stat]`` is a list of ``[batch, ...]`` tensors, one per update."""

    # -- sites ------------------------------------------------------------------------
    def _sites(self, n_views: int) -> list[AttentionSite]:
        sites = [s for s in self.module.attention_sites(n_views=n_views) if self.config.wants(s)]
        if not sites:
            names = [s.name for s in self.module.attention_sites(n_views=n_views)]
            raise ValueError(f"no attention site of {type(self.module).__name__} matches sites={self.config.sites}; "
                             f"its sites: {names[:12]}{' …' if len(names) > 12 else ''}")
        return sites

    def _units_for(self, sites: Sequence[AttentionSite], n_views: int, grid: tuple[int, int]) -> dict:
        probes: list[ProbeSite] = []
        if "register" in self.config.kinds:
            probes = self.module.probe_sites(encoder_blocks=True, n_views=n_views)
        units = {}
        for site in sites:
            per = site.n_prefix + grid[0] * grid[1]
            for (qv, kv), offset in _key_offsets(site, n_views, per).items():
                resid = _input_residual(site, kv, probes) if probes else None
                info = UnitInfo(site, qv, kv, offset, grid, self.module.patch_size,
                                resid.hook if resid else None, resid.name if resid else None, site.n_prefix)
                units[info.key] = info
        return units

    # -- one batch ----------------------------------------------------------------------
    @torch.no_grad()
    def update(self, batch: ViewsLike) -> None:
        """Run the model on one batch (a list of batched view dicts, or image tensors) and add
        its statistics."""
        views = as_views(batch, "HeadScorer.update")
        device = self.module.device
        imgs = [v["img"].to(device) for v in views]
        n_views = len(imgs)
        p = self.module.patch_size
        H, W = imgs[0].shape[-2:]
        if H % p or W % p:
            raise ValueError(f"images are {H}x{W}, not a multiple of the model's patch size {p}; resize or crop them")
        grid = (H // p, W // p)
        if self._grid is None:
            self._grid, self._n_views = grid, n_views
            self.units = self._units_for(self._sites(n_views), n_views, grid)
        elif (grid, n_views) != (self._grid, self._n_views):
            raise ValueError(f"batch {self.n_batches}: {n_views} views on a {grid[0]}x{grid[1]} patch grid, earlier "
                             f"batches {self._n_views} views on {self._grid[0]}x{self._grid[1]}; token counts are per "
                             "grid position, so score one image size and view count per run")
        targets = self._targets(views, n_views, device)
        sites = {u.site.name: u.site for u in self.units.values()}
        top_keys: dict[tuple, Tensor] = {}
        norms: dict[str, Tensor] = {}
        n_patch = grid[0] * grid[1]
        if self.config.max_queries is not None and self.config.max_queries < n_patch:
            hooks = self._sampled_hooks(sites, n_views, n_patch, targets, top_keys)
        else:
            hooks = [(site.pattern_hook, self._pattern_hook(site, n_views, targets, top_keys))
                     for site in sites.values()]
        resid_probes = {u.resid_site: u for u in self.units.values() if u.resid_hook}
        if resid_probes:
            probes = {ps.name: ps for ps in self.module.probe_sites(encoder_blocks=True, n_views=n_views)}
            by_hook: dict[str, list[ProbeSite]] = {}
            for name in resid_probes:
                by_hook.setdefault(probes[name].hook, []).append(probes[name])
            hooks += [(hook, self._norm_hook(ps_list, n_views, norms)) for hook, ps_list in by_hook.items()]
        with self.module.hooks(hooks):
            self.module(*imgs)
        self._add_norms(top_keys, norms)
        B = imgs[0].shape[0]
        self.n_pairs += B
        self.n_batches += 1
        if targets:
            self.n_pairs_with_geometry += B

    def _targets(self, views: list[dict[str, Tensor]], n_views: int, device) -> dict[tuple[int, int], Correspondence]:
        if "correspondence" not in self.config.kinds:
            return {}
        pairs = {(u.query_view, u.key_view) for u in self.units.values() if not u.same_view}
        if not pairs:
            return {}
        custom = self.correspondence_fn is not correspondence_targets
        if not custom and not all(all(k in v for k in GEOMETRY_KEYS) for v in views):
            if not self._warned_no_geometry:
                warnings.warn("score_heads: the views carry no depth/cameras, so correspondence scores are skipped "
                              "(pass views of the mv_interp.data format)", stacklevel=3)
                self._warned_no_geometry = True
            return {}
        p = self.module.patch_size
        out = {}
        for qv, kv in sorted(pairs):
            vb = {k: t.to(device) for k, t in views[qv - 1].items() if isinstance(t, Tensor)}
            va = {k: t.to(device) for k, t in views[kv - 1].items() if isinstance(t, Tensor)}
            out[(qv, kv)] = self.correspondence_fn(vb, va, p).to(device)
        return out

    def _pattern_hook(self, site: AttentionSite, n_views: int, targets: dict, top_keys: dict):
        def hook(pattern: Tensor, hook) -> None:
            for (qv, kv), block in pattern_blocks(pattern, site, n_views).items():
                self._add_block(site, qv, kv, block, targets, top_keys)
            return None

        return hook

    def _add_block(self, site: AttentionSite, qv: int, kv: int, block: Tensor, targets: dict, top_keys: dict,
                   query_index: Tensor | None = None) -> None:
        cfg = self.config
        unit = self.units[(site.name, qv, kv)]
        stats = block_statistics(block, unit.grid, unit.patch_size, self.thresholds, cfg.kinds, cfg.register_k,
                                 cfg.local_radius, targets.get((qv, kv)) if qv != kv else None, unit.n_prefix,
                                 query_index)
        acc = self.sums.setdefault(unit.key, {})
        for name, value in stats.sums.items():
            acc[name] = acc[name] + value if name in acc else value.clone()
        if self.per_sample is not None and stats.per_sample:
            keep = self.per_sample.setdefault(unit.key, {})
            for name, value in stats.per_sample.items():
                keep.setdefault(name, []).append(value.detach().double().cpu())
        if stats.top_keys is not None and unit.resid_hook:
            top_keys[unit.key] = stats.top_keys

    def sampled_queries(self, n_patch: int) -> Tensor:
        """The patch queries scored in the current batch when ``max_queries`` is set: a sorted
        sample, seeded by the batch's index (so batches cover different patches, reproducibly)."""
        g = torch.Generator().manual_seed(self.n_batches)
        return torch.randperm(n_patch, generator=g)[: self.config.max_queries].sort().values

    def _sampled_hooks(self, sites: Mapping[str, AttentionSite], n_views: int, n_patch: int, targets: dict,
                       top_keys: dict) -> list:
        """Hooks that score ``max_queries`` patch queries per view from q and k (SDPA stays on)."""
        from ..layers import QueryPatterns

        qsel = self.sampled_queries(n_patch)
        nq = len(qsel)
        by_hook = {site.pattern_hook: site for site in sites.values()}
        rows = {}
        for hook, site in by_hook.items():
            per = site.n_prefix + n_patch
            local = qsel + site.n_prefix
            rows[hook] = torch.cat([local + v * per for v in range(n_views)]) if site.layout == "global" else local

        def on_pattern(hook: str, pattern: Tensor) -> None:
            site = by_hook[hook]
            per = site.n_prefix + n_patch
            if site.layout == "global":
                for qv in range(1, n_views + 1):
                    q_rows = pattern[:, :, (qv - 1) * nq : qv * nq]
                    for kv in range(1, n_views + 1):
                        self._add_block(site, qv, kv, q_rows[..., (kv - 1) * per : kv * per], targets, top_keys, qsel)
            elif site.layout == "stacked":
                chunks = pattern.reshape(n_views, pattern.shape[0] // n_views, *pattern.shape[1:])
                for v in range(1, n_views + 1):
                    self._add_block(site, v, v, chunks[v - 1], targets, top_keys, qsel)
            else:
                for i, kv in enumerate(site.key_views):
                    block = pattern if len(site.key_views) == 1 else pattern[..., i * per : (i + 1) * per]
                    self._add_block(site, site.query_view, kv, block, targets, top_keys, qsel)

        return QueryPatterns(self.module, rows, on_pattern=on_pattern).hooks()

    @staticmethod
    def _norm_hook(sites: list[ProbeSite], n_views: int, norms: dict):
        def hook(act: Tensor, hook) -> None:
            for ps in sites:
                norms[ps.name] = torch.linalg.vector_norm(view_tokens(act, ps, n_views), dim=-1, dtype=torch.float32)
            return None

        return hook

    def _add_norms(self, top_keys: dict, norms: dict) -> None:
        for key, (top, share) in top_keys.items():
            unit = self.units[key]
            n = norms.get(unit.resid_site)
            if n is None or n.shape[-1] != unit.n_keys:
                continue
            B, H, k = top.shape
            # attention-weighted, so keys that only fill the top-k set do not dilute the ratio
            at_top = (torch.gather(n[:, None, :].expand(B, H, -1), -1, top) * share).sum(-1) \
                / share.sum(-1).clamp_min(1e-12)  # [B, H]
            median = n.median(dim=-1).values.clamp_min(1e-12)  # [B]
            acc = self.sums[key]
            ratio = (at_top / median[:, None]).sum(0)
            acc["register_norm_ratio"] = acc["register_norm_ratio"] + ratio if "register_norm_ratio" in acc else ratio
            count = torch.tensor(float(B), device=top.device)
            acc["register_norm_samples"] = acc.get("register_norm_samples", 0) + count

    # -- results and resuming -------------------------------------------------------------
    def reduce_ranks(self) -> None:
        """Under ``torch.distributed``: add up every rank's sums and counts (all ranks then hold the
        totals of all the batches scored). A no-op in one process."""
        if not D.active():
            return
        parts = D.gather_objects((self._state_cpu(), self.n_pairs, self.n_pairs_with_geometry, self.n_batches))
        device = self.module.device
        total: dict = {}
        for sums, *_ in parts:
            for key, named in sums.items():
                acc = total.setdefault(key, {})
                for name, t in named.items():
                    acc[name] = acc[name] + t if name in acc else t.clone()
        self.sums = {k: {n: t.to(device) for n, t in v.items()} for k, v in total.items()}
        self.n_pairs, self.n_pairs_with_geometry, self.n_batches = (sum(p[i] for p in parts) for i in (1, 2, 3))
        if self.units is None or not self.units:
            raise ValueError("HeadScorer.reduce_ranks: a rank scored no batch; give at least one batch per rank")

    def _state_cpu(self) -> dict:
        return {k: {n: t.detach().cpu() for n, t in v.items()} for k, v in self.sums.items()}

    def result(self, model_name: str | None = None) -> HeadScores:
        if not self.n_batches:
            raise ValueError("HeadScorer.result: no batch was scored; call update(batch) first (is the data empty?)")
        return HeadScores(
            units=list(self.units.values()),
            sums=self._state_cpu(),
            config=self.config,
            thresholds_px=self.thresholds,
            n_pairs=self.n_pairs,
            n_pairs_with_geometry=self.n_pairs_with_geometry,
            model_name=model_name or type(self.module).__name__,
            family=self.module.family,
        )

    def identity(self, first_batch: Any, batch_size: int, data_id: Any = None) -> dict[str, Any]:
        """What a resumed scoring run must share with the saved one: the model (family, config,
        weight fingerprint), the score settings, the batch size and the data (``data_id``, or a
        digest of the first batch's images)."""
        if data_id is None:
            data_id = tensor_digest(v["img"] for v in as_views(first_batch, "score_heads data"))
        return {"family": self.module.family, "model_config": self.module.config.to_dict(),
                "fingerprint": fingerprint(self.module), "score": self.config.to_dict(), "batch_size": batch_size,
                "data": data_id}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: the sums and counters (units are rebuilt from the model)."""
        sums = {"|".join(map(str, k)): {n: t.detach().cpu() for n, t in v.items()} for k, v in self.sums.items()}
        return {"sums": sums,
                "n_pairs": self.n_pairs, "n_batches": self.n_batches,
                "n_pairs_with_geometry": self.n_pairs_with_geometry, "config": self.config.to_dict(),
                "grid": list(self._grid) if self._grid else None, "n_views": self._n_views}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if ScoreConfig.from_dict(state["config"]) != self.config:
            raise ValueError("HeadScorer.load_state_dict: the saved state was scored with a different ScoreConfig; "
                             "start afresh (delete the state file) or use the same options")
        device = self.module.device
        self.sums = {}
        for key, v in state["sums"].items():
            name, qv, kv = key.rsplit("|", 2)
            self.sums[(name, int(qv), int(kv))] = {n: t.to(device) for n, t in v.items()}
        self.n_pairs, self.n_batches = int(state["n_pairs"]), int(state["n_batches"])
        self.n_pairs_with_geometry = int(state["n_pairs_with_geometry"])
        if state.get("grid") is not None:
            self._grid, self._n_views = tuple(state["grid"]), int(state["n_views"])
            self.units = self._units_for(self._sites(self._n_views), self._n_views, self._grid)
            unknown = sorted(set(self.sums) - set(self.units))
            if unknown:
                raise ValueError(f"HeadScorer.load_state_dict: the saved state has blocks {unknown[:4]} this model "
                                 "does not declare; it was scored with another model")


def score_heads(
    model: ModelLike,
    data: BatchesLike,
    kinds: Sequence[str] = KINDS,
    *,
    batch_size: int = 8,
    thresholds_px: Sequence[float] | None = None,
    register_k: int = 5,
    local_radius: int = 1,
    sites: Sequence[str] | None = None,
    config: ScoreConfig | None = None,
    correspondence_fn: Callable[..., Correspondence] | None = None,
    progress: bool = False,
    checkpoint: str | os.PathLike | None = None,
    data_id: Any = None,
) -> HeadScores:
    """Score every head of every attention site of ``model`` over ``data``.

    ``data``: a batch (list of batched view dicts as :func:`mv_interp.data.render_views`
    returns, split into ``batch_size`` chunks), a ``Dataset`` of samples, or any iterable of
    batches (see :func:`iter_batches`). Views need ``img``; correspondence scores also need
    ``depth``, ``valid``, ``intrinsics`` and ``cam2world``. Works for any model whose adapter
    declares ``attention_sites()``.

    Returns a :class:`~mv_interp.heads.HeadScores`.

    ``checkpoint``: a file (``progress.pt``) where the running statistics are saved after every
    batch (atomically, :class:`mv_interp.resume.StateFile`); a later call with the same model,
    settings and data resumes after the last scored batch, skipping the batches already seen.
    The data is identified by ``data_id`` (any JSON-able description; default: a digest of the
    first batch's images).

    >>> from mv_interp.data import SceneConfig, render_views
    >>> views = render_views(64, SceneConfig(image_size=(224, 224)), seed=0)
    >>> scores = score_heads(model, views, batch_size=16)
    >>> scores.table()[0]["corr_recall@16px"]
    >>> scores.best_per_layer()             # the paper's Figure 5 curve
    >>> scores.register_heads()             # heads + tokens for a knockout
    >>> scores.save("heads_out", figures=False)   # CSV, JSON, state (figures: save_score_figures)
    """
    if config is None:
        config = ScoreConfig(kinds=tuple(kinds), thresholds_px=None if thresholds_px is None else tuple(thresholds_px),
                             register_k=register_k, local_radius=local_radius,
                             sites=None if sites is None else tuple(sites))
    scorer = HeadScorer(model, config, correspondence_fn)
    batches = iter_batches(data, batch_size)
    state, done = None, 0
    if checkpoint is not None:
        batches = iter(batches)
        first = next(batches, None)
        if first is None:
            raise ValueError("score_heads got no data")
        batches = itertools.chain([first], batches)
        identity = scorer.identity(first, batch_size, data_id)
        if D.world_size() > 1:  # each rank keeps its own partial sums: one state file per rank
            p = Path(checkpoint)
            checkpoint = p.with_name(f"{p.stem}.rank{D.rank()}{p.suffix}")
            identity["world_size"] = D.world_size()
        state = StateFile(checkpoint, identity, what="head-scoring run")
        saved = state.load(on_mismatch="restart")
        if saved is not None:
            scorer.load_state_dict(saved["scorer"])
            done = int(saved.get("next_batch", scorer.n_batches))
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="scoring heads", unit="batch", initial=done)
    W, rank = D.world_size(), D.rank()
    for i, batch in enumerate(batches):
        if i < done:
            continue
        if i % W == rank:  # under torchrun each rank scores every W-th batch
            scorer.update(batch)
            if state is not None:
                state.save({"scorer": scorer.state_dict(), "next_batch": i + 1})
    scorer.reduce_ranks()
    return scorer.result()
