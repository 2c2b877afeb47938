"""Probe locations: the sites of one place in the network, one per view.

A model's :meth:`~mv_interp.adapters.base.MultiViewModel.probe_sites` lists one site per view
and place. The loss of the probes (DUSt3R's, see ``docs/metrics.md``) normalises all views of a
pair by one joint factor, so the probes of one place are trained together with one loss: a
:class:`Location` gathers them. Sites are paired by ``(stack, layer, kind)``, never by name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..adapters.base import ProbeSite, patch_tokens
from ..errors import UnknownNameError
from ..metrics import SKIP_KINDS


@dataclass(frozen=True)
class Location:
    """One place in the network, read in every view.

    Attributes:
        name: label, e.g. ``"dec3.cross"`` (the sites' names without their view suffix).
        stack / layer / kind: shared by all its sites (see :class:`ProbeSite`).
        order: position along the processing path (the smallest of its sites' orders).
        sites: one site per view, sorted by view.
    """

    name: str
    stack: str
    layer: int
    kind: str
    order: int
    sites: tuple[ProbeSite, ...]

    @property
    def views(self) -> tuple[int, ...]:
        return tuple(s.view for s in self.sites)

    def site(self, view: int) -> ProbeSite:
        for s in self.sites:
            if s.view == view:
                return s
        raise UnknownNameError(f"location {self.name!r} has no site for view {view} (views: {self.views})")

    @property
    def is_skip_residual(self) -> bool:
        """The residual right after a skip connection (what Figure 4 steps through)."""
        return self.kind in SKIP_KINDS


def _location_name(sites: Sequence[ProbeSite]) -> str:
    # "dec3.cross.v1" / "dec3.cross.v2" → "dec3.cross"; fall back to the fields when names differ otherwise.
    stripped = {re.sub(rf"[._-]v(iew)?{s.view}$", "", s.name) for s in sites}
    if len(stripped) == 1:
        name = stripped.pop()
        if name and all(name != s.name for s in sites):
            return name
    s = sites[0]
    return f"{s.stack}{s.layer}.{s.kind}" if s.layer >= 0 else f"{s.stack}.{s.kind}"


def group_locations(sites: Iterable[ProbeSite]) -> list[Location]:
    """Pair the sites of the same ``(stack, layer, kind)`` across views, in processing order.

    >>> locs = group_locations(model.probe_sites())
    >>> [(l.name, l.views) for l in locs][:3]   # [('enc_out', (1, 2)), ('dec_in', (1, 2)), ('dec0.self', (1, 2))]
    """
    groups: dict[tuple[str, int, str], list[ProbeSite]] = {}
    for s in sites:
        groups.setdefault((s.stack, s.layer, s.kind), []).append(s)
    out = []
    for (stack, layer, kind), members in groups.items():
        views = [s.view for s in members]
        if len(set(views)) != len(views):
            raise ValueError(
                f"probe sites {[s.name for s in members]} share stack={stack!r}, layer={layer}, kind={kind!r} and a "
                "view; each place must have at most one site per view (fix the adapter's probe_sites())"
            )
        members = sorted(members, key=lambda s: s.view)
        out.append(Location(_location_name(members), stack, layer, kind, min(s.order for s in members), tuple(members)))
    out.sort(key=lambda loc: (loc.order, loc.stack != "enc"))
    names = [loc.name for loc in out]
    if len(set(names)) != len(names):
        raise ValueError(f"probe locations got duplicate names {names}; the adapter's site names are ambiguous")
    return out


def select_sites(sites: Sequence[ProbeSite], wanted: Sequence[str] | None) -> list[ProbeSite]:
    """The sites named in ``wanted`` (site names or location names); all when ``wanted`` is None."""
    if wanted is None:
        return list(sites)
    locs = group_locations(sites)
    by_loc = {loc.name: loc.sites for loc in locs}
    by_site = {s.name: s for s in sites}
    chosen: dict[str, ProbeSite] = {}
    for w in wanted:
        if w in by_site:
            chosen[w] = by_site[w]
        elif w in by_loc:
            chosen.update({s.name: s for s in by_loc[w]})
        else:
            raise ValueError(f"no probe site or location named {w!r}; locations: {[loc.name for loc in locs]} "
                             "(pass encoder_blocks/sublayers to include those sites)")
    return [s for s in sites if s.name in chosen]


def read_tokens(cache, sites: Iterable[ProbeSite], n_views: int) -> dict:
    """``{site name: [batch, pos, d_model]}`` tokens of every site from a cache of hook activations."""
    return {s.name: patch_tokens(cache[s.hook], s, n_views) for s in sites}
