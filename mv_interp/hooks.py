"""TransformerLens-style hook points, the hooked root module and the activation cache.

Every internal state of a hooked model passes through a :class:`HookPoint`
(``x = self.hook_resid_mid(x)``): an identity module that forward hooks and nnsight
can read and replace. Because the hook's return value *is* the value the model
continues with, editing any hook edits everything downstream.

Example::

    out, cache = model.run_with_cache(img1, img2, names_filter=lambda n: "resid_post" in n)
    cache["dec_blocks2.1.hook_resid_post"].shape
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Union

import torch
from torch import Tensor, nn

from .cache import CacheAlgebra
from .errors import UnknownNameError, UserError, WrongTypeError, suggest

HookFn = Callable[[Tensor, "HookPoint"], Union[Tensor, None]]
NamesFilter = Union[None, str, Sequence[str], Callable[[str], bool]]


class HookPoint(nn.Module):
    """An identity on the data path whose input can be read or replaced.

    ``add_hook(fn)`` registers ``fn(tensor, hook) -> tensor | None``; a returned tensor
    replaces the activation and must have its shape, dtype and device (a broadcastable
    ``[1, 1, D]`` would silently change the output) unless the hook point was made with
    ``free_return=True``. ``name`` is the module's path in the hooked root.

    Where a hook is made, it may declare its activation's axes in the shared vocabulary
    (``axes="batch head pos d_head"``; ``batch``, ``view``, ``pos``, ``q_pos``, ``k_pos``, ``head``,
    ``d_model``, ``d_head``) and whether its token axis holds the attention's keys / memory rather
    than its queries (``key_side=True``: cross-attention's ``hook_k`` and ``hook_v`` hold the other
    view's tokens). Generic tools (interventions) read this instead of guessing from names.
    """

    def __init__(self, axes: str | None = None, key_side: bool = False, free_return: bool = False) -> None:
        super().__init__()
        self.name: str | None = None
        #: axis roles of the activation, or ``None`` when not declared
        self.axes = axes
        #: whether the token axis holds keys (the memory) rather than queries
        self.key_side = key_side
        #: whether a hook may return a tensor of another shape / dtype / device
        self.free_return = free_return
        self._watchers: list[Callable[[HookPoint], bool]] = []
        self._permanent: set[int] = set()
        #: where :meth:`HookedRootModule.capture` records this point's value (``None``: not recording)
        self._sink: dict[str, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        # A sink is a plain dict store: no hook dispatch, no copy, no cast, no host sync, and
        # torch.compile traces it (a dict write) where it cannot trace a Python forward hook.
        if self._sink is not None:
            self._sink[self.name] = x
        return x

    def add_hook(self, hook: HookFn, dir: str = "fwd", is_permanent: bool = False):
        """Register ``hook(activation, hook_point)``; returns a handle with ``.remove()``.

        ``dir="bwd"`` (TransformerLens semantics): ``hook(grad, hook_point)`` receives the gradient
        of whatever is backpropagated with respect to this hook's *output* during the backward
        pass; a returned tensor replaces that gradient. It fires only when the forward ran with
        gradients enabled and the activation depends on something that requires grad.
        """
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"HookPoint {self.name}: dir must be 'fwd' or 'bwd', got dir={dir!r}")

        if dir == "fwd":
            def wrapped(module: nn.Module, inputs: tuple, output: Tensor):
                result = hook(output, self)
                if result is not None and result is not output:
                    self._check_return(result, output, hook)
                return result
        else:
            def wrapped(module: nn.Module, inputs: tuple, output: Tensor):
                if not (isinstance(output, Tensor) and output.requires_grad and torch.is_grad_enabled()):
                    return None
                # a fresh autograd node, so the gradient is the hook output's alone: the identity
                # returns its input tensor, which other paths (e.g. the other view's memory) may share
                out = output.view_as(output)
                out.register_hook(lambda grad: hook(grad, self))
                return out

        handle = self.register_forward_hook(wrapped)
        if is_permanent:
            self._permanent.add(handle.id)
        return handle

    def _check_return(self, result: Any, value: Tensor, hook: Any) -> None:
        fn = getattr(hook, "__qualname__", None) or type(hook).__name__
        if not isinstance(result, Tensor):
            raise WrongTypeError(f"hook {fn} on {self.name} returned a {type(result).__name__}; a hook returns None "
                                 "(keep the value) or a tensor that replaces it")
        if self.free_return:
            return
        if result.shape != value.shape or result.dtype != value.dtype or result.device != value.device:
            raise UserError(
                f"hook {fn} on {self.name} returned a tensor {list(result.shape)} {result.dtype} on {result.device}, "
                f"but the hooked value is {list(value.shape)} {value.dtype} on {value.device}; return a tensor of the "
                "same shape, dtype and device (edit a clone, or expand / .to(x) your replacement)"
            )

    def remove_hooks(self, including_permanent: bool = False) -> None:
        for key in list(self._forward_hooks):
            if including_permanent or key not in self._permanent:
                del self._forward_hooks[key]
                self._permanent.discard(key)

    def add_watcher(self, watcher: Callable[[HookPoint], bool]) -> None:
        """Register a predicate that reports whether someone outside torch hooks (nnsight)
        will read or write this hook in the run now in progress."""
        self._watchers.append(watcher)

    @property
    def is_active(self) -> bool:
        """True when a forward hook is registered or a watcher says the value is wanted.

        Models use this to choose between a fused kernel (SDPA) and the explicit path
        that materialises the attention scores and pattern.
        """
        if self._forward_hooks or self._sink is not None:
            return True
        return any(w(self) for w in self._watchers)

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def _compile_filter(names_filter: NamesFilter) -> Callable[[str], bool]:
    if names_filter is None:
        return lambda name: True
    if callable(names_filter):
        return names_filter
    patterns = [names_filter] if isinstance(names_filter, str) else list(_filter_patterns(names_filter))

    def match(name: str) -> bool:
        return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)

    return match


def _filter_patterns(names_filter: Any) -> list[str]:
    """The names / globs of a list filter; anything but None, a string, strings or a predicate is refused."""
    if isinstance(names_filter, (list, tuple, set, frozenset)) and all(isinstance(p, str) for p in names_filter):
        return list(names_filter)
    raise WrongTypeError(
        f"names_filter must be None (every hook), a hook name or glob, a list of them, or a function "
        f"name -> bool; got {names_filter!r} ({type(names_filter).__name__})"
    )


class ActivationCache(CacheAlgebra, Mapping):
    """A read-only mapping from hook name to activation, with helpers.

    Keys are full hook names (``"dec_blocks2.3.hook_resid_post"``). Indexing also
    accepts a ``(short_name, layer)`` tuple or ``(short_name, layer, view)`` when the
    owning model provides a name helper (see ``act_name``). The TransformerLens cache
    algebra (``accumulated_resid``, ``decompose_resid``, ``stack_head_results``, …) is in
    :class:`mv_interp.cache.CacheAlgebra`; it needs the ``model`` that made the cache.
    """

    def __init__(self, store: dict[str, Tensor], name_fn: Callable[..., str] | None = None, *,
                 model: HookedRootModule | None = None, batch_size: int | None = None, n_views: int | None = None,
                 has_batch_dim: bool = True):
        self._store = store
        self._name_fn = name_fn
        self._model, self.batch_size, self.n_views, self.has_batch_dim = model, batch_size, n_views, has_batch_dim

    def _key(self, key: Any) -> str:
        if isinstance(key, str):
            return key
        if isinstance(key, tuple) and self._name_fn is not None:
            return self._name_fn(*key)
        raise KeyError(key)

    def __getitem__(self, key: Any) -> Tensor:
        name = self._key(key)
        try:
            return self._store[name]
        except KeyError:
            close = [k for k in self._store if name.split(".")[-1] in k][:5]
            hint = f" Similar cached names: {close}." if close else ""
            raise UnknownNameError(
                f"{name!r} is not in this cache ({len(self._store)} entries).{hint} "
                "Widen names_filter in run_with_cache to record it."
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    def to(self, device: str | torch.device) -> ActivationCache:
        return self._derive({k: v.to(device) for k, v in self._store.items()})

    def stack(self, names: Sequence[str]) -> Tensor:
        """Stack several activations of equal shape on a new leading axis."""
        return torch.stack([self[n] for n in names])

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} activations)"


class HookedRootModule(nn.Module):
    """Base class of every hooked model: names hook points and runs with hooks or a cache.

    Subclasses build their modules, then call :meth:`setup` at the end of ``__init__``.
    """

    def setup(self) -> None:
        self.hook_dict: dict[str, HookPoint] = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                self.hook_dict[name] = module
        self._hook_order: list[str] | None = None

    # -- registry ---------------------------------------------------------------
    def _resolve(self, names: object) -> list[str]:  # user input: validated here, not by the type checker
        if isinstance(names, str) and names in self.hook_dict:
            return [names]
        if names is not None and not isinstance(names, str) and not callable(names):
            # every entry of a list must name a hook: a misspelt one would otherwise drop silently
            for p in _filter_patterns(names):
                if p not in self.hook_dict and not any(fnmatch.fnmatchcase(n, p) for n in self.hook_dict):
                    raise UnknownNameError(f"names_filter entry {p!r}: " + self._unknown_hook_message(p))
        match = _compile_filter(names)
        found = [n for n in self.hook_dict if match(n)]
        if isinstance(names, str) and not found:
            raise UnknownNameError(self._unknown_hook_message(names))
        return found

    def _unknown_hook_message(self, name: str) -> str:
        tail = name.split(".")[-1]
        close = [n for n in self.hook_dict if n.endswith(tail)][:6]
        return (
            f"No hook point named {name!r}.{suggest(name, self.hook_dict)} "
            + (f"Hooks with the same ending: {close}. " if close else "")
            + "List them all with model.hook_names()."
        )

    # -- hooks ------------------------------------------------------------------
    def add_hook(self, name: Any, hook: HookFn, dir: str = "fwd", is_permanent: bool = False):
        """Register ``hook`` on every hook point ``name`` selects; ``dir="bwd"`` for gradients."""
        handles = [self.hook_dict[n].add_hook(hook, dir=dir, is_permanent=is_permanent) for n in self._resolve(name)]
        return handles

    def reset_hooks(self, including_permanent: bool = False) -> None:
        for hp in self.hook_dict.values():
            hp.remove_hooks(including_permanent=including_permanent)

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Any = (), reset_hooks_end: bool = True, bwd_hooks: Any = ()):
        """Context manager that installs ``fwd_hooks`` (and ``bwd_hooks``) — lists of ``(names, fn)``
        pairs, checked with a clear error — and removes them on exit.

        >>> with model.hooks([("dec_blocks2.1.hook_resid_mid", lambda x, hook: x * 0)]):
        ...     out = model(img1, img2)
        """
        handles = []
        try:
            for name, fn in _hook_pairs(fwd_hooks):
                handles.extend(self.add_hook(name, fn))
            for name, fn in _hook_pairs(bwd_hooks):
                handles.extend(self.add_hook(name, fn, dir="bwd"))
            yield self
        finally:
            if reset_hooks_end:
                for h in handles:
                    h.remove()

    def run_with_hooks(self, *args: Any, fwd_hooks: Any = (),
                       reset_hooks_end: bool = True, bwd_hooks: Any = (),
                       **kwargs: Any) -> Any:
        """Run the model with temporary forward (and backward) hooks (TransformerLens semantics).

        Backward hooks attach to the tensors of this forward, so they fire when you later call
        ``.backward()`` on something computed from its output (even after the hook points were reset).
        """
        with self.hooks(fwd_hooks, reset_hooks_end=reset_hooks_end, bwd_hooks=bwd_hooks):
            return self(*args, **kwargs)

    def run_with_cache(self, *args: Any, names_filter: Any = None, device: Any = None,
                       detach: bool = True, incl_bwd: bool = False, metric: Callable[[Any], Tensor] | None = None,
                       **kwargs: Any) -> tuple[Any, ActivationCache]:
        """Run the model and record every hook selected by ``names_filter``.

        ``names_filter``: ``None`` (all), a name, a glob (``"dec_blocks2.*.hook_resid_post"``),
        a list of names/globs, or a predicate on the name.

        ``incl_bwd=True`` also records the gradient of ``metric`` with respect to each selected
        hook's output, under ``name + "_grad"`` (TransformerLens names). ``metric`` takes the
        per-view outputs (``view_outputs(output)``) and returns a scalar or one value per example
        (their mean is differentiated, as the patching sweeps average it). Parameters' ``.grad``
        are left untouched.
        """
        if incl_bwd:
            from .cache import run_with_cache_and_grads

            return run_with_cache_and_grads(self, args, kwargs, names_filter, metric, device)
        names = self._resolve(names_filter)
        # points with a torch hook record through a hook (after the edits of hooks registered
        # before); the others through the fast sink, which sees the same value; both write into
        # one dict, so the cache keeps the execution order. With ``device`` every value moves as it
        # is made (through a hook), so the model's device never holds the whole cache.
        hooked = [n for n in names if device is not None or self.hook_dict[n]._forward_hooks]
        fast = [n for n in names if n not in set(hooked)]
        seen: dict[str, Tensor] = {}

        def save(x: Tensor, hook: HookPoint) -> None:
            y = x.detach() if detach else x
            seen[hook.name] = y.to(device) if device is not None else y

        with self.hooks([(n, save) for n in hooked]):
            out, _ = self.capture(*args, names=fast, into=seen, **kwargs)
        store = {name: (x.detach() if detach and name in fast else x) for name, x in seen.items()}
        return out, self._make_cache(store, args)

    def _make_cache(self, store: dict[str, Tensor], args: Sequence[Any]) -> ActivationCache:
        views = [a for a in args if isinstance(a, Tensor)]
        return ActivationCache(store, getattr(self, "act_name", None), model=self,
                               batch_size=views[0].shape[0] if views else None, n_views=len(views) or None)

    def capture(self, *args: Any, names: Sequence[str], into: dict[str, Tensor] | None = None,
                **kwargs: Any) -> tuple[Any, dict[str, Tensor]]:
        """Run the model and return ``(output, {hook name: activation})`` for the hook points ``names``.

        The fast capture used by probe training, evaluation and head scoring: each point stores a
        reference to its activation (nothing is copied, cast, detached or synchronised), and the
        run takes the model's compiled fast path when one is enabled (:meth:`enable_compile`).
        A value is what enters the hook point, i.e. before the edits of any torch hook on it.
        ``into``: the dict to record into (default: a new one), returned as the second item.

        >>> out, acts = model.capture(img1, img2, names=["dec_blocks2.1.hook_resid_post"])
        """
        points = [self.hook_dict[n] for n in names]
        store: dict[str, Tensor] = {} if into is None else into
        try:
            for hp in points:
                hp._sink = store
            fast = self.__dict__.get("_fast_path")
            out = fast(*args, **kwargs) if fast is not None else self(*args, **kwargs)
        finally:
            for hp in points:
                hp._sink = None
        return out, store

    # -- introspection ------------------------------------------------------------
    def record_hook_order(self, *args: Any, **kwargs: Any) -> list[tuple[str, tuple[int, ...]]]:
        """Run once with every hook active and return ``[(name, shape), ...]`` in execution order."""
        seen: list[tuple[str, tuple[int, ...]]] = []

        def rec(x: Tensor, hook: HookPoint) -> None:
            seen.append((hook.name, tuple(x.shape)))

        with torch.no_grad(), self.hooks([(n, rec) for n in self.hook_dict]):
            self(*args, **kwargs)
        return seen


def _hook_pairs(fwd_hooks: Any) -> list[tuple[Any, Callable]]:
    """``fwd_hooks`` checked to be a list of ``(names, fn)`` pairs, with a fix when it is not."""
    example = "fwd_hooks=[('dec_blocks2.1.hook_resid_mid', fn)]"
    if isinstance(fwd_hooks, tuple) and len(fwd_hooks) == 2 and callable(fwd_hooks[1]) and not callable(fwd_hooks[0]):
        raise WrongTypeError(f"fwd_hooks is a single (name, fn) pair; wrap it in a list: {example}")
    if isinstance(fwd_hooks, (str, bytes)) or not isinstance(fwd_hooks, (Sequence, Iterator)):
        raise WrongTypeError(f"fwd_hooks must be a list of (names, fn) pairs, e.g. {example}; "
                             f"got a {type(fwd_hooks).__name__}")
    pairs = list(fwd_hooks)
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and callable(pair[1])):
            raise WrongTypeError(f"fwd_hooks[{i}] is {pair!r}; each entry must be a (names, fn) pair where fn(x, hook) "
                                 f"returns None or a replacement, e.g. {example}")
    return [tuple(p) for p in pairs]


def natural_key(name: str) -> list:
    """Sort key that orders ``blocks.10`` after ``blocks.9``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
