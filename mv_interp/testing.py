"""Conformity suite for adapted models: does a hooked model keep the promises the generic tools rely on?

>>> from mv_interp.testing import check_adapter
>>> report = check_adapter(model)      # raises AssertionError listing every failure
>>> print(report)                      # one line per check, with timings

``check_adapter`` runs every registered check on small random inputs (batch 2, a 2×3 patch grid,
3 views for models that take any number) and collects failures instead of stopping at the first:

=================  =========================================================================
``hook_table``     every hook point runs exactly once per forward, with a finite floating activation,
                   and the declared table (``hook_table``) scales with the batch on the leading axis
``hook_order``     ``hook_names()`` is the real execution order (what nnsight reads must follow)
``data_path``      editing any hook (adding to it through a TransformerLens hook) moves the output;
                   hooks listed in the model's ``read_only_hooks`` are exempt
``attention_rows`` every attention pattern is non-negative and its rows sum to 1
``sites``          probe and attention sites cover every block, name existing hooks, and their
                   metadata (view, layer, kind, d_model, heads, layout) matches the activations
``view_outputs``   ``view_outputs`` gives one ``pts3d`` ``[batch, H, W, 3]`` + ``conf`` per view
``nnsight_cache``  an nnsight trace and the TL-style cache agree on every hook
``invokes``        two inputs batched as two nnsight invokes equal two separate runs
``sdpa``           the fused SDPA path equals the explicit softmax path
``pointmap_lens``  the 3D lens decodes a probe site to a pointmap (skipped if not implemented)
``knockout``       a generic tool runs unchanged: an attention knockout (``mv_interp.interventions``)
                   of one layer zeroes its head outputs, moves the output, and nnsight = TL hooks
``probe_step``     a generic tool runs unchanged: one joint step of linear probes at every probe site
                   (``mv_interp.probes``) moves every probe and decodes finite full-size pointmaps
``head_scores``    a generic tool runs unchanged: ``mv_interp.heads.score_heads`` scores every head of
                   every attention site on rendered views
``cache_algebra``  per view, ``decompose_resid`` (whole sublayers and split into heads) sums back to the
                   final residual, and through ``resid_norm`` it gives the heads' input (``head_input_hook``)
``bwd_hooks``      backward hooks fire on every hook point the output depends on, with autograd's gradient,
                   and ``run_with_cache(incl_bwd=True)`` records the same
``attribution``    direct pointmap attribution sums to the pointmap change against a nearby run, and
                   attribution patching fills every cell of a per-site sweep
=================  =========================================================================

Adding a check: write ``fn(ctx: CheckContext) -> list[str]`` (the failure messages; empty when it
passes; raise :class:`SkipCheck` when it does not apply) and register it::

    @register_check("probe_step")
    def _probe_step(ctx):
        ...  # e.g. train one probe step on ctx.model at ctx.module.probe_sites(n_views=ctx.n_views)

Every check gets the same :class:`CheckContext` (the wrapped and the plain model, the inputs,
cached runs), so checks of the generic tools (a probe step, head scores, a knockout) are one
function each.
"""

from __future__ import annotations

import fnmatch
import inspect
import math
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .adapters.base import (
    ATTENTION_KINDS,
    ATTENTION_LAYOUTS,
    PROBE_KINDS,
    STACKS,
    TOKEN_LAYOUTS,
    MultiViewModel,
    patch_tokens,
    pattern_blocks,
    view_tokens,
)
from .errors import UnknownNameError, WrongTypeError

__all__ = [
    "CheckContext", "CheckResult", "ConformityReport", "SkipCheck", "check_adapter", "list_checks", "register_check",
]

# --------------------------------------------------------------------------------------
# Registry and report
# --------------------------------------------------------------------------------------

CheckFn = Callable[["CheckContext"], "Iterable[str] | None"]
_CHECKS: dict[str, CheckFn] = {}


class SkipCheck(Exception):
    """Raised by a check that does not apply to this model; the message says why."""


def register_check(name: str, fn: CheckFn | None = None, *, replace: bool = False):
    """Register ``fn(ctx) -> failure messages`` under ``name`` (usable as a decorator).

    Checks run in registration order. ``replace=True`` swaps an existing check.
    """

    def deco(f: CheckFn) -> CheckFn:
        if name in _CHECKS and not replace:
            raise ValueError(f"a conformity check named {name!r} exists; pass replace=True to swap it")
        _CHECKS[name] = f
        return f

    return deco(fn) if fn is not None else deco


def list_checks() -> list[str]:
    """Names of the registered checks, in the order they run."""
    return list(_CHECKS)


@dataclass
class CheckResult:
    """Outcome of one check: ``status`` is ``"passed"``, ``"failed"``, ``"skipped"`` or ``"error"``
    (the check itself raised; the traceback's last line is in ``messages``)."""

    name: str
    status: str
    messages: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status in ("passed", "skipped")


@dataclass
class ConformityReport:
    """Every check's result for one model; ``str(report)`` is a readable summary."""

    model: str
    results: list[CheckResult]
    max_messages: int = 20

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if not r.ok]

    def __getitem__(self, name: str) -> CheckResult:
        for r in self.results:
            if r.name == name:
                return r
        raise UnknownNameError(f"no check {name!r} in this report; ran: {[r.name for r in self.results]}")

    def __str__(self) -> str:
        counts = {s: sum(r.status == s for r in self.results) for s in ("passed", "failed", "error", "skipped")}
        lines = [f"check_adapter({self.model}): " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)]
        for r in self.results:
            tag = {"passed": "PASS", "failed": "FAIL", "error": "ERROR", "skipped": "SKIP"}[r.status]
            lines.append(f"  {tag:5} {r.name} ({r.seconds:.2f} s)")
            shown = r.messages[: self.max_messages]
            lines.extend(f"        - {m}" for m in shown)
            if len(r.messages) > len(shown):
                lines.append(f"        … and {len(r.messages) - len(shown)} more")
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        if not self.ok:
            raise AssertionError("model does not conform to the adapter contract\n" + str(self))


