"""Site records: where a probe reads the residual stream and what an attention pattern holds.

An adapter declares its sites (:meth:`mv_interp.adapters.base.MultiViewModel.probe_sites`,
``attention_sites``) as these frozen records; their ``kind``/``stack``/``layout`` fields are
``Literal`` types checked at construction. The functions below cut a view's tokens out of a hook
activation in any of the declared layouts. This module imports nothing from mv_interp: it is the
bottom of the model layer (``cache.py``, ``hooks.py`` and the adapters all read it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from torch import Tensor

__all__ = ["TokenLayout", "AttentionLayout", "ProbeKind", "AttentionKind", "Stack", "TOKEN_LAYOUTS",
           "ATTENTION_LAYOUTS", "PROBE_KINDS", "ATTENTION_KINDS", "STACKS", "ProbeSite", "AttentionSite",
           "view_tokens", "patch_tokens", "pattern_blocks"]


#: How a hook's activation holds a view's tokens.
#:   "view"    — ``[batch, pos, d]``, this view only
#:   "stacked" — ``[n_views · batch, pos, d]``, views stacked view-major on the batch axis
#:   "concat"  — ``[batch, n_views · pos, d]``, views concatenated on the token axis
TokenLayout = Literal["view", "stacked", "concat"]
#: How an attention pattern holds its queries and keys (see :class:`AttentionSite`).
AttentionLayout = Literal["view", "stacked", "global"]
#: What a :class:`ProbeSite` reads: the residual after a skip connection (``"self"``,
#: ``"cross"``, ``"mlp"``, ``"enc_block"``), a stack's input/output (``"dec_in"``, ``"enc_out"``),
#: or a sublayer's output before its skip (``"self_out"``, ``"cross_out"``, ``"mlp_out"``).
ProbeKind = Literal["enc_block", "enc_out", "dec_in", "self", "cross", "mlp", "self_out", "cross_out", "mlp_out"]
#: What an :class:`AttentionSite` is: attention within the query's tokens' sequence or to another's.
AttentionKind = Literal["self", "cross"]
#: Which stack a site is in.
Stack = Literal["enc", "dec"]

TOKEN_LAYOUTS: tuple[str, ...] = get_args(TokenLayout)
ATTENTION_LAYOUTS: tuple[str, ...] = get_args(AttentionLayout)
#: ``ProbeSite.kind`` values the generic tools understand.
PROBE_KINDS: tuple[str, ...] = get_args(ProbeKind)
#: ``AttentionSite.kind`` values.
ATTENTION_KINDS: tuple[str, ...] = get_args(AttentionKind)
#: ``stack`` values of both site types.
STACKS: tuple[str, ...] = get_args(Stack)


def _check_choice(record: object, field_name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(record, field_name)
    if value not in allowed:
        raise ValueError(f"{type(record).__name__} {getattr(record, 'name', '')!r}: {field_name}={value!r} is not "
                         f"one of {list(allowed)}")


@dataclass(frozen=True)
class ProbeSite:
    """One place where the residual stream (or a sublayer output) of one view can be read.

    Attributes:
        name: short unique label used in tables and files, e.g. ``"dec3.cross.v2"``.
        hook: the hook point name, e.g. ``"dec_blocks2.3.hook_resid_mid_cross"``.
        view: 1-based view whose tokens this site holds.
        layer: block index in its stack (``-1`` for a stack's input / embedding).
        kind: ``"enc_out"``, ``"dec_in"``, ``"enc_block"``, ``"self"``, ``"cross"``, ``"mlp"``
            (residual after that skip connection), or ``"self_out"``, ``"cross_out"``,
            ``"mlp_out"`` (sublayer output before its skip; the granularity ablation).
        stack: ``"enc"`` or ``"dec"``.
        order: position along the processing path of this view (for curves and 4D views).
        d_model: width of the activation.
        layout: one of :data:`TOKEN_LAYOUTS`.
        n_prefix: tokens before the patch grid in each view's tokens (camera, register or cls
            tokens); the patches follow, row-major. :func:`patch_tokens` drops them.
    """

    name: str
    hook: str
    view: int
    layer: int
    kind: ProbeKind
    stack: Stack
    order: int
    d_model: int
    layout: TokenLayout = "view"
    n_prefix: int = 0

    def __post_init__(self) -> None:
        _check_choice(self, "kind", PROBE_KINDS)
        _check_choice(self, "stack", STACKS)
        _check_choice(self, "layout", TOKEN_LAYOUTS)
        if self.view < 1:
            raise ValueError(f"ProbeSite {self.name!r}: view={self.view!r} must be a 1-based view number")
        if self.n_prefix < 0:
            raise ValueError(f"ProbeSite {self.name!r}: n_prefix={self.n_prefix} must be >= 0")

    @property
    def is_residual(self) -> bool:
        return not self.kind.endswith("_out") or self.kind == "enc_out"


@dataclass(frozen=True)
class AttentionSite:
    """One attention layer whose pattern can be read.

    Attributes:
        name: short label, e.g. ``"dec1.cross.v2"``.
        pattern_hook / scores_hook: hook names of the post- / pre-softmax attention.
        z_hook: per-head output hook ``[batch, q_pos, head, d_head]``.
        kind: ``"self"`` or ``"cross"``.
        stack: ``"enc"`` or ``"dec"``.
        layer: block index.
        query_view: 1-based view of the queries (0 when queries span all views).
        key_views: the views the keys come from, in token order (``"stacked"`` and ``"global"``
            sites: every view of the forward, in order).
        n_heads: number of heads.
        layout: ``"view"`` (``[batch, head, q, k]`` for one query view), ``"stacked"``
            (``[views·batch, head, q, k]``: views stacked view-major on the batch axis,
            self-attention within each view) or ``"global"`` (``[batch, head, Σq, Σk]``:
            queries and keys are all views' tokens concatenated view-major). Split any of
            them into view-to-view blocks with :func:`pattern_blocks`.
        n_prefix: tokens before the patch grid in each view's block of queries and keys
            (camera, register or cls tokens); the view's patches follow, row-major.
    """

    name: str
    pattern_hook: str
    scores_hook: str
    z_hook: str
    kind: AttentionKind
    stack: Stack
    layer: int
    query_view: int
    key_views: tuple[int, ...]
    n_heads: int
    layout: AttentionLayout = "view"
    n_prefix: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "key_views", tuple(self.key_views))
        _check_choice(self, "kind", ATTENTION_KINDS)
        _check_choice(self, "stack", STACKS)
        _check_choice(self, "layout", ATTENTION_LAYOUTS)
        if self.layout == "view" and self.query_view < 1:
            raise ValueError(f"AttentionSite {self.name!r}: a 'view' layout site needs query_view ≥ 1, "
                             f"got {self.query_view}")
        if self.n_prefix < 0:
            raise ValueError(f"AttentionSite {self.name!r}: n_prefix={self.n_prefix} must be >= 0")


def view_tokens(act: Tensor, site: ProbeSite, n_views: int) -> Tensor:
    """``[batch, pos, d]`` tokens of ``site.view`` from a hook activation in ``site.layout``."""
    v = site.view - 1
    if site.layout == "view":
        return act
    if site.layout == "stacked":
        return act.reshape(n_views, act.shape[0] // n_views, *act.shape[1:])[v]
    if site.layout == "concat":
        per = act.shape[1] // n_views
        return act[:, v * per : (v + 1) * per]
    raise ValueError(f"unknown token layout {site.layout!r}; expected one of {TOKEN_LAYOUTS}")


def patch_tokens(act: Tensor, site: ProbeSite, n_views: int) -> Tensor:
    """``[batch, h·w, d]`` patch tokens of ``site.view`` (:func:`view_tokens` without the view's
    ``site.n_prefix`` special tokens)."""
    tokens = view_tokens(act, site, n_views)
    return tokens[:, site.n_prefix:] if site.n_prefix else tokens


def pattern_blocks(pattern: Tensor, site: AttentionSite, n_views: int) -> dict[tuple[int, int], Tensor]:
    """Split a pattern into ``{(query_view, key_view): [batch, head, q_pos, k_pos]}`` blocks.

    Views are 1-based. Every view has the same number of tokens (views of one forward share
    their image size). For a ``"global"`` pattern over 3 views this gives the nine blocks
    ``(1, 1) … (3, 3)``; block ``(2, 1)`` is how view-2 queries attend to view-1 keys, and the
    rows of a query view's blocks sum to 1 together, not one by one.
    """
    if site.layout == "view":
        if len(site.key_views) == 1:
            return {(site.query_view, site.key_views[0]): pattern}
        per = pattern.shape[-1] // len(site.key_views)
        return {(site.query_view, kv): pattern[..., i * per : (i + 1) * per] for i, kv in enumerate(site.key_views)}
    if site.layout == "stacked":
        chunks = pattern.reshape(n_views, pattern.shape[0] // n_views, *pattern.shape[1:])
        return {(v + 1, v + 1): chunks[v] for v in range(n_views)}
    if site.layout == "global":
        per = pattern.shape[-1] // n_views
        return {
            (qv + 1, kv + 1): pattern[..., qv * per : (qv + 1) * per, kv * per : (kv + 1) * per]
            for qv in range(n_views)
            for kv in range(n_views)
        }
    raise ValueError(f"unknown attention layout {site.layout!r}")
