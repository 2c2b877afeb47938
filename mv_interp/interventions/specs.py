"""Interventions as data: frozen dataclasses that round-trip JSON and run two ways.

Every spec compiles to a list of :class:`Edit` — a hook name and a pure function from the
activation to its edited value — and both ways of running use those same functions, so the
two agree exactly:

* TransformerLens style: ``model.run_with_hooks(img1, img2, fwd_hooks=spec.fwd_hooks(model))``;
* nnsight: ``spec.apply_nnsight(model)`` inside ``with model.trace(img1, img2):`` (edits are
  issued in execution order, one assignment per hook).

Example::

    >>> ko = AttentionKnockout(layers=1, kind="self", view=2, heads=[0, 3],
    ...                        keys=Tokens.top_attended(5), mode="post")
    >>> with model.trace(img1, img2):
    ...     ko.apply_nnsight(model)
    ...     out = model.output.save()
    >>> out = model.run_with_hooks(img1, img2, fwd_hooks=ko.fwd_hooks(model))
    >>> ko.save("ko.json"); load_spec("ko.json") == ko
    True

Specs that replace an activation by another one (activation patching, mean and resample
ablation) take it at run time as ``source=``: a mapping from hook name to tensor such as the
:class:`~mv_interp.hooks.ActivationCache` of a clean run or saved :class:`MeanActivations`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Union

import torch
from torch import Tensor

from ..errors import OutOfRangeError, UnknownNameError
from ..io import atomic_write
from ..types import ModelLike, ViewInput
from .sites import (
    HookInfo,
    attention_block,
    check_heads,
    envoy,
    execution_rank,
    hook_info,
    n_views_or_none,
    resolve_attention_sites,
    token_rows_and_span,
)
from .tokens import Tokens, TokenSpec, top_attended_mask

Source = Mapping[str, Tensor]
LayerSpec = Union[int, Sequence[int], str]
HeadSpec = Union[int, Sequence[int], str]


@dataclass
class Edit:
    """One hook's edit: ``fn(activation) -> edited activation`` (pure: never edits in place)."""

    hook: str
    fn: Callable[[Tensor], Tensor]
    uses_source: bool = False
    """True when ``fn`` reads the run-time ``source`` (patching, mean / resample ablation)."""


# --------------------------------------------------------------------------------------
# Base class and registry
# --------------------------------------------------------------------------------------

_TYPES: dict[str, type[Intervention]] = {}


def register_intervention(cls: type[Intervention]) -> type[Intervention]:
    """Class decorator: make ``cls`` loadable from JSON under ``cls.type``."""
    _TYPES[cls.type] = cls
    return cls


