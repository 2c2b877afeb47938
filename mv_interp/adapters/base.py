"""What every adapted model family declares, and the registry that finds them.

An *adapter* is one file that registers an :class:`Adapter`: the config dataclass,
the hooked module (a :class:`MultiViewModel`), a pure checkpoint-conversion function,
and how to recognise the family's checkpoints. The hooked module itself declares its
probe sites, attention sites and how its outputs map to per-view pointmaps, so the
generic tools (probes, head scores, interventions, viewers) never name a family.

Third-party packages register adapters through the ``mv_interp.adapters`` entry-point
group; the entry point names a module that calls :func:`register_adapter` on import.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import ConfigError, UnknownNameError, UserError, suggest
from ..hooks import HookedRootModule

# --------------------------------------------------------------------------------------
# Sites
# --------------------------------------------------------------------------------------

#: How a hook's activation holds a view's tokens.
#:   "view"    — ``[batch, pos, d]``, this view only
#:   "stacked" — ``[n_views · batch, pos, d]``, views stacked view-major on the batch axis
#:   "concat"  — ``[batch, n_views · pos, d]``, views concatenated on the token axis
TOKEN_LAYOUTS = ("view", "stacked", "concat")
#: How an attention pattern holds its queries and keys (see :class:`AttentionSite`).
ATTENTION_LAYOUTS = ("view", "stacked", "global")
#: ``ProbeSite.kind`` values the generic tools understand.
PROBE_KINDS = ("enc_block", "enc_out", "dec_in", "self", "cross", "mlp", "self_out", "cross_out", "mlp_out")
#: ``AttentionSite.kind`` values.
ATTENTION_KINDS = ("self", "cross")
#: ``stack`` values of both site types.
STACKS = ("enc", "dec")


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
    kind: str
    stack: str
    order: int
    d_model: int
    layout: str = "view"
    n_prefix: int = 0

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
    kind: str
    stack: str
    layer: int
    query_view: int
    key_views: tuple[int, ...]
    n_heads: int
    layout: str = "view"
    n_prefix: int = 0


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


# --------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _from_jsonable(value: Any) -> Any:
    if value in ("inf", "Infinity"):
        return math.inf
    if value in ("-inf", "-Infinity"):
        return -math.inf
    if isinstance(value, list):
        return tuple(_from_jsonable(v) for v in value)
    return value


_POSITIVE_SUFFIXES = ("_dim", "_depth", "_heads", "patch_size", "_ids", "_ratio", "_eps")
_ROPE = re.compile(r"RoPE(\d+(\.\d*)?)?")
_POINT_MODES, _CONF_MODES = ("exp", "square", "linear"), ("exp", "sigmoid")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class ConfigMixin:
    """JSON round-trip for frozen config dataclasses (``inf`` written as ``"inf"``), and
    :meth:`check_fields`, the type and range check every family's ``__post_init__`` runs first."""

    #: model configs: :meth:`from_dict` checks field types and ranges before building the dataclass
    checks_field_types: ClassVar[bool] = False

    def check_fields(self) -> None:
        """Raise :class:`~mv_interp.errors.ConfigError` naming the field, the value and what it must be
        (see :meth:`check_values`)."""
        self.check_values({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})  # type: ignore[arg-type]

    @classmethod
    def check_values(cls, values: Mapping[str, Any]) -> None:
        """Check field values before the dataclass is built (so runtime type checkers never see them first).

        Types come from the field annotations (``int``, ``float``, ``str``, ``bool``, ``tuple``,
        ``tuple[int, int]``, optionally ``| None``); widths, depths, head counts, patch sizes, ratios
        and epsilons must be positive; ``pos_embed`` must be ``"RoPE<base>"``; ``depth_mode`` /
        ``conf_mode`` ``(mode, vmin, vmax)`` with a known mode.
        """
        name = cls.__name__
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name not in values:
                continue
            v, ann = values[f.name], str(f.type).replace(" ", "")
            optional = ann.endswith("|None") or ann.startswith("None|")
            base = ann.replace("|None", "").replace("None|", "")
            if v is None and optional:
                continue

            def bad(what: str) -> ConfigError:
                return ConfigError(f"{name}.{f.name} must be {what}, got {v!r} ({type(v).__name__}); "
                                   "fix it in config.json / the config you pass")

            positive = f.name.endswith(_POSITIVE_SUFFIXES)
            if base == "int":
                if not _is_int(v) or (positive and v < 1):
                    raise bad("a positive integer" if positive else "an integer")
            elif base == "float":
                if not _is_number(v) or not math.isfinite(v) or (positive and v <= 0):
                    raise bad("a positive number" if positive else "a finite number")
            elif base == "str":
                if not isinstance(v, str):
                    raise bad("a string")
            elif base == "bool":
                if not isinstance(v, bool):
                    raise bad("true or false")
            elif base == "tuple[int,int]":
                pair = (v, v) if _is_int(v) else v
                if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(_is_int(x) and x > 0 for x in pair)):
                    raise bad("a positive integer or a pair (H, W) of them")
            elif base.startswith("tuple"):
                if not isinstance(v, (tuple, list)):
                    raise bad("a list / tuple")
        pos = values.get("pos_embed")
        if isinstance(pos, str) and not _ROPE.fullmatch(pos):
            raise ConfigError(f"{name}.pos_embed={pos!r} is not supported: mv_interp implements RoPE2D, written "
                              "'RoPE<base>' (e.g. 'RoPE100', which every released checkpoint uses)")
        for key, modes in (("depth_mode", _POINT_MODES), ("conf_mode", _CONF_MODES), ("desc_conf_mode", _CONF_MODES)):
            mode = values.get(key)
            if mode is None:
                continue
            if not (isinstance(mode, (tuple, list)) and len(mode) == 3 and mode[0] in modes
                    and all(_is_number(x) for x in mode[1:]) and mode[1] <= mode[2]):
                raise ConfigError(f"{name}.{key}={mode!r} must be (mode, vmin, vmax) with mode one of {list(modes)} "
                                  "and numbers vmin <= vmax (e.g. ('exp', 1, inf))")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            hints = "".join(suggest(u, names) for u in unknown)
            raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; valid fields: {sorted(names)}.{hints}")
        values = {k: _from_jsonable(v) for k, v in data.items()}
        from ..configs import check_fields  # typed validation of user-written configs: field, type, value

        if cls.checks_field_types:  # the family's own checks first: they also name the valid range
            cls.check_values(values)
        return cls(**check_fields(cls, values, given=data))

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


