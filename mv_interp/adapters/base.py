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
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import ConfigError, OutOfRangeError, UnknownNameError, UserError, suggest
from ..hooks import HookedRootModule
from ..io import config_value, dumps_json, jsonable
from ..layers import ATTENTION_HOOKS
from ..sites import (  # noqa: F401 - the site records are part of the adapter contract, re-exported here
    ATTENTION_KINDS, ATTENTION_LAYOUTS, PROBE_KINDS, STACKS, TOKEN_LAYOUTS, AttentionKind, AttentionLayout,
    AttentionSite, ProbeKind, ProbeSite, Stack, TokenLayout, pattern_blocks, patch_tokens, view_tokens)
from ..types import ModelLike, as_module

# --------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------


_POSITIVE_SUFFIXES = ("_dim", "_depth", "_heads", "patch_size", "_ids", "_ratio", "_eps")
_ROPE = re.compile(r"RoPE(\d+(\.\d*)?)?")
_POINT_MODES, _CONF_MODES = ("exp", "square", "linear"), ("exp", "sigmoid")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class ConfigMixin:
    """JSON round-trip for frozen config dataclasses (``inf`` written as ``"inf"``, the
    :mod:`mv_interp.io` policy), and :meth:`check_fields`, the type and range check of config fields.
    Used by model configs (through :class:`ModelConfig`, which runs the check first in
    ``__post_init__`` when :attr:`checks_field_types` is set) and by run configs (training, report)."""

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
        return {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def to_json(self) -> str:
        return dumps_json(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            hints = "".join(suggest(u, names) for u in unknown)
            raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; valid fields: {sorted(names)}.{hints}")
        values = {k: config_value(v) for k, v in data.items()}
        from ..configs import check_fields  # typed validation of user-written configs: field, type, value

        if cls.checks_field_types:  # the family's own checks first: they also name the valid range
            cls.check_values(values)
        return cls(**check_fields(cls, values, given=data))

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def pair(v: int | Sequence[int]) -> tuple[int, int]:
    """``(H, W)`` from an int (square) or a pair."""
    if isinstance(v, int):
        return (v, v)
    return (int(v[0]), int(v[1]))


#: Post-processing of a predicted point norm / confidence: ``(mode, vmin, vmax)``, e.g.
#: ``("exp", -inf, inf)`` (see :func:`mv_interp.layers.postprocess_points`).
OutputMode = tuple


@dataclass(frozen=True)
class ModelConfig(ConfigMixin):
    """What every model config declares; the base of each family's frozen config dataclass.

    Generic code (probes, head scores, images, the report) reads these fields and nothing else
    of a config: a family adds its own architecture fields in a subclass (all with defaults,
    one docstring each, validation in ``__post_init__`` calling ``super().__post_init__()``).
    With ``checks_field_types = True`` (a class attribute) :meth:`ConfigMixin.check_fields` runs
    first here and :meth:`ConfigMixin.from_dict` checks values before building the config::

        @dataclass(frozen=True)
        class MyConfig(ModelConfig):
            img_size: tuple[int, int] = (518, 518)   # re-declare to change a default
            patch_size: int = 14
            depth: int = 24
            \"\"\"Number of blocks.\"\"\"

    The view count is declared by the model class (:attr:`MultiViewModel.fixed_n_views`): one
    config can describe a network that runs on any number of views.
    """

    img_size: tuple[int, int] = (224, 224)
    """(H, W) the model was trained at; the default input size. Any multiple of ``patch_size`` runs."""
    patch_size: int = 16
    """Side of the square image patches (one token each)."""
    depth_mode: OutputMode = ("exp", -math.inf, math.inf)
    """How the head's raw point channels become points: ``(mode, vmin, vmax)`` on the point norm
    (probes decode with the same post-processing as the model)."""
    conf_mode: OutputMode = ("exp", 1, math.inf)
    """How the raw confidence channel becomes a confidence: ``(mode, vmin, vmax)``."""

    def __post_init__(self) -> None:
        if type(self).checks_field_types:
            self.check_fields()  # types and ranges first, so the checks below see well-typed values
        object.__setattr__(self, "img_size", pair(self.img_size))
        object.__setattr__(self, "depth_mode", tuple(self.depth_mode))
        object.__setattr__(self, "conf_mode", tuple(self.conf_mode))
        if not isinstance(self.patch_size, int) or self.patch_size < 1:
            raise ValueError(f"patch_size must be a positive int, got {self.patch_size!r}")
        if any(s % self.patch_size for s in self.img_size):
            raise ValueError(f"img_size={self.img_size} must be a multiple of patch_size={self.patch_size}")


# Deprecated private spellings, kept for code written against earlier versions.
_jsonable = jsonable
_from_jsonable = config_value


# --------------------------------------------------------------------------------------
# The hooked multi-view model interface
# --------------------------------------------------------------------------------------


class MultiViewModel(HookedRootModule):
    """Base class of every hooked multi-view model: the contract generic tools rely on.

    A family subclasses this, builds its layers with a :class:`~mv_interp.hooks.HookPoint` on
    every internal state, calls ``self.setup()`` at the end of ``__init__``, and declares:

    ===========================  =================================================================
    ``family``                   the adapter name it is registered under (``"dust3r"``)
    ``config``                   a frozen :class:`ModelConfig` subclass instance
    ``fixed_n_views``            views the forward takes (``2`` for pair models; ``None``: any ≥ 2)
    ``forward(*views, **kw)``    images ``[batch, 3, H, W]`` in [-1, 1] → one output per view
    ``view_outputs(output)``     the forward's output as per-view dicts with ``pts3d``
                                 ``[batch, H, W, 3]`` (in view 1's frame) and ``conf`` ``[batch, H, W]``
    ``act_name(name, …)``        short → full hook names, TransformerLens style
    ``probe_sites(…)``           every place one view's residual stream can be probed
    ``attention_sites(…)``       every attention layer whose pattern can be read
    ``pointmap_lens(…)``         the model's own final norm + head applied to a probed state
    ``lens_reads_encoder``       whether that lens needs this view's encoder output too (DPT heads)
    ``read_only_hooks``          hooks whose edits cannot reach the output (rare; say why)
    ===========================  =================================================================

    Everything else (``hook_names``, ``hook_table``, ``example_inputs``, ``patch_size``,
    ``device``, ``run_with_cache``/``run_with_hooks`` from :class:`HookedRootModule`) comes from
    this class. :func:`mv_interp.testing.check_adapter` runs the whole contract on a model.
    """

    family: ClassVar[str] = ""
    config: ModelConfig
    #: number of views the forward takes; ``None`` when any number ≥ 2 works
    fixed_n_views: ClassVar[int | None] = 2
    #: glob patterns of hooks whose edits cannot reach the output (the conformity suite
    #: skips them in its data-path check); leave empty unless truly unavoidable
    read_only_hooks: ClassVar[tuple[str, ...]] = ()
    #: whether :meth:`pointmap_lens` reads ``enc_tokens`` (a head that takes the encoder output
    #: beside the decoder's, e.g. DPT): generic code then also reads each view's ``"enc_out"``
    #: probe site and passes its tokens
    lens_reads_encoder: ClassVar[bool] = False

    #: glob patterns of hooks on tokens without a patch grid (VGGT's camera trunk: one token per
    #: view), which are no probe or attention site; the conformity suite's site checks skip them
    off_grid_hooks: ClassVar[tuple[str, ...]] = ()
    #: validate the positional views of every forward (:func:`mv_interp.images.check_views`):
    #: float ``[batch, 3, H, W]``, finite, on the model's device, the right number of them
    check_inputs: ClassVar[bool] = True

    def setup(self) -> None:
        """Name every hook point; call at the end of ``__init__``. Checks ``config`` is a
        :class:`ModelConfig` (image size, patch size, output modes are what generic code reads)
        and registers the forward's input check (:attr:`check_inputs`)."""
        if not isinstance(getattr(self, "config", None), ModelConfig):
            raise TypeError(f"{type(self).__name__}.config must be a ModelConfig subclass instance (a frozen "
                            f"dataclass deriving from mv_interp.adapters.base.ModelConfig), got "
                            f"{type(getattr(self, 'config', None)).__name__}; set self.config before setup()")
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
        ``n_views`` views (default :meth:`default_n_views`; check it with that method).

        ``encoder_blocks`` adds every encoder block's output; ``sublayers`` adds each sublayer's
        output before its skip connection. Each view's sites carry increasing ``order`` along
        that view's processing path."""
        raise NotImplementedError

    def attention_sites(self, n_views: int | None = None) -> list[AttentionSite]:
        """Every attention layer whose pattern can be read, for a forward on ``n_views`` views
        (default :meth:`default_n_views`)."""
        raise NotImplementedError

    def act_name(self, name: str, layer: int | None = None, view: int | None = None, stack: str | None = None) -> str:
        """The full hook name of a short one, TransformerLens style: ``act_name("resid_post", 3,
        view=2)`` → ``"dec_blocks2.3.hook_resid_post"``. Unknown names are a ``ValueError``
        listing the valid ones; an out-of-range ``layer`` an ``IndexError``."""
        raise NotImplementedError

    def view_outputs(self, output: Any) -> list[dict[str, Tensor]]:
        """Per-view dicts with ``pts3d`` ``[batch, H, W, 3]`` (view 1's frame) and ``conf``
        ``[batch, H, W]`` (plus any family-specific keys)."""
        return list(output)

    def pointmap_lens(self, site: ProbeSite, tokens: Tensor, grid: tuple[int, int],
                      enc_tokens: Tensor | None = None) -> dict[str, Tensor]:
        """Decode ``tokens`` ``[batch, pos, d]`` read at ``site`` with the model's own final norm
        and head (the 3D logit lens); returns ``{"pts3d": [batch, H, W, 3], "conf": [batch, H, W]}``.

        ``grid`` is the patch grid ``(H / patch, W / patch)``. ``enc_tokens`` is this view's
        ``"enc_out"`` site tokens, passed by generic code when :attr:`lens_reads_encoder` is set
        (a head that reads the encoder output too); families whose head does not, ignore it.
        Raise ``NotImplementedError`` when the family has no lens (the generic tools skip it).
        """
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
        """``config.patch_size``."""
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


def block_hook_name(prefix: str, depth: int, layer: int, name: str, block_hooks: Sequence[str],
                    attention: Mapping[str, str] = {"": "attn"}) -> str:
    """The full name of hook ``name`` of block ``layer`` in the stack at ``prefix`` (``depth``
    blocks; negative layers count from the end): the building block of every ``act_name``.

    ``name`` is a block hook (one of ``block_hooks``, e.g. ``"resid_post"`` → ``"{prefix}.3.hook_resid_post"``)
    or an attention hook (:data:`mv_interp.layers.ATTENTION_HOOKS`, e.g. ``"pattern"``) behind one of the
    ``attention`` name prefixes, which map to the block's attention submodules
    (``{"": "attn", "cross_": "cross_attn"}``: ``"cross_pattern"`` → ``"{prefix}.3.cross_attn.hook_pattern"``).
    """
    if not -depth <= layer < depth:
        raise OutOfRangeError(f"layer {layer} out of range for {prefix} (valid: 0..{depth - 1})")
    layer %= depth
    for short, module in sorted(attention.items(), key=lambda kv: -len(kv[0])):
        if name.startswith(short) and name[len(short):] in ATTENTION_HOOKS:
            return f"{prefix}.{layer}.{module}.{ATTENTION_HOOKS[name[len(short):]]}"
    if name not in block_hooks:
        valid = sorted(set(block_hooks) | {s + a for s in attention for a in ATTENTION_HOOKS})
        raise ValueError(f"unknown hook {name!r} for {prefix} blocks; expected one of {valid}")
    return f"{prefix}.{layer}.hook_{name}"


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
        config_cls: frozen config dataclass deriving from :class:`ModelConfig`.
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
        if not (isinstance(self.config_cls, type) and issubclass(self.config_cls, ModelConfig)):
            raise TypeError(f"adapter {self.name!r}: config_cls must be a frozen dataclass deriving from "
                            f"mv_interp.adapters.base.ModelConfig, got {self.config_cls!r}")
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

    def build(self, config: ModelConfig) -> MultiViewModel:
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


def adapter_for_model(model: ModelLike) -> Adapter:
    """The adapter whose ``model_cls`` built ``model`` (a :class:`MultiViewModel` or an ``MVModel``
    wrapping one; exact class first, then subclasses)."""
    model = as_module(model)
    for a in adapters():
        if type(model) is a.model_cls:
            return a
    for a in adapters():
        if isinstance(model, a.model_cls):
            return a
    raise UnknownNameError(f"no registered adapter builds {type(model).__name__}; register one with register_adapter()")
