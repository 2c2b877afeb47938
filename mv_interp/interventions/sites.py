"""Where an intervention lands: attention sites, hook axes and token layouts, from the model's metadata.

Nothing here names a model family. Attention sites come from ``model.attention_sites()``;
the token layout of any other hook from ``model.probe_sites()``; the axis order of a hook from
the TransformerLens names the shared attention core uses (``hook_q`` is
``[batch, head, pos, d_head]``, ``hook_z`` is ``[batch, pos, head, d_head]``, patterns are
``[batch, head, q_pos, k_pos]``; any other 3-D hook is ``[batch, pos, d_model]``).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..adapters.base import AttentionSite
from ..errors import OutOfRangeError, UnknownNameError, WrongTypeError
from ..types import ModelLike, as_module, is_traced

RESID_AXES = "batch pos d_model"
# how an attention site's layout maps to the token layout of its per-token hooks
_SITE_TO_TOKEN_LAYOUT = {"view": "view", "stacked": "stacked", "global": "concat"}


def check_hook(model: ModelLike, name: str) -> str:
    """``name`` if the model has that hook point, else a KeyError listing similar names."""
    module = as_module(model)
    if name not in module.hook_dict:
        raise UnknownNameError(module._unknown_hook_message(name))
    return name


_ORDER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def hook_order(model: ModelLike) -> list[str]:
    """Every hook name in execution order, safe to call inside an nnsight trace.

    Outside a trace this is ``model.hook_names()``. Inside one (``apply_nnsight`` may be the first
    thing to need the order), the recording forward goes through the envoy — ``model(...)``, which
    nnsight runs with the trace stood down — so it neither feeds nor consumes the trace's visits.
    """
    module = as_module(model)
    if module in _ORDER:
        return _ORDER[module]
    interleaver = getattr(model, "interleaver", None) if is_traced(model) else None
    if interleaver is None or not getattr(interleaver, "interleaving", False):
        order = module.hook_names()
    else:
        seen: list[str] = []

        def record(x: Tensor, hook: Any) -> None:
            seen.append(hook.name)

        p = module.patch_size
        with torch.no_grad(), module.hooks([(n, record) for n in module.hook_dict]):
            model(*module.example_inputs(1, (p, p)))
        order = list(dict.fromkeys(seen))
    _ORDER[module] = order
    return order


def execution_rank(model: ModelLike) -> dict[str, int]:
    """Hook name → position in the forward pass (what nnsight edits must follow)."""
    return {n: i for i, n in enumerate(hook_order(model))}


def envoy(model: ModelLike, name: str) -> Any:
    """The nnsight envoy of hook ``name`` (``model.dec_blocks2[1].attn.hook_pattern`` for
    ``"dec_blocks2.1.attn.hook_pattern"``)."""
    if not is_traced(model):
        raise WrongTypeError("apply_nnsight needs the nnsight-wrapped model (mv_interp.MVModel), not the plain module; "
                             "use fwd_hooks() with a plain module")
    obj = model
    for part in name.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def n_views_or_none(model: ModelLike, n_views: int | None, site: AttentionSite | None = None) -> int | None:
    """:func:`n_views_for`, or ``None`` when unknown (an error is raised only where it is needed)."""
    try:
        return n_views_for(model, n_views, site)
    except ValueError:
        if n_views is not None:
            raise
        return None


def _need_n_views(n_views: int | None, name: str) -> int:
    if n_views is None:
        raise ValueError(f"{name} holds several views and this model takes any number of views: pass n_views= "
                         "(the number of views of the run) so its tokens can be split by view")
    return n_views


def n_views_for(model: ModelLike, n_views: int | None, site: AttentionSite | None = None) -> int:
    """How many views the run holds: given, or fixed by the model."""
    if n_views is not None:
        if n_views < 1:
            raise ValueError(f"n_views must be >= 1, got {n_views}")
        return n_views
    fixed = as_module(model).fixed_n_views
    if fixed is not None:
        return fixed
    # a model taking any number of views: the site metadata cannot say how many this run has
    raise ValueError(f"{type(as_module(model)).__name__} takes any number of views: pass n_views= "
                     "(the number of views of the run) so tokens can be split by view")


# --------------------------------------------------------------------------------------
# Attention sites
# --------------------------------------------------------------------------------------


def _query_views(site: AttentionSite, any_views: bool = False) -> tuple[int, ...] | None:
    """Views whose queries a site holds (``None``: as many as the run has — attention over all views,
    or, with ``any_views`` (a model of any number of views), per-view attention stacked on the batch
    axis, whose declared views are only the default count)."""
    if site.query_view:
        return (site.query_view,)
    if site.layout == "global" or (any_views and site.layout == "stacked"):
        return None
    return tuple(site.key_views)


def resolve_attention_sites(
    model: ModelLike, stack: str, kind: str, layers: Sequence[int] | str, view: int | None
) -> list[AttentionSite]:
    """The attention sites an intervention addresses, with errors naming the valid choices.

    ``view`` is the query view (``None``: every site of those layers, all query views).
    """
    module = as_module(model)
    sites, any_views = module.attention_sites(), module.fixed_n_views is None
    stacks = sorted({s.stack for s in sites})
    if stack not in stacks:
        raise ValueError(f"stack={stack!r} has no attention sites in this model; valid stacks: {stacks}")
    in_stack = [s for s in sites if s.stack == stack]
    kinds = sorted({s.kind for s in in_stack})
    if kind not in kinds:
        raise ValueError(f"kind={kind!r}: the {stack} stack has attention kinds {kinds}")
    of_kind = [s for s in in_stack if s.kind == kind]
    valid_layers = sorted({s.layer for s in of_kind})
    lo, hi = valid_layers[0], valid_layers[-1]
    chosen = valid_layers if layers == "all" else list(layers)
    for layer in chosen:
        if layer not in valid_layers:
            raise OutOfRangeError(f"layer {layer} out of range for {stack} {kind}-attention (valid: {lo}..{hi})")
    out = []
    for layer in chosen:
        at_layer = [s for s in of_kind if s.layer == layer]
        if view is None:
            out.extend(at_layer)
            continue
        match = [s for s in at_layer if _query_views(s, any_views) is None or view in _query_views(s, any_views)]
        if not match:
            views = sorted({v for s in at_layer for v in _query_views(s, any_views) or ()})
            raise OutOfRangeError(f"view {view} has no {stack} {kind}-attention queries at layer {layer} "
                             f"(valid views: {', '.join(map(str, views))})")
        out.extend(match)
    return out


def check_heads(heads: Sequence[int] | str, site: AttentionSite) -> list[int]:
    """Head indices for ``site`` (``"all"`` expands), with an error naming the valid range."""
    if heads == "all":
        return list(range(site.n_heads))
    for h in heads:
        if not 0 <= h < site.n_heads:
            raise OutOfRangeError(f"head {h} out of range for {site.name} (valid: 0..{site.n_heads - 1})")
    return list(heads)


@dataclass(frozen=True)
class Block:
    """Where one (query view, key view) block sits in a pattern / scores tensor."""

    rows: slice
    """Batch rows (views stacked on the batch axis select their chunk)."""
    q: slice
    """Query positions."""
    k: slice
    """Key positions."""
    n_q: int
    n_k: int
    what_q: str
    """Human description of the query tokens, for error messages."""
    what_k: str


def attention_block(site: AttentionSite, shape: Sequence[int], n_views: int | None, view: int | None,
                    key_view: int | None) -> Block:
    """Slices of a ``[batch, head, q_pos, k_pos]`` tensor of ``site`` for the queries of ``view``
    and the keys of ``key_view`` (``None``: all of the site's queries / keys)."""
    B, _, Nq, Nk = shape
    everything = slice(None)
    if key_view is not None and key_view not in site.key_views and site.layout != "global":
        raise OutOfRangeError(f"key_view {key_view} is not a key view of {site.name} "
                         f"(valid: {', '.join(map(str, site.key_views))})")
    if site.layout == "view":
        q, nq = everything, Nq
        if key_view is None or len(site.key_views) == 1:
            k, nk = everything, Nk
        else:
            per = Nk // len(site.key_views)
            i = site.key_views.index(key_view)
            k, nk = slice(i * per, (i + 1) * per), per
        vq = view if view is not None else site.query_view
        vk = key_view if key_view is not None else ",".join(map(str, site.key_views))
        return Block(everything, q, k, nq, nk, f"queries of {site.name} (view {vq})",
                     f"keys of {site.name} (view {vk})")
    if site.layout == "stacked":
        if key_view is not None and view is not None and key_view != view:
            raise ValueError(f"{site.name} attends within each view: view {view}'s queries only see view {view}'s "
                             f"keys; set key_view={view} or leave it out")
        v = view if view is not None else key_view
        if v is None:
            rows = everything
        else:
            b = B // _need_n_views(n_views, site.pattern_hook)
            rows = slice((v - 1) * b, v * b)
        label = f"view {v}" if v is not None else "each view"
        return Block(rows, everything, everything, Nq, Nk, f"queries of {site.name} ({label})",
                     f"keys of {site.name} ({label})")
    if site.layout == "global":
        if view is None and key_view is None:
            return Block(everything, everything, everything, Nq, Nk, f"queries of {site.name} (all views)",
                         f"keys of {site.name} (all views)")
        n_views = _need_n_views(n_views, site.pattern_hook)
        if Nq % n_views or Nk % n_views:
            raise ValueError(f"{site.name}: {Nq} query tokens do not split into {n_views} views; pass n_views=")
        P = Nq // n_views
        for v, what in ((view, "view"), (key_view, "key_view")):
            if v is not None and not 1 <= v <= n_views:
                raise OutOfRangeError(f"{what} {v} out of range for {site.name} (valid: 1..{n_views})")
        q = slice((view - 1) * P, view * P) if view is not None else everything
        k = slice((key_view - 1) * P, key_view * P) if key_view is not None else everything
        return Block(everything, q, k, P if view is not None else Nq, P if key_view is not None else Nk,
                     f"queries of {site.name} ({f'view {view}' if view is not None else 'all views'})",
                     f"keys of {site.name} ({f'view {key_view}' if key_view is not None else 'all views'})")
    raise ValueError(f"unknown attention layout {site.layout!r} of {site.name}")


# --------------------------------------------------------------------------------------
# Any hook: axes and token layout
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HookInfo:
    """What generic code knows about one hook point."""

    name: str
    axes: str | None
    """Axis roles (``"batch pos d_model"``, ``"batch head pos d_head"``, …), ``None`` when unknown."""
    layout: str
    """Token layout: ``"view"``, ``"stacked"`` (views on the batch axis) or ``"concat"`` (views on the token axis)."""
    views: tuple[int, ...] | None
    """Views whose tokens the hook holds (``None`` when the model's metadata does not say)."""
    site: AttentionSite | None = None
    """The attention site the hook belongs to, if any."""
    known: bool = True
    """False when the model's metadata does not describe the hook (only whole patches make sense)."""

    @property
    def has_heads(self) -> bool:
        return self.axes is not None and "head" in self.axes.split()

    def axis(self, role: str) -> int:
        assert self.axes is not None
        return self.axes.split().index(role)

    @property
    def token_axis(self) -> int | None:
        if self.axes is None:
            return None
        roles = self.axes.split()
        for role in ("pos", "q_pos"):
            if role in roles:
                return roles.index(role)
        return None


def hook_info(model: ModelLike, name: str) -> HookInfo:
    """Axes, token layout and views of hook ``name``: axes as the hook point declares them
    (:class:`~mv_interp.hooks.HookPoint` ``axes`` / ``key_side``), layout and views from the
    model's site metadata."""
    check_hook(model, name)
    module = as_module(model)
    hook = module.hook_dict[name]
    prefix = name.rpartition(".")[0]
    for site in module.attention_sites():
        if site.z_hook.rpartition(".")[0] == prefix and hook.axes is not None:
            layout = _SITE_TO_TOKEN_LAYOUT.get(site.layout, "view")
            if site.layout == "view":
                views = tuple(site.key_views) if hook.key_side else (site.query_view,)
            elif site.layout == "stacked" and module.fixed_n_views is not None:
                views = tuple(site.key_views)
            else:  # global, or a model of any number of views: as many views as the run has
                views = None
            return HookInfo(name, hook.axes, layout, views, site)
    probes = [s for s in module.probe_sites(encoder_blocks=True, sublayers=True) if s.hook == name]
    if probes:
        # sites are declared for a default view count; a model of any number of views holds the run's
        views = None if probes[0].layout == "concat" or module.fixed_n_views is None \
            else tuple(sorted({s.view for s in probes}))
        return HookInfo(name, RESID_AXES, probes[0].layout, views)
    return HookInfo(name, None, "view", None, known=False)


def token_rows_and_span(info: HookInfo, act: Tensor, view: int | None, n_views: int | None) -> tuple[slice, slice, int]:
    """(batch rows, token span, tokens in span) of ``view``'s tokens in activation ``act``."""
    everything = slice(None)
    tok_axis = info.token_axis
    n_tok = act.shape[tok_axis] if tok_axis is not None else 0
    if view is None:
        return everything, everything, n_tok
    if not info.known:
        raise ValueError(f"the model's probe/attention sites do not say how {info.name} holds its views: patch it "
                         "whole (view=None)")
    if info.views is not None and view not in info.views:
        raise OutOfRangeError(f"view {view} is not held by {info.name} (valid views: {', '.join(map(str, info.views))})")
    if info.layout == "view":
        return everything, everything, n_tok
    if info.layout in ("stacked", "concat"):
        n_views = _need_n_views(n_views, info.name)
        if not 1 <= view <= n_views:
            raise OutOfRangeError(f"view {view} out of range for {info.name} in a run of {n_views} views "
                             f"(valid: 1..{n_views})")
    if info.layout == "stacked":
        if act.shape[0] % n_views:
            raise ValueError(f"{info.name}: batch axis {act.shape[0]} does not split into {n_views} views")
        b = act.shape[0] // n_views
        return slice((view - 1) * b, view * b), everything, n_tok
    if info.layout == "concat":
        if tok_axis is None or n_tok % n_views:
            raise ValueError(f"{info.name}: {n_tok} tokens do not split into {n_views} views; pass n_views=")
        P = n_tok // n_views
        return everything, slice((view - 1) * P, view * P), P
    raise ValueError(f"unknown token layout {info.layout!r} of {info.name}")
