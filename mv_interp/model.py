"""The model users hold: a hooked multi-view model wrapped in nnsight.

Two ways in, the same hook points:

nnsight::

    with model.trace(img1, img2):
        resid = model.dec_blocks2[1].hook_resid_mid.output.save()
        model.dec_blocks[0].cross_attn.hook_pattern.output[:] = 0   # edit in place

    with model.trace() as tracer:                       # several pairs in one forward
        with tracer.invoke(a1, a2):
            ra = model.dec_blocks2[1].hook_resid_post.output.save()
        with tracer.invoke(b1, b2):
            rb = model.dec_blocks2[1].hook_resid_post.output.save()

TransformerLens::

    out, cache = model.run_with_cache(img1, img2, names_filter="dec_blocks2.*.hook_resid_post")
    out = model.run_with_hooks(img1, img2, fwd_hooks=[(model.act_name("pattern", 1, view=2), fn)])

Reads inside a trace must follow execution order (``model.hook_names()``).
"""

from __future__ import annotations

import inspect
import time
import types
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from nnsight import NNsight
from nnsight.intervention.batching import Batcher
from nnsight.intervention.envoy import Envoy
from torch import Tensor, nn

from .adapters.base import MultiViewModel, check_forward_inputs
from .errors import OutOfRangeError, UserError
from .images import check_views
from .hooks import HookPoint
from .loading import load_hooked
from .types import ModelLike


class ViewBatcher(Batcher):
    """nnsight batcher for activations whose batch axis stacks several views.

    A tensor whose leading size is ``k × total`` holds ``k`` views stacked view-major
    (``[view-1 rows | view-2 rows | …]``, as the encoder runs). An invoke's rows are then
    rows ``start:start+size`` of every view block. Such a slice cannot be a view of the
    full tensor, so in-place edits made by an invoke are written back at the end of the
    visit (see :meth:`assemble_skip`).
    """

    def __init__(self, envoy: Any, kwargs: dict | None = None) -> None:
        super().__init__(envoy, kwargs)
        self._writeback: list[tuple[Tensor, Tensor, int, list]] = []

    def _k(self, tensor: Tensor) -> int:
        n = tensor.shape[0] if tensor.ndim else 0
        return n // self.total if n > self.total and n % self.total == 0 else 0

    def _narrow_tensor(self, tensor: Tensor, group: list) -> Tensor:
        k = self._k(tensor)
        if not k:
            return super()._narrow_tensor(tensor, group)
        start, size = group
        part = tensor.unflatten(0, (k, self.total))[:, start : start + size].flatten(0, 1)
        self._writeback.append((tensor, part, part._version, group))
        return part

    def _widen_tensor(self, full: Tensor, group: list, edited: Tensor) -> Tensor:
        k = self._k(full)
        if not k:
            return super()._widen_tensor(full, group, edited)
        start, size = group
        blocks = full.unflatten(0, (k, self.total))
        edited = edited.reshape(k, size, *full.shape[1:]).to(full.dtype)
        return torch.cat([blocks[:, :start], edited, blocks[:, start + size :]], dim=1).flatten(0, 1)

    def assemble_skip(self, running: Any) -> Any:
        # Called by the interleaver once every worker parked on a location was served:
        # the moment to copy back in-place edits made to a stacked slice.
        pending, self._writeback = self._writeback, []
        for full, part, version, (start, size) in pending:
            if part._version != version:
                k = full.shape[0] // self.total
                with torch.no_grad():
                    full.unflatten(0, (k, self.total))[:, start : start + size] = part.unflatten(0, (k, size))
        return super().assemble_skip(running)


class BlocksEnvoy(Envoy):
    """Envoy of a block list that says which indices exist (``model.dec_blocks[9]`` on 8 blocks)."""

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, int) and not -len(self) <= key < len(self):
            name = self.path.split(".", 1)[-1]
            raise OutOfRangeError(f"{name}[{key}] is out of range: {name} has {len(self)} blocks "
                                  f"(valid: 0..{len(self) - 1}, or negative from the end)")
        return super().__getitem__(key)