class Intervention:
    """Base of every intervention spec (subclasses are frozen dataclasses)."""

    type: ClassVar[str] = ""

    # -- compile ------------------------------------------------------------------------------
    def edits(self, model: ModelLike, *, source: Source | None = None, n_views: int | None = None) -> list[Edit]:
        """The edits this spec makes on ``model`` (validates layers, heads and hooks)."""
        raise NotImplementedError

    def source_hooks(self, model: ModelLike) -> list[str]:
        """Hooks whose ``source`` activation this spec reads, in execution order."""
        return []

    # -- run ----------------------------------------------------------------------------------
    def fwd_hooks(self, model: ModelLike, *, source: Source | None = None,
                  n_views: int | None = None) -> list[tuple[str, Callable]]:
        """``[(hook name, fn(activation, hook))]`` for ``run_with_hooks`` / ``model.hooks``."""
        return [(e.hook, _as_hook_fn(e.fn)) for e in self.edits(model, source=source, n_views=n_views)]

    def apply_nnsight(self, model: ModelLike, *, source: Source | None = None, n_views: int | None = None,
                      barrier: Any = None) -> None:
        """Apply inside ``with model.trace(...)`` (or inside one ``tracer.invoke``).

        ``barrier`` (from ``tracer.barrier(2)``) is for a source read in another invoke of the
        same trace: call :func:`read_source_nnsight` with the same barrier in that invoke.
        """
        edits = self.edits(model, source=source, n_views=n_views)
        rank = execution_rank(model)
        groups: dict[str, list[Edit]] = {}
        for e in sorted(edits, key=lambda e: rank[e.hook]):
            groups.setdefault(e.hook, []).append(e)
        for hook, group in groups.items():
            if barrier is not None and any(e.uses_source for e in group):
                barrier()  # the source of this hook has been read in the other invoke
            point = envoy(model, hook)
            point.output = _compose([e.fn for e in group])(point.output)

    def run(self, model: ModelLike, *views: ViewInput, source: Source | None = None, n_views: int | None = None) -> Any:
        """Forward ``views`` with this intervention (TransformerLens hooks); returns the model output."""
        n_views = n_views if n_views is not None else len(views)
        with torch.no_grad():
            return model.run_with_hooks(*views, fwd_hooks=self.fwd_hooks(model, source=source, n_views=n_views))

    def run_with_cache(self, model: ModelLike, *views: ViewInput, names_filter: Any = None, source: Source | None = None,
                       n_views: int | None = None) -> tuple[Any, Any]:
        """``(output, ActivationCache)`` of ``views`` with this intervention applied (e.g. to probe
        the residual stream after a knockout)."""
        n_views = n_views if n_views is not None else len(views)
        with torch.no_grad(), model.hooks(self.fwd_hooks(model, source=source, n_views=n_views)):
            return model.run_with_cache(*views, names_filter=names_filter)

    def validate(self, model: ModelLike, n_views: int | None = None) -> None:
        """Check layers, heads, views and hook names against ``model`` (token indices are checked
        at run time, when the number of tokens is known). Raises with the valid range."""
        self.edits(model, source=_ANY_SOURCE, n_views=n_views)

    # -- composition ----------------------------------------------------------------------------
    def __add__(self, other: Intervention) -> Composite:
        if not isinstance(other, Intervention):
            return NotImplemented
        mine = self.interventions if isinstance(self, Composite) else (self,)
        theirs = other.interventions if isinstance(other, Composite) else (other,)
        return Composite(tuple(mine) + tuple(theirs))

    # -- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            out[f.name] = _to_jsonable(getattr(self, f.name))
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> Path:
        """Write the spec as JSON (atomically)."""
        text = self.to_json() + "\n"
        return atomic_write(path, lambda p: Path(p).write_text(text))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Intervention:
        return spec_from_dict(data) if cls is Intervention else _build(cls, data)

    def replace(self, **changes: Any) -> Intervention:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def spec_from_dict(data: Mapping[str, Any]) -> Intervention:
    """Build any intervention from its JSON dict (the ``"type"`` key picks the class)."""
    if not isinstance(data, Mapping):
        raise ValueError(f"an intervention spec must be a JSON object, got {type(data).__name__}")
    kind = data.get("type")
    if kind not in _TYPES:
        raise ValueError(f"unknown intervention type {kind!r}; known types: {sorted(_TYPES)}")
    return _build(_TYPES[kind], data)


def _build(cls: type, data: Mapping[str, Any]) -> Intervention:
    if data.get("type", cls.type) != cls.type:
        raise ValueError(f"{cls.__name__}.from_dict got a spec of type {data['type']!r}; use spec_from_dict")
    names = {f.name for f in dataclasses.fields(cls)}
    fields = {k: v for k, v in data.items() if k != "type"}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ValueError(f"{cls.type}: unknown field(s) {unknown}; valid fields: {sorted(names)}")
    return cls(**fields)


def spec_from_json(text: str) -> Intervention:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"intervention spec is not valid JSON: {e}") from None
    return spec_from_dict(data)