# --------------------------------------------------------------------------------------
# The hooked multi-view model interface
# --------------------------------------------------------------------------------------


class MultiViewModel(HookedRootModule):
    """Base class of every hooked multi-view model.

    ``forward(*views)`` takes images ``[batch, 3, H, W]`` normalised to [-1, 1] and returns
    a tuple with one dict per view holding at least ``"pts3d"`` ``[batch, H, W, 3]`` (in
    view 1's frame) and ``"conf"`` ``[batch, H, W]``.
    """

    family: ClassVar[str] = ""
    config: Any
    #: number of views the forward takes; ``None`` when any number ≥ 2 works
    fixed_n_views: ClassVar[int | None] = 2
    #: glob patterns of hooks whose edits cannot reach the output (the conformity suite
    #: skips them in its data-path check); leave empty unless truly unavoidable
    read_only_hooks: ClassVar[tuple[str, ...]] = ()
    #: glob patterns of hooks on tokens without a patch grid (VGGT's camera trunk: one token per
    #: view), which are no probe or attention site; the conformity suite's site checks skip them
    off_grid_hooks: ClassVar[tuple[str, ...]] = ()
    #: validate the positional views of every forward (:func:`mv_interp.images.check_views`):
    #: float ``[batch, 3, H, W]``, finite, on the model's device, the right number of them
    check_inputs: ClassVar[bool] = True

    def setup(self) -> None:
        super().setup()
        if not any(h is check_forward_inputs for h in self._forward_pre_hooks.values()):
            self.register_forward_pre_hook(check_forward_inputs)

    def default_n_views(self, n_views: int | None = None) -> int:
        """``n_views`` checked against :attr:`fixed_n_views` (default: the fixed number, else 2)."""
        if n_views is None:
            return self.fixed_n_views or 2
        if self.fixed_n_views is not None and n_views != self.fixed_n_views:
            raise ValueError(f"{type(self).__name__} takes exactly {self.fixed_n_views} views, got n_views={n_views}")
        if n_views < 2:
            raise ValueError(f"n_views must be at least 2, got {n_views}")
        return n_views

    def probe_sites(self, encoder_blocks: bool = False, sublayers: bool = False,
                    n_views: int | None = None) -> list[ProbeSite]:
        """Every place the residual stream of one view can be probed, for a forward on
        ``n_views`` views (default :meth:`default_n_views`)."""
        raise NotImplementedError

    def attention_sites(self, n_views: int | None = None) -> list[AttentionSite]:
        """Every attention layer whose pattern can be read, for a forward on ``n_views`` views."""
        raise NotImplementedError

    def act_name(self, name: str, layer: int | None = None, view: int | None = None, stack: str | None = None) -> str:
        raise NotImplementedError

    def view_outputs(self, output: Any) -> list[dict[str, Tensor]]:
        """Per-view dicts with ``pts3d`` (view 1's frame) and ``conf``."""
        return list(output)

    def pointmap_lens(self, site: ProbeSite, tokens: Tensor, grid: tuple[int, int]) -> dict[str, Tensor]:
        """Decode ``tokens`` [batch, pos, d] read at ``site`` with the model's own final norm
        and head (the 3D logit lens); returns ``{"pts3d", "conf"}``."""
        raise NotImplementedError

    def resid_norm(self, view: int, layer: int | None = None, kind: str | None = None) -> torch.nn.Module:
        """The norm that reads ``view``'s decoder residual stream before sublayer ``kind`` (a probe
        site kind: ``"self"``, ``"cross"``, ``"mlp"``) of block ``layer``; ``layer=None``: the final
        norm in front of the heads. Used by the cache algebra (``apply_ln_to_stack``)."""
        raise NotImplementedError(f"{type(self).__name__} does not declare resid_norm(view, layer, kind)")

    def head_input_hook(self, view: int) -> str:
        """The hook holding the heads' input for ``view``: the final norm's output, in the token
        layout of the view's decoder probe sites (direct pointmap attribution edits it)."""
        raise NotImplementedError(f"{type(self).__name__} does not declare head_input_hook(view)")

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def example_inputs(self, batch: int = 1, size: tuple[int, int] | None = None, n_views: int = 2,
                       seed: int = 0) -> tuple[Tensor, ...]:
        """Random images in [-1, 1] of the model's input size (or ``size``)."""
        H, W = size or tuple(self.config.img_size)
        g = torch.Generator().manual_seed(seed)
        views = self.fixed_n_views or n_views
        return tuple(torch.rand(batch, 3, H, W, generator=g).mul(2).sub(1).to(self.device) for _ in range(views))

    def hook_table(self, batch: int = 1, size: tuple[int, int] | None = None,
                   n_views: int | None = None) -> list[tuple[str, tuple[int, ...]]]:
        """``[(hook name, shape)]`` in execution order for ``n_views`` inputs of ``size`` (default: one patch)."""
        p = self.patch_size
        views = self.example_inputs(batch, size or (p, p), n_views=self.default_n_views(n_views))
        return self.record_hook_order(*views)

    def hook_names(self) -> list[str]:
        """Every hook name in execution order (what nnsight reads must follow)."""
        if getattr(self, "_hook_order", None) is None:
            self._hook_order = [n for n, _ in self.hook_table()]
        return list(self._hook_order)