def model_inputs(args: Sequence[Any], model: MultiViewModel) -> tuple[Tensor, ...]:
    """The per-view image tensors ``[batch, 3, H, W]`` the forward of ``model`` takes, from what the
    tools accept: tensors, unbatched ``[3, H, W]`` images, view dicts (their ``img``) or image paths."""
    views = []
    for a in args:
        if isinstance(a, dict) and "img" in a:
            a = a["img"]
        if isinstance(a, (str, Path)):
            from .images import load_images

            a = load_images([a], size=max(model.config.img_size), patch=model.patch_size)
        if isinstance(a, Tensor) and a.ndim == 3:
            a = a.unsqueeze(0)
        views.append(a)
    n = model.fixed_n_views
    if n is not None and len(views) != n:
        raise UserError(f"{type(model).__name__} takes {n} views, got {len(views)}")
    # types, layouts and empty batches now, before nnsight batches them; values at the forward
    check_views(views, patch=model.patch_size, values=False)
    return tuple(views)


class MVModel(NNsight):
    """nnsight wrapper of a :class:`~mv_interp.adapters.base.MultiViewModel` with TL-style helpers.

    ``model.trace(view1, view2, ...)`` traces a forward; views are ``[batch, 3, H, W]`` tensors in
    [-1, 1] (``[3, H, W]``, ``{"img": ...}`` dicts and image paths are accepted). Hook points are
    reached by their module path, e.g. ``model.dec_blocks2[1].hook_resid_mid.output``.
    """

    _batcher_class = ViewBatcher

    def __init__(self, module: MultiViewModel, **kwargs: Any) -> None:
        kwargs.setdefault("envoys", {nn.ModuleList: BlocksEnvoy})
        super().__init__(module, **kwargs)
        ref = weakref.ref(self.interleaver)
        for name, hp in module.hook_dict.items():
            hp.add_watcher(_nnsight_watcher(ref, f"{self.path}.{name}"))

    # -- nnsight batching extension points ------------------------------------------------
    def _batch_size(self, *inputs: Any, **kwargs: Any) -> int:
        if not inputs:
            return 0
        return model_inputs(inputs, self._module)[0].shape[0]

    def _batch(self, invokes: list[tuple], fn: Any) -> tuple:
        if not invokes:
            return tuple(), {}
        prepared = [(model_inputs(args, self._module), kwargs) for args, kwargs in invokes]
        n = {len(v) for v, _ in prepared}
        if len(n) != 1:
            raise ValueError(f"every invoke must pass the same number of views, got {sorted(n)}")
        views = tuple(torch.cat([v[i] for v, _ in prepared]) for i in range(n.pop()))
        kwargs: dict[str, Any] = {}
        for _, kw in prepared:
            for key, val in kw.items():
                if isinstance(val, Tensor) and val.ndim and key in kwargs:
                    kwargs[key] = torch.cat([kwargs[key], val])
                elif key in kwargs and not _same(kwargs[key], val):
                    raise ValueError(f"invokes disagree on {key}={val!r}; batch them in separate traces")
                else:
                    kwargs.setdefault(key, val)
        return views, kwargs

    # -- the underlying module ------------------------------------------------------------
    @property
    def module(self) -> MultiViewModel:
        """The hooked torch module (no nnsight)."""
        return self._module

    @property
    def config(self) -> Any:
        return self._module.config

    # ``*views: Any`` on purpose here: check_views names what is wrong with any input (a numpy array, a
    # nested list) and how to fix it, which a narrower annotation would turn into a bare type error.
    def forward(self, *views: Any, **kwargs: Any) -> Any:
        """Plain forward (no trace): per-view output dicts (compiled when :func:`enable_compile` was called
        and no hook is active)."""
        fast = self._module.__dict__.get("_fast_path")
        return (fast or self._module)(*model_inputs(views, self._module), **kwargs)

    def enable_compile(self, enabled: bool = True, **compile_kwargs: Any) -> FastPath | None:
        """See :func:`enable_compile`."""
        return enable_compile(self, enabled, **compile_kwargs)

    # -- TransformerLens-style API --------------------------------------------------------
    def _refuse_inside_nnsight(self, what: str) -> None:
        # A TL-style run calls the torch module directly: nnsight's trace body and stored edits
        # never see it, so running one there would silently ignore them.
        if self.interleaver.interleaving:
            raise RuntimeError(
                f"model.{what}(...) was called inside an open nnsight trace: TransformerLens-style runs bypass "
                "nnsight, so the trace's reads and edits would not apply to them. Call it outside the "
                "`with model.trace(...)` block, or read/edit hooks through the trace (model.<hook path>.output)."
            )
        edits = getattr(self, "_edits", None)
        if edits:
            raise RuntimeError(
                f"model.{what}(...) cannot apply the {len(edits)} nnsight edit(s) stored on this model by "
                "model.edit(...): TransformerLens-style runs bypass nnsight. Run through model.trace(...), which "
                "replays them, or drop them first with model.clear_edits()."
            )

    def run_with_cache(self, *views: Any, names_filter: Any = None, device: Any = None, **kwargs: Any):
        """``(output, ActivationCache)`` for the hooks selected by ``names_filter``.

        ``incl_bwd=True, metric=fn`` also records gradients (``name + "_grad"``); see
        :meth:`mv_interp.hooks.HookedRootModule.run_with_cache`. Refused inside an nnsight trace
        and on a model carrying nnsight edits (it would silently ignore them).
        """
        self._refuse_inside_nnsight("run_with_cache")
        return self._module.run_with_cache(*model_inputs(views, self._module), names_filter=names_filter,
                                           device=device, **kwargs)

    def run_with_hooks(self, *views: Any, fwd_hooks: Any = (), reset_hooks_end: bool = True,
                       bwd_hooks: Any = (), **kwargs: Any):
        """Run with temporary forward / backward hooks (TransformerLens semantics; refused inside an
        nnsight trace and on a model carrying nnsight edits)."""
        self._refuse_inside_nnsight("run_with_hooks")
        return self._module.run_with_hooks(*model_inputs(views, self._module), fwd_hooks=fwd_hooks,
                                           reset_hooks_end=reset_hooks_end, bwd_hooks=bwd_hooks, **kwargs)

    def hooks(self, fwd_hooks: Any = (), reset_hooks_end: bool = True, bwd_hooks: Any = ()):
        return self._module.hooks(fwd_hooks, reset_hooks_end, bwd_hooks=bwd_hooks)

    # -- shape inference ------------------------------------------------------------------
    def scan(self, *views: Any, **kwargs: Any):
        """nnsight's ``scan``: a trace whose forward runs on fake tensors (shapes and dtypes, no compute).

        >>> with model.scan(img1, img2):
        ...     shape = nnsight.save(model.dec_blocks2[1].cross_attn.hook_pattern.output.shape)
        """
        from nnsight.intervention.tracer import ScanningTracer

        return ScanningTracer(self, "__call__", *views, **kwargs)

    def hook_shapes(self, *views: Any, **kwargs: Any) -> list[tuple[str, tuple[int, ...]]]:
        """``[(hook, shape)]`` in execution order for these views, inferred without computing:
        the forward runs under ``FakeTensorMode``, so only shapes propagate (the weights are
        not read). ``hook_table`` is the same from a real run on one-patch images."""
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        seen: list[tuple[str, tuple[int, ...]]] = []

        def rec(x: Tensor, hook: HookPoint) -> None:
            seen.append((hook.name, tuple(int(n) for n in x.shape)))

        views = model_inputs(views, self._module)
        with FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv(assume_static_by_default=True)):
            with torch.no_grad(), self._module.hooks([(n, rec) for n in self._module.hook_dict]):
                self._module(*views, **kwargs)
        return seen

    def reset_hooks(self, including_permanent: bool = False) -> None:
        self._module.reset_hooks(including_permanent)

    def add_hook(self, name: Any, hook: Any, dir: str = "fwd", is_permanent: bool = False):
        return self._module.add_hook(name, hook, dir, is_permanent)

    @property
    def hook_dict(self) -> dict[str, HookPoint]:
        return self._module.hook_dict

    def act_name(self, name: str, layer: int | None = None, view: int | None = None, stack: str | None = None) -> str:
        return self._module.act_name(name, layer, view, stack)

    def hook_names(self) -> list[str]:
        return self._module.hook_names()

    def hook_table(self, batch: int = 1, size: tuple[int, int] | None = None):
        return self._module.hook_table(batch, size)

    def probe_sites(self, encoder_blocks: bool = False, sublayers: bool = False, n_views: int | None = None):
        return self._module.probe_sites(encoder_blocks, sublayers, n_views=n_views)

    def attention_sites(self, n_views: int | None = None):
        return self._module.attention_sites(n_views=n_views)

    def view_outputs(self, output: Any):
        return self._module.view_outputs(output)

    def example_inputs(self, *args: Any, **kwargs: Any):
        return self._module.example_inputs(*args, **kwargs)

    @classmethod
    def from_pretrained(cls, name_or_path: Any, **kwargs: Any) -> MVModel:
        """:func:`mv_interp.load_model` as a constructor: a hub id (``"org/name"``), a directory, a
        checkpoint or a bundled name, with the same keyword arguments (``device``, ``revision`` …)."""
        return load_model(name_or_path, **kwargs)

    def save_pretrained(self, directory: Any, extra: dict | None = None):
        """Write ``config.json`` + ``model.safetensors``, which :meth:`from_pretrained` reads back."""
        from .hub import save_pretrained

        return save_pretrained(self._module, directory, extra)

    def push_to_hub(self, repo_id: str, **kwargs: Any):
        """Upload :meth:`save_pretrained`'s files and a model card to hub repo ``repo_id``
        (:func:`mv_interp.hub.push_to_hub`); ``from_pretrained(repo_id)`` reads it back."""
        from .hub import push_to_hub

        return push_to_hub(self._module, repo_id, **kwargs)

    def __repr__(self) -> str:
        c = self._module.config
        return f"MVModel({type(self._module).__name__}, {c!r})"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and bool((a == b).all())
    return a == b