def load_spec(path: str | Path) -> Intervention:
    """Read an intervention spec from a JSON file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"spec file not found: {path}")
    try:
        return spec_from_json(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, Tokens):
        return value.to_json_value()
    if isinstance(value, Intervention):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    return value


def _as_hook_fn(fn: Callable[[Tensor], Tensor]) -> Callable:
    def hook_fn(activation: Tensor, hook: Any) -> Tensor:
        return fn(activation)

    return hook_fn


def _compose(fns: Sequence[Callable[[Tensor], Tensor]]) -> Callable[[Tensor], Tensor]:
    def composed(x: Tensor) -> Tensor:
        for fn in fns:
            x = fn(x)
        return x

    return composed


class _AnySource(dict):
    """Stand-in source for validation only: every lookup is a (never used) placeholder."""

    def __contains__(self, key: object) -> bool:
        return True


_ANY_SOURCE = _AnySource()


# --------------------------------------------------------------------------------------
# Field normalisation (specs accept friendly forms; stored canonical)
# --------------------------------------------------------------------------------------


def _norm_layers(value: LayerSpec) -> tuple[int, ...] | str:
    if value == "all":
        return "all"
    if isinstance(value, str):
        raise ValueError(f"layers must be an int, a list of ints or 'all', got {value!r}")
    items = (value,) if isinstance(value, int) else tuple(value)
    if not items:
        raise ValueError("layers is empty; give at least one layer index or 'all'")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise ValueError(f"layers must be integers, got {list(items)}")
    if any(i < 0 for i in items):
        raise ValueError(f"layers must be >= 0 (block indices), got {list(items)}")
    return items


def _norm_heads(value: HeadSpec) -> tuple[int, ...] | str:
    if value == "all":
        return "all"
    if isinstance(value, str):
        raise ValueError(f"heads must be an int, a list of ints or 'all', got {value!r}")
    items = (value,) if isinstance(value, int) else tuple(value)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise ValueError(f"heads must be integers, got {list(items)}")
    if any(i < 0 for i in items):
        raise ValueError(f"heads must be >= 0, got {list(items)}")
    if len(set(items)) != len(items):
        raise ValueError(f"heads repeat: {list(items)}")
    return items


def _norm_view(value: int | None, what: str) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{what} is 1-based (view 1 = the reference view) or None, got {value!r}")


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


# --------------------------------------------------------------------------------------
# Attention knockout
# --------------------------------------------------------------------------------------

KNOCKOUT_MODES = ("post", "pre")


@register_intervention
@dataclass(frozen=True)
class AttentionKnockout(Intervention):
    """Stop information flowing from chosen keys to chosen queries in chosen heads and layers.

    ``mode="post"`` zeroes the post-softmax probabilities (as in the paper; rows are *not*
    renormalised). ``mode="pre"`` sets the scores to −inf before the softmax, so each row
    renormalises over its remaining keys. A row whose every key is knocked out pre-softmax
    has nothing to renormalise over: it is **defined as zero** (that query receives nothing
    from that head, ``z = 0`` — the same as post-softmax knockout of every key), never NaN.

    Rules (``keys=Tokens.top_attended(k)``) read the pattern this layer computes in the same run,
    just before the knockout — the clean pattern of the same input unless an earlier intervention
    changed this layer's input (e.g. a knockout at an earlier layer). To take them from a clean
    run regardless, pass that run's patterns as ``source=`` (``rule_hooks`` lists them)::

        _, clean = model.run_with_cache(img1, img2, names_filter=ko.rule_hooks(model))
        out = ko.run(model, img1, img2, source=clean)
    """

    type: ClassVar[str] = "attention_knockout"

    layers: LayerSpec
    """Block index or indices in ``stack`` (``"all"`` for every block)."""
    kind: str = "self"
    """Attention kind as the model's ``attention_sites()`` name it (``"self"`` or ``"cross"``)."""
    stack: str = "dec"
    """``"dec"`` (decoder) or ``"enc"`` (encoder), as in ``attention_sites()``."""
    view: int | None = None
    """1-based view of the queries; ``None``: every query view of those layers."""
    key_view: int | None = None
    """1-based view of the keys (cross-attention: the other view; models whose attention spans
    all views: pick one view's keys); ``None``: every key of the site. Key indices count within it."""
    heads: HeadSpec = "all"
    """Head indices, or ``"all"``."""
    queries: TokenSpec = "all"
    """Query tokens (within ``view``): indices, a mask, ``"all"`` or ``"others"`` (every query
    that is not a knocked-out key; self-attention only)."""
    keys: TokenSpec = "all"
    """Key tokens (within ``key_view``): indices, a mask, ``"all"`` or a rule such as
    ``Tokens.top_attended(5)`` (the paper's register tokens)."""
    mode: str = "post"
    """``"post"``: zero probabilities after the softmax; ``"pre"``: −inf scores before it."""

    def __post_init__(self) -> None:
        _set(self, "layers", _norm_layers(self.layers))
        _set(self, "heads", _norm_heads(self.heads))
        _norm_view(self.view, "view")
        _norm_view(self.key_view, "key_view")
        _set(self, "queries", Tokens.parse(self.queries))
        _set(self, "keys", Tokens.parse(self.keys))
        if self.mode not in KNOCKOUT_MODES:
            raise ValueError(f"mode must be one of {KNOCKOUT_MODES} ('post': zero probabilities, 'pre': -inf "
                             f"scores), got {self.mode!r}")
        if self.queries.kind == "top_attended":
            raise ValueError("queries cannot be top_attended (a rule over keys); use indices, a mask, 'all' "
                             "or 'others'")
        if self.keys.kind == "others":
            raise ValueError("keys cannot be 'others' (that rule selects queries); use indices, a mask, 'all' "
                             "or top_attended")
        if self.queries.kind == "others" and self.kind != "self":
            raise ValueError("queries='others' needs self-attention (queries and keys are the same tokens)")

    def rule_hooks(self, model: ModelLike) -> list[str]:
        """Pattern hooks a rule-based token set reads (record them on a clean run to fix the rule there)."""
        if not (self.keys.is_rule or self.queries.is_rule):
            return []
        return [s.pattern_hook for s in resolve_attention_sites(model, self.stack, self.kind, self.layers, self.view)]

    def edits(self, model: ModelLike, *, source: Source | None = None, n_views: int | None = None) -> list[Edit]:
        out: list[Edit] = []
        for site in resolve_attention_sites(model, self.stack, self.kind, self.layers, self.view):
            heads = check_heads(self.heads, site)
            nv = n_views_or_none(model, n_views, site)
            if self.key_view is not None and (nv is not None or site.layout != "global"):
                valid = tuple(range(1, nv + 1)) if site.layout == "global" else site.key_views
                if self.key_view not in valid:
                    raise OutOfRangeError(f"key_view {self.key_view} is not a key view of {site.name} "
                                     f"(valid: {', '.join(map(str, valid))})")
            if self.queries.kind == "others" and site.layout == "global" and self.view != self.key_view:
                raise ValueError(f"queries='others' on {site.name} needs view == key_view (the same tokens)")
            make_mask = _knockout_mask_fn(self, site, heads, nv, _rule_pattern(source, site.pattern_hook))
            if self.mode == "post":
                out.append(Edit(site.pattern_hook, _post_fn(make_mask)))
            else:
                scores_fn, pattern_fn = _pre_fns(make_mask)
                out += [Edit(site.scores_hook, scores_fn), Edit(site.pattern_hook, pattern_fn)]
        return out