def check_forward_inputs(module: MultiViewModel, args: tuple) -> None:
    """The input check every :class:`MultiViewModel` runs before its forward (a forward pre-hook;
    the compiled fast path, which calls the forward directly, runs it itself)."""
    # a pre-hook rather than code in each family's forward: one check for every adapter
    if not module.check_inputs:
        return
    from ..images import check_views

    n, name = module.fixed_n_views, type(module).__name__
    if n is not None and len(args) != n:
        raise UserError(f"{name} takes {n} views (images [batch, 3, H, W]), got {len(args)} positional argument(s)")
    if n is None and len(args) < 2:
        raise UserError(f"{name} takes at least 2 views (images [batch, 3, H, W]), got {len(args)}")
    param = next(module.parameters(), None)
    check_views(args, device=param.device if param is not None else None, patch=module.patch_size)


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Adapter:
    """Everything mv_interp needs to know about one model family.

    The hooked module (``model_cls``) declares the rest itself: probe sites, attention
    sites, how its outputs map to per-view pointmaps (``view_outputs``) and the 3D lens.

    Attributes:
        name: registry name (``"dust3r"``); also ``model_cls.family``.
        config_cls: frozen config dataclass with ``from_dict``/``to_dict`` (:class:`ConfigMixin`).
        model_cls: the hooked :class:`MultiViewModel` subclass, built as ``model_cls(config)``.
        convert_state_dict: pure function ``(state_dict, config) -> state_dict`` mapping an
            official checkpoint's keys onto ``model_cls``'s (aliases, missing copies).
        constructor_names: class names that appear in official ``args.model`` strings.
        config_from_constructor: ``(kwargs) -> config`` for those strings' keyword arguments
            (also used for HF-style ``config.json`` dicts; defaults to ``config_cls.from_dict``).
        matches_hf_config: predicate on an HF-style ``config.json`` dict, to recognise the
            family of a directory that does not name it.
        named_configs: official configs known by name (``"224_linear"`` …).
    """

    name: str
    config_cls: type
    model_cls: type
    convert_state_dict: Callable[[dict[str, Tensor], Any], dict[str, Tensor]]
    constructor_names: tuple[str, ...] = ()
    config_from_constructor: Callable[[dict[str, Any]], Any] | None = None
    matches_hf_config: Callable[[dict[str, Any]], bool] | None = None
    named_configs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"adapter name must be an identifier-like string such as 'dust3r', got {self.name!r}")
        if not (isinstance(self.model_cls, type) and issubclass(self.model_cls, MultiViewModel)):
            raise TypeError(f"adapter {self.name!r}: model_cls must subclass mv_interp.adapters.MultiViewModel, "
                            f"got {self.model_cls!r}")
        if not dataclasses.is_dataclass(self.config_cls):
            raise TypeError(f"adapter {self.name!r}: config_cls must be a (frozen) dataclass, got {self.config_cls!r}")
        if not callable(self.convert_state_dict):
            raise TypeError(f"adapter {self.name!r}: convert_state_dict must be a function "
                            "(state_dict, config) -> state_dict")
        family = getattr(self.model_cls, "family", "")
        if family and family != self.name:
            raise ValueError(f"adapter {self.name!r}: {self.model_cls.__name__}.family is {family!r}; "
                             "give the model class family = the adapter name")
        for key, cfg in self.named_configs.items():
            if type(cfg) is not self.config_cls:
                raise TypeError(f"adapter {self.name!r}: named config {key!r} is a {type(cfg).__name__}, "
                                f"not a {self.config_cls.__name__}")

    def build(self, config: Any) -> MultiViewModel:
        return self.model_cls(config)

    def config_from_kwargs(self, kwargs: Mapping[str, Any]) -> Any:
        """A config from constructor keyword arguments or a ``config.json`` dict."""
        if self.config_from_constructor is not None:
            return self.config_from_constructor(dict(kwargs))
        return self.config_cls.from_dict(kwargs)