def _nnsight_watcher(interleaver_ref: weakref.ref, path: str):
    locations = (f"{path}.output", f"{path}.input", f"{path}.skip")

    def watching(hook: HookPoint) -> bool:
        interleaver = interleaver_ref()
        if interleaver is None or not interleaver.interleaving:
            return False
        return any(loc in interleaver.parked or loc in interleaver.observers for loc in locations)

    return watching


class FastPath:
    """The compiled forward of a hooked module, taken only while no hook needs the eager path.

    ``torch.compile`` traces the forward with every idle hook point compiled away; the fast
    capture's sinks (:meth:`~mv_interp.hooks.HookedRootModule.capture`) are traced too, so the
    cached-sites forward of probe training and evaluation runs compiled as well. A torch hook on
    any module, an nnsight trace, ``force_eager`` attention or a grad-enabled call falls back to the
    eager hooked module, the reference: a compiled graph never silently skips a hook.

    ``compile_seconds`` records the first call (compilation included) of each input signature.
    Made by :func:`enable_compile`; there is no global switch.
    """

    def __init__(self, module: MultiViewModel, **compile_kwargs: Any) -> None:
        self._module = weakref.ref(module)
        self._modules = list(module.modules())
        self._points = list(module.hook_dict.values())
        # the undecorated forward: runtime shape checks (jaxtyping under pytest) do not trace
        forward = types.MethodType(inspect.unwrap(type(module).forward), module)
        self._compiled = torch.compile(forward, **compile_kwargs)
        self.compile_kwargs = dict(compile_kwargs)
        self.compile_seconds: dict[str, float] = {}
        self.calls = {"compiled": 0, "eager": 0}

    def eager_reason(self) -> str | None:
        """Why the next call must run eagerly (``None``: it can run compiled)."""
        from torch.nn.modules import module as nn_module

        if torch.is_grad_enabled():
            return "gradients are enabled (the fast path serves frozen forwards)"
        if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
            return "a global module hook is registered"
        for m in self._modules:
            # the library's own input check is no user hook: the compiled call runs it itself
            pre = [h for h in m._forward_pre_hooks.values() if h is not check_forward_inputs]
            if m._forward_hooks or pre or getattr(m, "force_eager", False):
                return f"module {type(m).__name__} has a hook (or force_eager)"
        for hp in self._points:
            if any(w(hp) for w in hp._watchers):
                return f"nnsight reads or edits {hp.name}"
        return None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self._module()
        if module is None or self.eager_reason() is not None:
            self.calls["eager"] += 1
            return module(*args, **kwargs)
        self.calls["compiled"] += 1
        if isinstance(module, MultiViewModel):
            check_forward_inputs(module, args)
        key = _signature(args, kwargs, [hp.name for hp in self._points if hp._sink is not None])
        if key in self.compile_seconds:
            return self._compiled(*args, **kwargs)
        t0 = time.perf_counter()
        out = self._compiled(*args, **kwargs)
        if any(isinstance(a, Tensor) and a.is_cuda for a in args):
            torch.cuda.synchronize()
        self.compile_seconds[key] = time.perf_counter() - t0
        return out

    def __repr__(self) -> str:
        return f"FastPath(calls={self.calls}, compiled signatures={len(self.compile_seconds)})"