def _rule_pattern(source: Source | None, hook: str) -> Callable[[], Tensor] | None:
    """The clean pattern a rule reads, when ``source`` holds it (else the run's own pattern)."""
    if source is None or isinstance(source, _AnySource) or hook not in source:
        return None
    return lambda: source[hook]


def _knockout_mask_fn(spec: AttentionKnockout, site: Any, heads: list[int], n_views: int | None,
                      rule_pattern: Callable[[], Tensor] | None = None):
    """``mask(tensor, pattern_fn) -> bool [batch, head, q_pos, k_pos]``: the entries to knock out."""

    def make_mask(t: Tensor, pattern_fn: Callable[[], Tensor]) -> Tensor:
        if rule_pattern is not None:
            clean = rule_pattern().to(t.device)
            if clean.shape != t.shape:
                raise ValueError(f"the clean pattern given for {site.pattern_hook} has shape {tuple(clean.shape)}, "
                                 f"this run's {tuple(t.shape)}: record it on the same input")
            pattern_fn = lambda: clean  # noqa: E731
        blk = attention_block(site, t.shape, n_views, spec.view, spec.key_view)
        if not heads:
            return torch.zeros(t.shape, dtype=torch.bool, device=t.device)
        H = t.shape[1]
        head_mask = torch.zeros(H, dtype=torch.bool, device=t.device)
        head_mask[heads] = True
        km = spec.keys.static_mask(blk.n_k, blk.what_k)
        if km is None:  # top_attended: from the pattern this layer computes (before the knockout)
            pattern = pattern_fn()[blk.rows][:, :, blk.q, blk.k]
            sub = top_attended_mask(pattern[:, heads], spec.keys.k, spec.keys.pool_heads)
            km = torch.zeros(pattern.shape[0], H, blk.n_k, dtype=torch.bool, device=t.device)
            km[:, heads] = sub
        else:
            km = km.to(t.device)[None, None, :]
        if spec.queries.kind == "others":
            if blk.n_q != blk.n_k:
                raise ValueError(f"queries='others' needs the same query and key tokens; {blk.what_q} has "
                                 f"{blk.n_q}, {blk.what_k} has {blk.n_k}")
            qm = ~km
        else:
            qm = spec.queries.static_mask(blk.n_q, blk.what_q).to(t.device)[None, None, :]
        full = torch.zeros(t.shape, dtype=torch.bool, device=t.device)
        full[blk.rows, :, blk.q, blk.k] = head_mask[None, :, None, None] & qm[..., :, None] & km[..., None, :]
        return full

    return make_mask