# --------------------------------------------------------------------------------------
# Context shared by the checks
# --------------------------------------------------------------------------------------


class CheckContext:
    """What a check needs: the model both ways, inputs, and runs cached across checks.

    Attributes:
        model: the nnsight-wrapped :class:`~mv_interp.model.MVModel`.
        module: the plain hooked torch module.
        batch, n_views, size: shape of ``inputs`` (``size`` = (H, W) in pixels).
        inputs / other_inputs: two different sets of views (seeds ``seed`` and ``seed + 1``).
    """

    def __init__(self, model: Any, batch: int, n_views: int, size: tuple[int, int], seed: int) -> None:
        from .model import MVModel

        self.model: MVModel = model if isinstance(model, MVModel) else MVModel(model)
        self.module: MultiViewModel = self.model.module
        self.batch, self.n_views, self.size, self.seed = batch, n_views, size, seed
        self.inputs = self.module.example_inputs(batch, size, n_views=n_views, seed=seed)
        self.other_inputs = self.module.example_inputs(batch, size, n_views=n_views, seed=seed + 1)
        self._record: list[tuple[str, tuple[int, ...]]] | None = None
        self._cache: dict[str, Tensor] | None = None
        self._output: Any = None
        self._plain: Any = None

    @property
    def grid(self) -> tuple[int, int]:
        p = self.module.patch_size
        return (self.size[0] // p, self.size[1] // p)

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def _run_all(self) -> None:
        # one forward records execution order, shapes and activations of every hook
        record: list[tuple[str, tuple[int, ...]]] = []
        store: dict[str, Tensor] = {}

        def rec(x: Tensor, hook: Any) -> None:
            record.append((hook.name, tuple(x.shape) if isinstance(x, Tensor) else ()))
            store.setdefault(hook.name, x.detach() if isinstance(x, Tensor) else x)

        with torch.no_grad(), self.module.hooks([(n, rec) for n in self.module.hook_dict]):
            self._output = self.module(*self.inputs)
        self._record, self._cache = record, store

    def record(self) -> list[tuple[str, tuple[int, ...]]]:
        """``[(hook, shape)]`` in execution order for ``inputs`` (every call of every hook)."""
        if self._record is None:
            self._run_all()
        return self._record

    def order(self) -> list[str]:
        """Hooks in execution order, each once (first call)."""
        seen: dict[str, None] = {}
        for name, _ in self.record():
            seen.setdefault(name, None)
        return list(seen)

    def cache(self) -> dict[str, Tensor]:
        """Every hook's activation on ``inputs`` (its first call), as ``run_with_cache`` records it."""
        if self._cache is None:
            self._run_all()
        return self._cache

    def output(self) -> Any:
        """The model's output on ``inputs`` with every hook read (explicit attention path)."""
        if self._cache is None:
            self._run_all()
        return self._output

    def plain_output(self) -> Any:
        """The model's output on ``inputs`` with no hook (fused attention where the model has it)."""
        if self._plain is None:
            with torch.no_grad():
                self._plain = self.module(*self.inputs)
        return self._plain

    def flat_outputs(self, output: Any) -> dict[str, Tensor]:
        """Every tensor of ``view_outputs(output)`` as ``{"v1.pts3d": …}``."""
        flat: dict[str, Tensor] = {}
        for v, d in enumerate(self.module.view_outputs(output), start=1):
            for k, t in d.items():
                if isinstance(t, Tensor):
                    flat[f"v{v}.{k}"] = t
        return flat


# --------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------


def check_adapter(
    model: Any,
    *,
    checks: Sequence[str] | None = None,
    skip: Sequence[str] = (),
    batch: int = 2,
    n_views: int | None = None,
    size: tuple[int, int] | None = None,
    seed: int = 0,
    raise_on_failure: bool = True,
) -> ConformityReport:
    """Run the conformity checks on ``model`` (a hooked module or an :class:`~mv_interp.MVModel`).

    Args:
        checks: names to run (default: all registered, see :func:`list_checks`).
        skip: names not to run.
        batch: batch size of the test inputs (≥ 2, so that mixing samples is caught).
        n_views: views per input (default: the model's fixed number, else 3).
        size: (H, W) of the test images (default: 2 × 3 patches).
        raise_on_failure: raise ``AssertionError`` with the readable report when a check fails.

    Returns:
        the :class:`ConformityReport` (also when everything passes).
    """
    module = getattr(model, "_module", model)
    if not isinstance(module, MultiViewModel):
        raise WrongTypeError("check_adapter needs a MultiViewModel (or an MVModel wrapping one), "
                        f"got {type(module).__name__}")
    if batch < 2:
        raise ValueError("batch must be at least 2 (a batch of one cannot show samples leaking into each other), "
                         f"got {batch}")
    names = list(checks) if checks is not None else list_checks()
    unknown = sorted((set(names) | set(skip)) - set(_CHECKS))
    if unknown:
        raise UnknownNameError(f"unknown conformity check(s) {unknown}; registered: {list_checks()}")
    p = module.patch_size
    size = tuple(size) if size is not None else (2 * p, 3 * p)
    if size[0] % p or size[1] % p:
        raise ValueError(f"size={size} must be a multiple of the patch size {p}")
    n_views = module.default_n_views(n_views) if n_views is not None else (module.fixed_n_views or 3)
    was_training = module.training
    module.eval()
    try:
        ctx = CheckContext(model, batch, n_views, size, seed)
        results = []
        for name in names:
            if name in skip:
                continue
            t0 = time.perf_counter()
            try:
                messages = list(_CHECKS[name](ctx) or [])
                status = "failed" if messages else "passed"
            except SkipCheck as e:
                messages, status = [str(e)], "skipped"
            except Exception as e:  # noqa: BLE001 - report, do not stop the suite
                last = traceback.format_exception_only(type(e), e)[-1].strip()
                messages, status = [f"the check raised {last}"], "error"
            results.append(CheckResult(name, status, messages, time.perf_counter() - t0))
    finally:
        module.train(was_training)
    report = ConformityReport(type(module).__name__, results)
    if raise_on_failure:
        report.raise_if_failed()
    return report


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _close(a: Tensor, b: Tensor, rtol: float = 1e-4, atol: float = 1e-4) -> tuple[bool, float]:
    """The fixtures' rule: ``|a - b| ≤ atol · max(1, max|b|) + rtol · |b|``; returns (ok, worst excess ratio)."""
    a, b = a.detach().float(), b.detach().float()
    if a.shape != b.shape:
        return False, math.inf
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return False, math.inf
    fin = torch.isfinite(b)
    if not torch.equal(fin, torch.isfinite(a)) or not torch.equal(a[~fin].nan_to_num(), b[~fin].nan_to_num()):
        return False, math.inf
    if not fin.any():
        return True, 0.0
    a, b = a[fin], b[fin]
    bound = atol * max(1.0, float(b.abs().max())) + rtol * b.abs()
    ratio = float(((a - b).abs() / bound).max())
    return ratio <= 1.0, ratio


def _differs(a: Tensor, b: Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> bool:
    """True when some element of ``a`` differs from ``b`` beyond ``atol · max(1, max|b|) + rtol · |b|``
    (NaN against a number counts as a difference)."""
    if a.shape != b.shape:
        return True
    a, b = a.detach().float(), b.detach().float()
    bound = atol * max(1.0, float(b.abs().nan_to_num(posinf=0, neginf=0).max())) + rtol * b.abs()
    return not bool(((a == b) | ((a - b).abs() <= bound)).all())


def _leading_rows(t: Tensor, k: int, total: int) -> Tensor:
    """Rows of sample ``k`` in a tensor whose leading axis is ``m × total`` (views stacked view-major)."""
    return t.unflatten(0, (t.shape[0] // total, total))[:, k]


def _envoy(model: Any, name: str) -> Any:
    env = model
    for part in name.split("."):
        env = env[int(part)] if part.isdigit() else getattr(env, part)
    return env


def _is_read_only(module: MultiViewModel, name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in getattr(module, "read_only_hooks", ()))


def _shape(t: Any) -> str:
    return str(list(t.shape)) if isinstance(t, Tensor) else type(t).__name__


# --------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------


@register_check("hook_table")
def _check_hook_table(ctx: CheckContext) -> list[str]:
    """Every hook runs once per forward with a finite float activation whose leading axis is a
    multiple of the batch; ``hook_table`` declares each hook once and scales with the batch."""
    fails = []
    calls: dict[str, int] = {}
    for name, _ in ctx.record():
        calls[name] = calls.get(name, 0) + 1
    for name in ctx.module.hook_dict:
        n = calls.get(name, 0)
        if n != 1:
            fails.append(f"{name}: ran {n} times in one forward (expected once; a hook called twice cannot be read "
                         "or edited unambiguously, one never called is dead)")
    for name, act in ctx.cache().items():
        if not isinstance(act, Tensor) or not act.is_floating_point():
            fails.append(f"{name}: activation is {getattr(act, 'dtype', type(act).__name__)}, expected a float tensor")
            continue
        if act.ndim == 0 or act.shape[0] % ctx.batch:
            fails.append(f"{name}: shape {_shape(act)} has no leading axis that is a multiple of the batch "
                         f"({ctx.batch}); nnsight invokes and the generic tools split samples on it")
        elif not torch.isfinite(act).all():
            fails.append(f"{name}: non-finite values on random inputs")
    # the declared table, at batch 1, must be the real run with only the leading axis scaled
    one = ctx.module.hook_table(batch=1, size=ctx.size, n_views=ctx.n_views)
    real = ctx.record()
    if [n for n, _ in one] != [n for n, _ in real]:
        fails.append("hook_table lists different hooks (or orders) at batch 1 than a forward at batch "
                     f"{ctx.batch} runs")
    else:
        for (name, s1), (_, sb) in zip(one, real):
            if len(s1) != len(sb) or s1[1:] != sb[1:] or s1[0] * ctx.batch != sb[0]:
                fails.append(f"{name}: hook_table shape {list(s1)} at batch 1 but {list(sb)} at batch {ctx.batch} "
                             "(only the leading axis may scale with the batch)")
    return fails


@register_check("hook_order")
def _check_hook_order(ctx: CheckContext) -> list[str]:
    """``hook_names()`` equals the order in which the hooks really run."""
    declared = ctx.module.hook_names()
    real = ctx.order()
    if declared == real:
        return []
    for i, (d, r) in enumerate(zip(declared, real)):
        if d != r:
            return [f"hook_names()[{i}] is {d!r} but the forward runs {r!r} there "
                    f"(on {ctx.n_views} views of {ctx.size[0]}x{ctx.size[1]}); nnsight reads in hook_names() order "
                    "would fail"]
    return [f"hook_names() has {len(declared)} names, the forward runs {len(real)} hooks"]


class _Unbatchable(Exception):
    pass


@register_check("data_path")
def _check_data_path(ctx: CheckContext, screen: bool = True, group: int = 24) -> list[str]:
    """Editing any hook (adding to it through a TL hook) changes some output of the model.

    Two stages, for speed:

    1. ``screen``: one forward + backward at batch 1 adds a zero tensor ``δ`` to every hook and
       takes the gradient of a random projection of all outputs with respect to each ``δ``. A
       non-zero gradient proves the output depends on the hook's *returned* value (a hook whose
       return value is discarded gets no gradient at all).
    2. The hooks the screen could not clear (no or zero gradient, e.g. behind a non-differentiable
       op) get real edits: noise added to each, and the outputs compared with a clean run. One
       forward tests ``group`` hooks — the input is repeated ``group + 1`` times and hook ``k`` is
       perturbed only in sample ``k`` (sample 0 stays clean); a hook whose leading axis does not
       hold the samples gets its own forward.
    """
    module = ctx.module
    names = [n for n in ctx.order() if not _is_read_only(module, n)]
    single = tuple(v[:1] for v in ctx.inputs)
    gen = torch.Generator().manual_seed(ctx.seed)
    fails: list[str] = []
    off_path = ("adding noise to it does not change any output — its value is not on the data path "
                "(write `x = self.hook(x)` and use the returned value)")

    if screen:
        deltas: dict[str, Tensor] = {}

        def add_delta(x: Tensor, hook: Any) -> Tensor | None:
            if not isinstance(x, Tensor) or not x.is_floating_point():
                return None
            d = torch.zeros_like(x, requires_grad=True)
            deltas[hook.name] = d
            return x + d

        with torch.enable_grad():
            out = module.run_with_hooks(*single, fwd_hooks=[(n, add_delta) for n in names])
            terms = [(t.float() * torch.randn(t.shape, generator=gen).to(t.device)).nan_to_num(0.0, 0.0, 0.0).sum()
                     for t in ctx.flat_outputs(out).values() if t.is_floating_point() and t.requires_grad]
            grads = (torch.autograd.grad(torch.stack(terms).sum(), list(deltas.values()), allow_unused=True)
                     if terms and deltas else [None] * len(deltas))
        cleared = {n for n, g in zip(deltas, grads)
                   if g is not None and bool(torch.isfinite(g).all()) and bool(g.any())}
        names = [n for n in names if n not in cleared]

    def noise_like(x: Tensor) -> Tensor:
        scale = 0.1 * float(x.detach().float().abs().mean()) + 1e-2
        return (torch.randn(x.shape, generator=gen) * scale).to(x.device, x.dtype)

    def moved(out: Any, ref: Any, k: int | None, total: int) -> bool:
        refs = ctx.flat_outputs(ref)
        for key, t in ctx.flat_outputs(out).items():
            r = refs[key]
            a = t if k is None else _leading_rows(t, k, total)
            b = r if k is None else _leading_rows(r, 0, total)
            if _differs(a, b):
                return True
        return False

    def perturb_sample(k: int, total: int):
        def fn(x: Tensor, hook: Any) -> Tensor:
            if x.ndim == 0 or x.shape[0] % total or not x.is_floating_point():
                raise _Unbatchable(hook.name)
            y = x.clone()
            rows = y.unflatten(0, (x.shape[0] // total, total))
            rows[:, k] = rows[:, k] + noise_like(rows[:, k])
            return y

        return fn

    def alone(name: str) -> None:
        with torch.no_grad():
            ref = module(*single)
            try:
                out = module.run_with_hooks(*single, fwd_hooks=[(name, lambda x, hook: x + noise_like(x))])
            except Exception as e:  # noqa: BLE001
                fails.append(f"{name}: adding noise made the forward raise {type(e).__name__}: {e}")
                return
        if not moved(out, ref, None, 1):
            fails.append(f"{name}: {off_path}")

    for start in range(0, len(names), group):
        chunk = names[start : start + group]
        total = len(chunk) + 1
        views = tuple(v.repeat(total, *([1] * (v.ndim - 1))) for v in single)
        hooks = [(name, perturb_sample(k, total)) for k, name in enumerate(chunk, start=1)]
        try:
            with torch.no_grad():
                out = module.run_with_hooks(*views, fwd_hooks=hooks)
        except _Unbatchable:
            for name in chunk:
                alone(name)
            continue
        for k, name in enumerate(chunk, start=1):
            if not moved(out, out, k, total):
                fails.append(f"{name}: {off_path}")
    return fails


def _pattern_hooks(ctx: CheckContext) -> list[str]:
    names = {s.pattern_hook for s in ctx.module.attention_sites(n_views=ctx.n_views)}
    names |= {n for n in ctx.module.hook_dict if n.endswith("hook_pattern")}
    return [n for n in ctx.order() if n in names]


@register_check("attention_rows")
def _check_attention_rows(ctx: CheckContext) -> list[str]:
    """Every attention pattern is a probability distribution over keys."""
    names = _pattern_hooks(ctx)
    if not names:
        raise SkipCheck("the model declares no attention pattern hooks")
    fails = []
    cache = ctx.cache()
    for name in names:
        p = cache[name].float()
        if p.ndim < 2:
            fails.append(f"{name}: pattern of shape {_shape(p)} has no key axis")
            continue
        err = float((p.sum(-1) - 1).abs().max())
        if err > 1e-4 or float(p.min()) < 0:
            fails.append(f"{name}: rows sum to 1 ± {err:.2e}, min {float(p.min()):.2e} (expected a softmax over keys)")
    return fails


@register_check("sites")
def _check_sites(ctx: CheckContext) -> list[str]:
    """Probe and attention sites name existing hooks, cover every block, and describe them correctly."""
    m, n, cache, fails = ctx.module, ctx.n_views, ctx.cache(), []
    pos = {name: i for i, name in enumerate(ctx.order())}
    probes = m.probe_sites(encoder_blocks=True, sublayers=True, n_views=n)
    attn = m.attention_sites(n_views=n)
    if not probes:
        fails.append("probe_sites() is empty")
    if not attn and any(k.endswith("hook_pattern") for k in m.hook_dict):
        fails.append("attention_sites() is empty but the model has pattern hooks")

    # probe sites ----------------------------------------------------------------------
    seen_names: set[str] = set()
    for s in probes:
        where = f"probe site {s.name!r}"
        if s.name in seen_names:
            fails.append(f"{where}: duplicate name")
        seen_names.add(s.name)
        if s.hook not in m.hook_dict:
            fails.append(f"{where}: hook {s.hook!r} does not exist")
            continue
        if not 1 <= s.view <= n:
            fails.append(f"{where}: view {s.view} outside 1..{n}")
            continue
        if s.kind not in PROBE_KINDS or s.stack not in STACKS or s.layout not in TOKEN_LAYOUTS:
            fails.append(f"{where}: kind/stack/layout {s.kind!r}/{s.stack!r}/{s.layout!r} not in "
                         f"{PROBE_KINDS}/{STACKS}/{TOKEN_LAYOUTS}")
            continue
        act = cache[s.hook]
        if act.shape[-1] != s.d_model:
            fails.append(f"{where}: d_model {s.d_model} but {s.hook} has width {act.shape[-1]}")
        try:
            tok = view_tokens(act, s, n)
        except Exception as e:  # noqa: BLE001
            fails.append(f"{where}: view_tokens fails on {s.hook} {_shape(act)}: {e}")
            continue
        want = (ctx.batch, s.n_prefix + ctx.n_patches, act.shape[-1])
        if tuple(tok.shape) != want:
            fails.append(f"{where}: layout {s.layout!r} gives tokens {_shape(tok)} from {s.hook} {_shape(act)}, "
                         f"expected [batch, pos, d] = {list(want)}")
    for v in range(1, n + 1):
        mine = sorted((s for s in probes if s.view == v and s.hook in pos), key=lambda s: s.order)
        if not mine:
            fails.append(f"no probe site for view {v}")
            continue
        orders = [s.order for s in mine]
        if len(set(orders)) != len(orders):
            fails.append(f"view {v}: probe sites share an order value")
        runs = [pos[s.hook] for s in mine]
        bad = [(a.name, b.name) for a, b, ra, rb in zip(mine, mine[1:], runs, runs[1:]) if rb < ra]
        if bad:
            fails.append(f"view {v}: site order does not follow execution, e.g. {bad[0][0]!r} (order before) "
                         f"runs after {bad[0][1]!r}")
    off_grid = lambda h: any(fnmatch.fnmatchcase(h, g) for g in getattr(m, "off_grid_hooks", ()))  # noqa: E731
    blocks = sorted({h.rsplit(".", 1)[0] for h in m.hook_dict
                     if h.endswith(".hook_resid_post") and h.rsplit(".", 2)[-2].isdigit() and not off_grid(h)})
    for b in blocks:
        if not any(s.hook.startswith(b + ".") for s in probes):
            fails.append(f"block {b!r} has no probe site (probe_sites(encoder_blocks=True, sublayers=True))")

    # attention sites ------------------------------------------------------------------
    referenced = {s.pattern_hook for s in attn}
    for h in m.hook_dict:
        if h.endswith("hook_pattern") and h not in referenced and not off_grid(h):
            fails.append(f"pattern hook {h!r} belongs to no attention site")
    seen_names = set()
    for s in attn:
        where = f"attention site {s.name!r}"
        if s.name in seen_names:
            fails.append(f"{where}: duplicate name")
        seen_names.add(s.name)
        missing = [h for h in (s.pattern_hook, s.scores_hook, s.z_hook) if h not in m.hook_dict]
        if missing:
            fails.append(f"{where}: hooks {missing} do not exist")
            continue
        if s.kind not in ATTENTION_KINDS or s.stack not in STACKS or s.layout not in ATTENTION_LAYOUTS:
            fails.append(f"{where}: kind/stack/layout {s.kind!r}/{s.stack!r}/{s.layout!r} not in "
                         f"{ATTENTION_KINDS}/{STACKS}/{ATTENTION_LAYOUTS}")
            continue
        if not 0 <= s.query_view <= n or not s.key_views or any(not 1 <= kv <= n for kv in s.key_views):
            fails.append(f"{where}: query_view {s.query_view} / key_views {s.key_views} outside the {n} views")
            continue
        if s.layout in ("stacked", "global") and len(s.key_views) != n:
            fails.append(f"{where}: a {s.layout!r} site needs one key view per view ({n}), got key_views={s.key_views}")
            continue
        if s.layout == "view" and s.query_view == 0:
            fails.append(f"{where}: a 'view' site holds one query view; query_view must be 1..{n}")
            continue
        pat, z = cache[s.pattern_hook], cache[s.z_hook]
        if pat.ndim != 4 or pat.shape[1] != s.n_heads:
            fails.append(f"{where}: pattern {_shape(pat)}, expected [batch, {s.n_heads} heads, q, k]")
            continue
        if cache[s.scores_hook].shape != pat.shape:
            fails.append(f"{where}: scores {_shape(cache[s.scores_hook])} differ from pattern {_shape(pat)}")
        if z.ndim != 4 or z.shape[2] != s.n_heads or z.shape[0] != pat.shape[0] or z.shape[1] != pat.shape[2]:
            fails.append(f"{where}: z {_shape(z)}, expected [batch, q_pos, {s.n_heads} heads, d_head]")
        try:
            blocks_ = pattern_blocks(pat, s, n)
        except Exception as e:  # noqa: BLE001
            fails.append(f"{where}: pattern_blocks fails on {_shape(pat)}: {e}")
            continue
        n_tok = s.n_prefix + ctx.n_patches
        for (qv, kv), blk in blocks_.items():
            if tuple(blk.shape) != (ctx.batch, s.n_heads, n_tok, n_tok):
                fails.append(f"{where}: block ({qv},{kv}) has shape {_shape(blk)}, expected "
                             f"{[ctx.batch, s.n_heads, n_tok, n_tok]} (n_prefix + patches)")
                break
    return fails


@register_check("view_outputs")
def _check_view_outputs(ctx: CheckContext) -> list[str]:
    """One dict per view with ``pts3d`` [batch, H, W, 3] and ``conf`` [batch, H, W], finite."""
    outs = ctx.module.view_outputs(ctx.plain_output())
    if len(outs) != ctx.n_views:
        return [f"view_outputs gives {len(outs)} dicts for {ctx.n_views} views"]
    H, W = ctx.size
    fails = []
    for v, d in enumerate(outs, start=1):
        for key, want in (("pts3d", (ctx.batch, H, W, 3)), ("conf", (ctx.batch, H, W))):
            t = d.get(key) if isinstance(d, dict) else None
            if not isinstance(t, Tensor) or tuple(t.shape) != want:
                fails.append(f"view {v}: {key!r} is {_shape(t)}, expected {list(want)}")
            elif not torch.isfinite(t).all():
                fails.append(f"view {v}: {key!r} has non-finite values")
    return fails


@register_check("nnsight_cache")
def _check_nnsight_cache(ctx: CheckContext) -> list[str]:
    """Reading every hook in an nnsight trace gives what ``run_with_cache`` records."""
    names = ctx.order()
    saved: dict[str, Any] = {}
    model = ctx.model
    with torch.no_grad(), model.trace(*ctx.inputs):
        for name in names:
            saved[name] = _envoy(model, name).output.save()
    cache, fails = ctx.cache(), []
    for name in names:
        ok, ratio = _close(saved[name], cache[name], rtol=1e-5, atol=1e-5)
        if not ok:
            fails.append(f"{name}: nnsight {_shape(saved[name])} vs cache {_shape(cache[name])}, "
                         f"difference {ratio:.2g}× the tolerance")
    return fails


@register_check("invokes")
def _check_invokes(ctx: CheckContext, n_hooks: int = 24) -> list[str]:
    """Two inputs traced as two invokes of one batch equal two separate runs (outputs and hooks)."""
    order = ctx.order()
    step = max(1, len(order) // n_hooks)
    names = sorted(set(order[::step]) | {order[-1]}, key=order.index)
    model, fails = ctx.model, []
    got: list[dict[str, Any]] = [{}, {}]
    outs: list[Any] = [None, None]
    with torch.no_grad(), model.trace() as tracer:
        for i, views in enumerate((ctx.inputs, ctx.other_inputs)):
            with tracer.invoke(*views):
                for name in names:
                    got[i][name] = _envoy(model, name).output.save()
                outs[i] = model.output.save()
    for i, views in enumerate((ctx.inputs, ctx.other_inputs)):
        if i == 0:
            ref_out, ref = ctx.output(), ctx.cache()
        else:
            with torch.no_grad():
                ref_out, ref = ctx.module.run_with_cache(*views, names_filter=names)
        for name in names:
            ok, ratio = _close(got[i][name], ref[name])
            if not ok:
                fails.append(f"invoke {i + 1}, {name}: {_shape(got[i][name])} differs from a separate run "
                             f"{_shape(ref[name])} ({ratio:.2g}× the tolerance)")
        mine, theirs = ctx.flat_outputs(outs[i]), ctx.flat_outputs(ref_out)
        for key, t in theirs.items():
            ok, ratio = _close(mine[key], t) if key in mine else (False, math.inf)
            if not ok:
                fails.append(f"invoke {i + 1}, output {key}: differs from a separate run ({ratio:.2g}× the tolerance)")
    return fails


@register_check("sdpa")
def _check_sdpa(ctx: CheckContext) -> list[str]:
    """The fused attention path (no pattern read) and the explicit softmax path give the same outputs."""
    names = _pattern_hooks(ctx)
    if not names:
        raise SkipCheck("the model declares no attention pattern hooks")
    fast = ctx.flat_outputs(ctx.plain_output())
    slow = ctx.flat_outputs(ctx.output())  # every hook read: the explicit path everywhere
    fails = []
    for key, t in slow.items():
        ok, ratio = _close(fast[key], t)
        if not ok:
            fails.append(f"output {key}: SDPA and explicit attention differ ({ratio:.2g}× the tolerance)")
    return fails


@register_check("pointmap_lens")
def _check_pointmap_lens(ctx: CheckContext) -> list[str]:
    """The 3D lens turns a decoder probe site of each view into a pointmap + confidence."""
    m = ctx.module
    sites = m.probe_sites(n_views=ctx.n_views)
    cache, fails = ctx.cache(), []
    takes_enc = "enc_tokens" in inspect.signature(m.pointmap_lens).parameters
    H, W = ctx.size
    for v in range(1, ctx.n_views + 1):
        mine = [s for s in sites if s.view == v]
        dec = [s for s in mine if s.stack == "dec"]
        if not dec:
            continue
        site = dec[-1]
        kwargs = {}
        if takes_enc:
            enc = [s for s in mine if s.kind == "enc_out"]
            if enc:
                kwargs["enc_tokens"] = patch_tokens(cache[enc[0].hook], enc[0], ctx.n_views)
        try:
            with torch.no_grad():
                out = m.pointmap_lens(site, patch_tokens(cache[site.hook], site, ctx.n_views), ctx.grid, **kwargs)
        except NotImplementedError:
            raise SkipCheck("pointmap_lens is not implemented") from None
        if tuple(out["pts3d"].shape) != (ctx.batch, H, W, 3) or tuple(out["conf"].shape) != (ctx.batch, H, W):
            fails.append(f"lens at {site.name}: pts3d {_shape(out['pts3d'])}, conf {_shape(out['conf'])}; expected "
                         f"{[ctx.batch, H, W, 3]} and {[ctx.batch, H, W]}")
    return fails


@register_check("knockout")
def _check_knockout(ctx: CheckContext) -> list[str]:
    """A generic tool runs unchanged: an :class:`~mv_interp.interventions.AttentionKnockout` of every key
    in every head of one attention layer (post-softmax) zeroes that layer's head outputs ``z``, moves
    the model's output, and gives the same output through nnsight as through TL hooks."""
    try:
        from .interventions import AttentionKnockout
    except ImportError:  # pragma: no cover - the package ships it
        raise SkipCheck("mv_interp.interventions is not available") from None
    sites = ctx.module.attention_sites(n_views=ctx.n_views)
    if not sites:
        raise SkipCheck("the model declares no attention sites")
    dec = [s for s in sites if s.stack == "dec"] or sites
    site = dec[len(dec) // 2]
    ko = AttentionKnockout(layers=site.layer, kind=site.kind, stack=site.stack, view=site.query_view or None,
                           heads="all", keys="all", queries="all", mode="post")
    out, cache = ko.run_with_cache(ctx.model, *ctx.inputs, names_filter=[site.z_hook], n_views=ctx.n_views)
    fails = []
    z = cache[site.z_hook]
    if bool(z.abs().max() > 0):
        fails.append(f"knocking out every key of {site.name} left its head outputs {site.z_hook} non-zero "
                     f"(max |z| = {float(z.abs().max()):.3g})")
    before, after = ctx.flat_outputs(ctx.plain_output()), ctx.flat_outputs(out)
    if not any(_differs(after[k], before[k]) for k in before):
        fails.append(f"knocking out every key of {site.name} did not change any output")
    with torch.no_grad(), ctx.model.trace(*ctx.inputs):
        ko.apply_nnsight(ctx.model, n_views=ctx.n_views)
        traced = ctx.model.output.save()
    traced = ctx.flat_outputs(traced)
    for key, t in after.items():
        ok, ratio = _close(traced[key], t)
        if not ok:
            fails.append(f"output {key}: the knockout through nnsight differs from TL hooks "
                         f"({ratio:.2g}× the tolerance)")
    return fails


def _rendered_views(ctx: CheckContext) -> list[dict[str, Tensor]]:
    """Synthetic views (with geometry) at the check's input size and view count."""
    from .data import SceneConfig, render_views

    # the renderer works in multiples of 16; round the check's size up to a size both accept
    step = math.lcm(16, ctx.module.patch_size)
    size = tuple(-(-s // step) * step for s in ctx.size)
    cfg = SceneConfig(image_size=size, n_views=ctx.n_views)
    return render_views(max(2, ctx.batch), cfg, seed=ctx.seed, device=ctx.module.device)


@register_check("probe_step")
def _check_probe_step(ctx: CheckContext) -> list[str]:
    """A generic tool runs unchanged: one joint training step of linear pointmap probes at every
    probe site (``mv_interp.probes``) moves every probe's weights and gives finite pointmaps of the
    input's size for every site and view."""
    from .probes import ProbeSet, TrainConfig, train_probes

    views = _rendered_views(ctx)
    cfg = TrainConfig(probes=("linear",), steps=1, batch_size=len(views[0]["img"]), checkpoint_every=10_000)
    before = ProbeSet.for_model(ctx.model, ctx.module.probe_sites(n_views=ctx.n_views),
                                _probe_specs(cfg), seed=cfg.seed, n_views=ctx.n_views)
    probes = train_probes(ctx.model, cfg, data=views, progress=False)
    fails = []
    old, new = before.state_dict(), probes.state_dict()
    unchanged = [k for k in new if k in old and torch.equal(old[k], new[k]) and old[k].is_floating_point()]
    if set(new) != set(old):
        fails.append(f"the trained probe set's parameters {sorted(set(new) ^ set(old))[:4]} differ from a fresh one's")
    if unchanged:
        fails.append(f"one probe step left {len(unchanged)} parameter tensors unchanged, e.g. {unchanged[:3]}")
    with torch.no_grad():
        outs = probes.run(ctx.model, *[v["img"] for v in views])
    H, W = views[0]["img"].shape[-2:]
    expected = {site.name for site in ctx.module.probe_sites(n_views=ctx.n_views)}
    got = outs.get("linear", {})
    if set(got) != expected:
        fails.append(f"probe outputs cover sites {sorted(set(got) ^ expected)[:5]} differently from probe_sites()")
    for site, o in got.items():
        pts = o["pts3d"]
        if tuple(pts.shape[-3:-1]) != (H, W) or not bool(torch.isfinite(pts).all()):
            fails.append(f"probe at {site}: output {tuple(pts.shape)} is not a finite {H}x{W} pointmap")
    return fails


def _probe_specs(cfg: Any) -> list:
    from .probes import probe_spec

    return [probe_spec(p) for p in cfg.probes]


@register_check("head_scores")
def _check_head_scores(ctx: CheckContext) -> list[str]:
    """A generic tool runs unchanged: ``mv_interp.heads.score_heads`` scores every head of every
    declared attention site (correspondence, register, local) on rendered views, with masses in [0, 1]."""
    from .heads import score_heads

    views = _rendered_views(ctx)
    scores = score_heads(ctx.model, views, batch_size=len(views[0]["img"]))
    rows = scores.table()
    fails = []
    sites = ctx.module.attention_sites(n_views=ctx.n_views)
    scored = {r["site"] for r in rows}
    missing = [s.name for s in sites if s.name not in scored]
    if missing:
        fails.append(f"no head scores for attention sites {missing[:5]}")
    for s in sites:
        n = len({r["head"] for r in rows if r["site"] == s.name})
        if s.name in scored and n != s.n_heads:
            fails.append(f"{s.name}: scored {n} heads, the site declares {s.n_heads}")
    for r in rows:
        for key in ("block_mass", "register_mass", "local_mass"):
            val = r.get(key)
            if isinstance(val, float) and not math.isnan(val) and not -1e-4 <= val <= 1 + 1e-4:
                fails.append(f"{r['site']} head {r['head']}: {key} = {val:.4g} is not a probability mass")
    return fails[:20]


@register_check("cache_algebra")
def _check_cache_algebra(ctx: CheckContext) -> list[str]:
    """The cache algebra works from the declared sites: per view, the embedding and every sublayer
    output sum back to the final residual (also split into heads through the out-projection), and
    through ``resid_norm`` (scale frozen) plus its bias they give the heads' input (``head_input_hook``;
    that part is left out for models whose heads do not read one normed residual and say so by
    raising ``NotImplementedError``)."""
    m = ctx.module
    cache = m._make_cache(ctx.cache(), ctx.inputs)
    fails: list[str] = []
    for view in range(1, ctx.n_views + 1):
        resid, labels = cache.accumulated_resid(view=view, return_labels=True)
        parts = cache.decompose_resid(view=view)
        ok, ratio = _close(parts.sum(0), resid[-1], rtol=1e-5, atol=1e-5)
        if not ok:
            fails.append(f"view {view}: decompose_resid does not sum to the final residual {labels[-1]} "
                         f"({ratio:.2g}× the tolerance); are all sublayer outputs declared as '*_out' probe sites?")
        sites = cache._sites(view, "dec")
        attn_outs = [s.name for s in sites if s.kind in ("self_out", "cross_out")]
        split = cache._attention_of_outputs(view, sites)
        if sorted(split) != sorted(attn_outs):
            fails.append(f"view {view}: attention outputs {sorted(set(attn_outs) - set(split))[:4]} have no attention "
                         "site (same layer) to split them into heads")
        heads = cache.decompose_resid(view=view, split_heads=True)
        ok, ratio = _close(heads.sum(0), resid[-1], rtol=1e-5, atol=1e-5)
        if not ok:
            fails.append(f"view {view}: the heads' contributions through the out-projection (plus its bias) do not "
                         f"sum to the attention outputs ({ratio:.2g}× the tolerance)")
        try:
            norm, hook = m.resid_norm(view), m.head_input_hook(view)
        except NotImplementedError:
            continue  # heads that do not read one normed residual (VGGT's DPT reads two): nothing to compare
        from .cache import final_resid_site, norm_bias

        site = final_resid_site(m, view, ctx.n_views)
        normed = cache.apply_ln_to_stack(parts, view=view)
        ok, ratio = _close(normed.sum(0) + norm_bias(norm, normed[0]), view_tokens(cache[hook], site, ctx.n_views))
        if not ok:
            fails.append(f"view {view}: the components through resid_norm(view) plus its bias differ from "
                         f"{hook} ({ratio:.2g}× the tolerance)")
    return fails


@register_check("bwd_hooks")
def _check_bwd_hooks(ctx: CheckContext, n_exact: int = 2) -> list[str]:
    """Backward hooks fire on every hook point the output depends on, with the gradient autograd
    gives for the hook's output (checked exactly on a few hooks), and equal to
    ``run_with_cache(incl_bwd=True)``'s ``*_grad`` entries."""
    m = ctx.module
    names = ctx.order()
    metric = _grad_metric
    got: dict[str, Tensor] = {}
    needs: set[str] = set()

    def fwd(x: Tensor, hook: Any) -> None:
        if isinstance(x, Tensor) and x.requires_grad and not _is_read_only(m, hook.name):
            needs.add(hook.name)

    def bwd(g: Tensor, hook: Any) -> None:
        got.setdefault(hook.name, g.detach().clone())

    one = tuple(v[:1] for v in ctx.inputs)  # a batch of one keeps DPT heads' backward cheap
    inputs = tuple(v.clone().requires_grad_(True) for v in one)
    with m.hooks([(n, fwd) for n in names], bwd_hooks=[(n, bwd) for n in names]):
        loss = metric(m.view_outputs(m(*inputs)))
        torch.autograd.grad(loss, inputs)
    fails = []
    silent = sorted(needs - set(got), key=names.index)
    if silent:
        fails.append(f"backward hooks did not fire on {len(silent)} hook(s) the output depends on, e.g. {silent[:4]}")
    step = max(1, len(names) // n_exact)
    for name in [n for n in names[::step] if n in got][:n_exact]:
        leaf: list[Tensor] = []

        def cut(x: Tensor, hook: Any) -> Tensor:
            leaf.append(x.detach().requires_grad_(True))
            return leaf[-1]

        with torch.enable_grad(), m.hooks([(name, cut)]):
            loss = metric(m.view_outputs(m(*one)))
            (want,) = torch.autograd.grad(loss, leaf[:1], allow_unused=True)
        want = torch.zeros_like(got[name]) if want is None else want
        ok, ratio = _close(got[name], want, rtol=1e-4, atol=1e-5)
        if not ok:
            fails.append(f"{name}: the backward hook's gradient differs from autograd's ({ratio:.2g}× the tolerance)")
    _, cache = m.run_with_cache(*one, incl_bwd=True, metric=metric)
    for name, g in got.items():
        ok, ratio = _close(cache[name + "_grad"], g, rtol=1e-4, atol=1e-5)
        if not ok:
            fails.append(f"{name}: run_with_cache(incl_bwd=True) and the backward hook disagree ({ratio:.2g}×)")
    return fails[:20]


def _grad_metric(outs: Any) -> Tensor:
    # every floating output of every view, so every hook on the way to an output gets a gradient
    return sum(t.float().mean() for o in outs for t in o.values() if isinstance(t, Tensor) and t.is_floating_point())


@register_check("attribution")
def _check_attribution(ctx: CheckContext) -> list[str]:
    """Gradient-based tools run unchanged: direct pointmap attribution of each view sums, to first
    order, to the pointmap change against a slightly perturbed run; attribution patching fills
    every cell of the patching sweep's layout with finite values."""
    from .interventions import attribution_patching, direct_pointmap_attribution, sweep_cells

    g = torch.Generator().manual_seed(ctx.seed + 7)
    one = tuple(v[:1] for v in ctx.inputs)  # a batch of one keeps DPT heads cheap
    near = tuple(v + 1e-3 * torch.randn(v.shape, generator=g).to(v) for v in one)
    fails = []
    try:
        ctx.module.resid_norm(ctx.n_views), ctx.module.head_input_hook(ctx.n_views)
        dpa_views: tuple[int, ...] = (ctx.n_views,)  # a view whose points are placed in another view's frame
    except NotImplementedError:
        dpa_views = ()  # the heads do not read one normed residual: no direct attribution to check
    for view in dpa_views:
        dpa = direct_pointmap_attribution(ctx.model, one, view=view, reference=near, heads=False)
        err = dpa.relative_error
        if not err < 0.05:
            fails.append(f"view {view}: the direct attributions against a run perturbed by 1e-3 miss the pointmap "
                         f"change by {err:.3g} (relative); the final norm or head input may be misdeclared")
    sweep = attribution_patching(ctx.model, ctx.inputs, ctx.other_inputs, per="site", normalize=False)
    _, _, _, hooks, cells = sweep_cells(ctx.model, "site", n_views=ctx.n_views)
    filled = int(torch.isfinite(sweep.raw).sum())
    if filled != len(cells):
        fails.append(f"attribution patching filled {filled} cells, the sweep has {len(cells)}")
    return fails