def _signature(args: Sequence[Any], kwargs: dict, sinks: list[str]) -> str:
    parts = [f"{tuple(a.shape)}:{a.dtype}:{a.device}" for a in args if isinstance(a, Tensor)]
    device = next((a.device.type for a in args if isinstance(a, Tensor)), "cpu")
    amp = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    return f"{parts} amp={amp} kwargs={sorted(kwargs)} capture={len(sinks)}"


def enable_compile(model: ModelLike, enabled: bool = True, **compile_kwargs: Any) -> FastPath | None:
    """Give ``model`` (an :class:`MVModel` or hooked module) a compiled fast path, or remove it.

    Forwards through :meth:`MVModel.forward`, :meth:`~mv_interp.hooks.HookedRootModule.capture`
    and ``run_with_cache`` (hence probe training, evaluation and the report) then run compiled
    whenever no hook is active; the eager hooked path stays the reference and serves every call
    with a hook. ``compile_kwargs`` go to ``torch.compile`` (e.g. ``mode="max-autotune"``).
    Returns the :class:`FastPath` (its ``compile_seconds`` hold the first-call times).

    >>> fast = enable_compile(model)                  # off by default; CPU compiles slowly
    >>> probes = train_probes(model, TrainConfig(steps=2000))
    >>> fast.compile_seconds, fast.calls
    """
    module = model._module if isinstance(model, MVModel) else model
    if not enabled:
        module.__dict__.pop("_fast_path", None)
        return None
    fast = FastPath(module, **compile_kwargs)
    module.__dict__["_fast_path"] = fast  # a plain attribute: not a submodule, not in the state dict
    return fast