def _post_fn(make_mask):
    def knock_post(pattern: Tensor) -> Tensor:
        return pattern.masked_fill(make_mask(pattern, lambda: pattern), 0.0)

    return knock_post


def _pre_fns(make_mask):
    # The pattern edit needs the rows the scores edit emptied; they meet through this dict,
    # filled by the scores hook and read by the pattern hook of the same forward.
    state: dict[str, Tensor | None] = {}

    def knock_pre(scores: Tensor) -> Tensor:
        full = make_mask(scores, lambda: scores.softmax(dim=-1))
        dead = full.all(dim=-1)  # rows with every key knocked out
        state["dead"] = dead if bool(dead.any()) else None
        return scores.masked_fill(full, float("-inf"))

    def zero_dead_rows(pattern: Tensor) -> Tensor:
        # softmax over an all -inf row is NaN; such a query receives nothing from this head.
        dead = state.pop("dead", None)
        return pattern if dead is None else pattern.masked_fill(dead[..., None], 0.0)

    return knock_pre, zero_dead_rows


# --------------------------------------------------------------------------------------
# Replacing (part of) an activation: shared by head ablation and activation patching
# --------------------------------------------------------------------------------------


def _selection(info: HookInfo, act: Tensor, view: int | None, positions: Tokens, heads: list[int] | None,
               n_views: int | None) -> Tensor:
    """Boolean mask broadcastable to ``act``: the entries to replace."""
    rows, span, n_tok = token_rows_and_span(info, act, view, n_views)
    if info.axes is None:
        if positions.kind != "all" or heads is not None:
            raise ValueError(f"{info.name} has no known token/head axes (it is not an attention or residual hook): "
                             "patch it whole (positions='all', heads='all')")
        shape = [act.shape[0]] + [1] * (act.ndim - 1)
        sel = torch.zeros(shape, dtype=torch.bool, device=act.device)
        sel[rows] = True
        return sel
    roles = info.axes.split()
    if len(roles) != act.ndim:
        raise ValueError(f"{info.name}: expected a {len(roles)}-D activation [{', '.join(roles)}], "
                         f"got shape {tuple(act.shape)}")
    keep = {"batch", "pos", "q_pos", "head"}
    shape = [n if r in keep else 1 for n, r in zip(act.shape, roles)]
    sel = torch.zeros(shape, dtype=torch.bool, device=act.device)
    idx: list[Any] = [slice(None)] * act.ndim
    idx[0] = rows
    tok = info.token_axis
    if tok is not None:
        idx[tok] = span
    m = torch.ones(sel[tuple(idx)].shape, dtype=torch.bool, device=act.device)
    if tok is not None:
        where = f"tokens of {info.name}" + (f" (view {view})" if view is not None else "")
        pos = positions.static_mask(n_tok, where).to(act.device)
        m &= pos.view([-1 if i == tok else 1 for i in range(act.ndim)])
    if heads is not None:
        h_axis = roles.index("head")
        hm = torch.zeros(act.shape[h_axis], dtype=torch.bool, device=act.device)
        hm[heads] = True
        m &= hm.view([-1 if i == h_axis else 1 for i in range(act.ndim)])
    sel[tuple(idx)] = m
    return sel