_REGISTRY: dict[str, Adapter] = {}
_ENTRY_POINTS_LOADED = False
ENTRY_POINT_GROUP = "mv_interp.adapters"


def register_adapter(adapter: Adapter) -> Adapter:
    """Register (or replace) an adapter under ``adapter.name``; returns it.

    Call it at import time of the module that defines the family (one file per family).
    Third-party packages make that module importable through the ``mv_interp.adapters``
    entry-point group (``pyproject.toml``)::

        [project.entry-points."mv_interp.adapters"]
        mymodel = "mypackage.mymodel_adapter"
    """
    if not isinstance(adapter, Adapter):
        raise TypeError(f"register_adapter takes an Adapter, got {type(adapter).__name__}")
    _REGISTRY[adapter.name] = adapter
    return adapter


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001 - a broken plug-in must not take the built-in families down
            warnings.warn(
                f"mv_interp: could not load adapter entry point {ep.name!r} ({ep.value}): {type(e).__name__}: {e}",
                RuntimeWarning,
                stacklevel=2,
            )


def get_adapter(name: str) -> Adapter:
    """The adapter registered as ``name`` (built-ins, then ``mv_interp.adapters`` entry points)."""
    _load_entry_points()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError(
            f"no adapter (model family) named {name!r}; registered: {sorted(_REGISTRY)}.{suggest(name, _REGISTRY)} "
            "A third-party family registers "
            f"itself with register_adapter() in a module named by an {ENTRY_POINT_GROUP!r} entry point"
        ) from None


def list_adapters() -> list[str]:
    _load_entry_points()
    return sorted(_REGISTRY)


def adapters() -> Sequence[Adapter]:
    _load_entry_points()
    return list(_REGISTRY.values())


def adapter_for_model(model: Any) -> Adapter:
    """The adapter whose ``model_cls`` built ``model`` (a :class:`MultiViewModel` or an ``MVModel``
    wrapping one; exact class first, then subclasses)."""
    model = getattr(model, "_module", model)
    for a in adapters():
        if type(model) is a.model_cls:
            return a
    for a in adapters():
        if isinstance(model, a.model_cls):
            return a
    raise UnknownNameError(f"no registered adapter builds {type(model).__name__}; register one with register_adapter()")