def wrap(module: MultiViewModel) -> MVModel:
    """Wrap a hooked module for nnsight (idempotent on an :class:`MVModel`)."""
    return module if isinstance(module, MVModel) else MVModel(module)


# --------------------------------------------------------------------------------------
# Loading: the top-level entry point (re-exported as mv_interp.load_model)
# --------------------------------------------------------------------------------------


def load_model(path_or_name: Any, device: str | torch.device = "cpu", config: Any = None, family: str | None = None,
               dtype: torch.dtype | None = None, *, revision: str | None = None, filename: str | None = None,
               cache_dir: Any = None, token: str | bool | None = None, local_files_only: bool | None = None) -> MVModel:
    """Load a multi-view model, hooked and wrapped in nnsight.

    ``path_or_name`` is one of

    * an official checkpoint ``.pth`` (``{"model": state_dict, "args": Namespace(model="AsymmetricCroCo3DStereo(...)")}``),
      read with ``weights_only=True`` and a constructor string parsed without ``eval``;
    * an HF-style directory with ``config.json`` + ``model.safetensors``;
    * a bare state dict (a mapping, a ``.pth`` or ``.safetensors`` file) together with ``config=``
      — a known name (``"224_linear"``, ``"512_linear"``, ``"512_dpt"``), a dict or a config dataclass;
    * the name of a bundled model (see :func:`list_models`);
    * a Hugging Face hub id ``"org/name"`` (or ``"org/name@revision"``) of any family — the upstream
      ``config.json`` + ``model.safetensors`` repos, a ``.pth`` checkpoint repo, or one pushed by
      :meth:`MVModel.push_to_hub` — read from the local hub cache (``HF_HOME``), fetched only when
      missing and ``HF_HUB_OFFLINE`` is unset (:mod:`mv_interp.hub`). ``revision``, ``filename``
      (which file of the repo), ``cache_dir``, ``token`` and ``local_files_only`` apply to hub ids only.

    Loading is strict: missing, unexpected or mis-shaped keys raise one error that lists them.

    >>> model = load_model("DUSt3R_ViTLarge_BaseDecoder_224_linear.pth", device="cuda")
    >>> model = load_model(state_dict, config="512_dpt")
    >>> model = load_model("naver/DUSt3R_ViTLarge_BaseDecoder_512_dpt")
    """
    device = check_device(device)
    hub = {k: v for k, v in dict(revision=revision, filename=filename, cache_dir=cache_dir, token=token,
                                 local_files_only=local_files_only).items() if v is not None}
    module = load_hooked(path_or_name, config=config, family=family, **hub)
    module = module.to(device=device, dtype=dtype) if dtype is not None else module.to(device)
    return wrap(module)


def check_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)``, or a :class:`~mv_interp.errors.UserError` saying which devices exist here."""
    from .errors import UserError

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"device={device!r} is not a torch device ({str(e).splitlines()[0]}); use 'cpu', 'cuda', "
                        "'cuda:1' or 'mps'") from None
    here = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise UserError(f"device={device!r}, but no CUDA GPU is available here (torch {torch.__version__}, "
                            f"CUDA build: {torch.version.cuda or 'no'}); use device='cpu'")
        if dev.index is not None and dev.index >= n:
            raise UserError(f"device={device!r}, but this machine has {n} GPU(s): {here[1:]}")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError(f"device={device!r}, but MPS (Apple GPU) is not available here; use one of {here}")
    elif dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except Exception as e:  # noqa: BLE001 - each backend fails in its own way
            raise UserError(f"device={device!r} cannot be used here ({type(e).__name__}); use one of {here}") from None
    return dev