def _align_source(src: Tensor, act: Tensor, info: HookInfo, n_views: int | None, what: str) -> Tensor:
    """``src`` made broadcastable to ``act`` (same shape; batch 1; or one row per view on stacked hooks)."""
    src = src.to(device=act.device, dtype=act.dtype)
    if src.shape == act.shape:
        return src
    if src.ndim != act.ndim:
        raise ValueError(f"{what} for {info.name} has shape {tuple(src.shape)}, the activation {tuple(act.shape)}")
    if src.shape[0] not in (1, act.shape[0]):
        if info.layout == "stacked" and n_views and src.shape[0] == n_views and act.shape[0] % n_views == 0:
            src = src.repeat_interleave(act.shape[0] // n_views, dim=0)  # per-view rows → every example
        else:
            raise ValueError(f"{what} for {info.name} has batch {src.shape[0]} but the run has {act.shape[0]}: "
                             "give one of the same batch size (or batch 1 to use it for every example)")
    for i in range(1, act.ndim):
        if src.shape[i] not in (1, act.shape[i]):
            raise ValueError(f"{what} for {info.name} has shape {tuple(src.shape)}, the activation "
                             f"{tuple(act.shape)} (axis {i} differs: a different input size or number of views?)")
    return src


def _source_getter(source: Source | None, hook: str, what: str, spec_type: str) -> Callable[[], Tensor]:
    if source is None:
        raise ValueError(f"{spec_type} needs source=: {what} (a mapping from hook name to tensor, e.g. the "
                         "ActivationCache of run_with_cache)")

    def get() -> Tensor:
        try:
            return source[hook]
        except KeyError:
            raise UnknownNameError(f"source has no activation for {hook!r} ({what}); record it with "
                           f"run_with_cache(..., names_filter=[{hook!r}, ...])") from None

    return get


def _replace_fn(info: HookInfo, view: int | None, positions: Tokens, heads: list[int] | None, n_views: int | None,
                replacement: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    def replace(act: Tensor) -> Tensor:
        sel = _selection(info, act, view, positions, heads, n_views)
        return torch.where(sel, replacement(act), act)

    return replace


# --------------------------------------------------------------------------------------
# Head ablation
# --------------------------------------------------------------------------------------

ABLATION_MODES = ("zero", "mean", "resample")


@register_intervention
@dataclass(frozen=True)
class HeadAblation(Intervention):
    """Replace the output of chosen heads (their slice of ``hook_z``, before the out-projection).

    * ``zero``: ``z = 0`` (the block then adds only the projection bias for those heads);
    * ``mean``: the mean ``z`` over a dataset (:func:`compute_means`), per position or per head,
      read from ``means`` (a file) or from ``source=`` at run time;
    * ``resample``: ``z`` of another input — ``source=`` at run time, e.g. the
      :class:`~mv_interp.hooks.ActivationCache` of ``run_with_cache(other1, other2)``.
    """

    type: ClassVar[str] = "head_ablation"

    layers: LayerSpec
    """Block index or indices in ``stack`` (``"all"`` for every block)."""
    kind: str = "self"
    """Attention kind as in ``attention_sites()`` (``"self"`` or ``"cross"``)."""
    stack: str = "dec"
    """``"dec"`` or ``"enc"``."""
    view: int | None = None
    """1-based query view; ``None``: every query view of those layers."""
    heads: HeadSpec = "all"
    """Head indices, or ``"all"``."""
    positions: TokenSpec = "all"
    """Query positions (within ``view``) whose head output is ablated: indices, a mask or ``"all"``."""
    mode: str = "zero"
    """``"zero"``, ``"mean"`` or ``"resample"``."""
    means: str | None = None
    """``mode="mean"``: path of a :class:`MeanActivations` file (``None``: pass ``source=`` at run time)."""

    def __post_init__(self) -> None:
        _set(self, "layers", _norm_layers(self.layers))
        _set(self, "heads", _norm_heads(self.heads))
        _norm_view(self.view, "view")
        _set(self, "positions", Tokens.parse(self.positions))
        if self.positions.is_rule:
            raise ValueError(f"positions must be indices, a mask or 'all', got the rule {self.positions.kind!r}")
        if self.mode not in ABLATION_MODES:
            raise ValueError(f"mode must be one of {ABLATION_MODES}, got {self.mode!r}")
        if self.means is not None and self.mode != "mean":
            raise ValueError(f"means= is only used with mode='mean' (mode is {self.mode!r})")

    def _sites(self, model: ModelLike):
        return resolve_attention_sites(model, self.stack, self.kind, self.layers, self.view)

    def source_hooks(self, model: ModelLike) -> list[str]:
        if self.mode == "zero" or (self.mode == "mean" and self.means is not None):
            return []
        rank = execution_rank(model)
        return sorted({s.z_hook for s in self._sites(model)}, key=rank.__getitem__)

    def edits(self, model: ModelLike, *, source: Source | None = None, n_views: int | None = None) -> list[Edit]:
        if self.mode == "mean" and self.means is not None and source is not _ANY_SOURCE:
            from .means import MeanActivations

            source = MeanActivations.load(self.means)
        out = []
        for site in self._sites(model):
            heads = check_heads(self.heads, site)
            nv = n_views_or_none(model, n_views, site)
            info = hook_info(model, site.z_hook)
            if self.mode == "zero":
                replacement: Callable[[Tensor], Tensor] = lambda act: act.new_zeros(())  # noqa: E731
            else:
                what = "the mean activations" if self.mode == "mean" else "the other input's activations"
                get = _source_getter(source, site.z_hook, what, f"head_ablation(mode={self.mode!r})")
                replacement = _bound_source(get, info, nv, what)
            out.append(Edit(site.z_hook, _replace_fn(info, self.view, self.positions, heads, nv, replacement),
                            uses_source=self.mode != "zero" and self.means is None))
        return out


def _bound_source(get: Callable[[], Tensor], info: HookInfo, n_views: int | None,
                  what: str) -> Callable[[Tensor], Tensor]:
    def replacement(act: Tensor) -> Tensor:
        return _align_source(get(), act, info, n_views, what)

    return replacement


# --------------------------------------------------------------------------------------
# Activation patching
# --------------------------------------------------------------------------------------


@register_intervention
@dataclass(frozen=True)
class ActivationPatch(Intervention):
    """Copy (part of) one hook's activation from a source run (the clean run) into this run.

    Whole hook, some token positions, some heads (hooks with a head axis: q/k/v, scores,
    pattern, z), or both. On patterns and scores the positions are query rows. The source is
    given at run time (``source=``, e.g. a clean :class:`~mv_interp.hooks.ActivationCache`, or
    values read in another invoke of the same nnsight trace — see :func:`read_source_nnsight`).
    """

    type: ClassVar[str] = "activation_patch"

    hook: str
    """Full hook name, e.g. ``"dec_blocks2.1.hook_resid_mid"`` (``model.hook_names()`` lists them)."""
    positions: TokenSpec = "all"
    """Token positions (within ``view`` when given): indices, a mask or ``"all"``."""
    heads: HeadSpec = "all"
    """Heads to patch on hooks with a head axis, or ``"all"``."""
    view: int | None = None
    """1-based view whose tokens to patch when the hook holds several views (views stacked on the
    batch axis or concatenated on the token axis); ``None``: every token of the hook."""

    def __post_init__(self) -> None:
        if not isinstance(self.hook, str) or not self.hook:
            raise ValueError(f"hook must be a hook name such as 'dec_blocks2.1.hook_resid_mid', got {self.hook!r}")
        _set(self, "heads", _norm_heads(self.heads))
        _norm_view(self.view, "view")
        _set(self, "positions", Tokens.parse(self.positions))
        if self.positions.is_rule:
            raise ValueError(f"positions must be indices, a mask or 'all', got the rule {self.positions.kind!r}")

    def source_hooks(self, model: ModelLike) -> list[str]:
        return [self.hook]

    def edits(self, model: ModelLike, *, source: Source | None = None, n_views: int | None = None) -> list[Edit]:
        info = hook_info(model, self.hook)
        heads = None
        if self.heads != "all":
            if not info.has_heads:
                raise ValueError(f"{self.hook} has no head axis; heads= applies to attention hooks "
                                 "(q, k, v, rot_q, rot_k, attn_scores, pattern, z)")
            heads = check_heads(self.heads, info.site)
        nv = n_views_or_none(model, n_views, info.site)
        get = _source_getter(source, self.hook, "the clean run's activations", "activation_patch")
        replacement = _bound_source(get, info, nv, "the source activation")
        return [Edit(self.hook, _replace_fn(info, self.view, self.positions, heads, nv, replacement), uses_source=True)]


# --------------------------------------------------------------------------------------
# Composite
# --------------------------------------------------------------------------------------


@register_intervention
@dataclass(frozen=True)
class Composite(Intervention):
    """Several interventions applied together (in list order on a shared hook)."""

    type: ClassVar[str] = "composite"

    interventions: Sequence[Union[Intervention, Mapping]] = field(default_factory=tuple)
    """The parts: specs or their JSON dicts."""

    def __post_init__(self) -> None:
        parts = tuple(p if isinstance(p, Intervention) else spec_from_dict(p) for p in self.interventions)
        _set(self, "interventions", parts)

    def source_hooks(self, model: ModelLike) -> list[str]:
        rank = execution_rank(model)
        return sorted({h for p in self.interventions for h in p.source_hooks(model)}, key=rank.__getitem__)

    def edits(self, model: ModelLike, *, source: Source | None = None, n_views: int | None = None) -> list[Edit]:
        return [e for p in self.interventions for e in p.edits(model, source=source, n_views=n_views)]


# --------------------------------------------------------------------------------------
# Sources read inside an nnsight trace
# --------------------------------------------------------------------------------------


def read_source_nnsight(model: ModelLike, hooks: Sequence[str], barrier: Any = None,
                        into: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Read ``hooks`` (in execution order) inside a trace — the clean invoke of a patching run.

    With ``barrier``, each read is followed by ``barrier()`` to hand the value to the other
    invoke, whose ``spec.apply_nnsight(model, source=..., barrier=barrier)`` waits for it. The
    invokes share the values through ``into``, a dict made before both (the corrupted invoke
    starts before the clean one has read anything)::

        with model.trace() as tracer:
            barrier, clean = tracer.barrier(2), {}
            with tracer.invoke(clean1, clean2):
                read_source_nnsight(model, spec.source_hooks(model), barrier, into=clean)
            with tracer.invoke(corrupt1, corrupt2):
                spec.apply_nnsight(model, source=clean, barrier=barrier)
                out = model.output.save()
    """
    rank = execution_rank(model)
    src: dict[str, Tensor] = {} if into is None else into
    for hook in sorted(dict.fromkeys(hooks), key=rank.__getitem__):
        # clone: the other invoke may edit the shared batch tensor in place
        src[hook] = envoy(model, hook).output.clone()
        if barrier is not None:
            barrier()
    return src
