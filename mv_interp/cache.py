"""TransformerLens-style cache algebra on the multi-view residual stream, and gradient caches.

The residual stream of view ``v`` is what the model's probe sites declare
(``model.probe_sites(sublayers=True)``): the decoder input (``kind="dec_in"``, the embedding),
then per block the residual after every skip connection (``"self"``, ``"cross"``, ``"mlp"``)
and the sublayer outputs added there (``"self_out"``, ``"cross_out"``, ``"mlp_out"``).
Everything here is built from those declarations and the model's ``act_name``,
``attention_sites``, ``attention_out_proj`` and ``resid_norm``, so it works unchanged on every
family (DUSt3R, MASt3R, Fast3R, and any adapter that passes ``check_adapter``).

Example::

    out, cache = model.run_with_cache(img1, img2)
    resid, labels = cache.accumulated_resid(view=2, return_labels=True)   # [site, batch, pos, d]
    parts, labels = cache.decompose_resid(view=2, return_labels=True)     # sums to the final residual
    heads, labels = cache.stack_head_results(layer=2, view=2, return_labels=True)
    normed = cache.apply_ln_to_stack(parts, view=2)                       # as the head's norm reads them
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from einops import einsum, rearrange
from torch import Tensor, nn

from .sites import AttentionSite, ProbeSite, view_tokens

if TYPE_CHECKING:  # annotations only: the adapters sit above this module
    from .adapters.base import MultiViewModel

#: sublayer-output kinds of the probe sites and the residual kind each one is added into
SUBLAYER_OUT = {"self_out": "self", "cross_out": "cross", "mlp_out": "mlp"}
#: ``decompose_resid(mode=...)`` values and the sublayer kinds they keep
DECOMPOSE_MODES = {"all": ("self", "cross", "mlp"), "attn": ("self", "cross"), "mlp": ("mlp",)}


class CacheAlgebra:
    """Cache algebra mixed into :class:`~mv_interp.hooks.ActivationCache` (see the module docstring).

    Shapes: one view's tokens are ``[batch, pos, d_model]``; stacks put the component axis
    first (``[component, batch, pos, d_model]``). After :meth:`remove_batch_dim` the batch
    axis is gone from results too.
    """

    _store: dict[str, Tensor]
    _name_fn: Callable[..., str] | None
    _model: Any
    batch_size: int | None
    n_views: int | None
    has_batch_dim: bool
    _squeezed: frozenset = frozenset()

    # -- plumbing -------------------------------------------------------------------------
    def _module(self) -> Any:
        if self._model is None:
            raise ValueError("this cache has no model: the cache algebra reads the model's declared sites; "
                             "make the cache with model.run_with_cache(...)")
        return self._model

    def _nv(self) -> int:
        return self.n_views or self._module().default_n_views()

    def _derive(self, store: dict[str, Tensor], **changes: Any) -> Any:
        kw = dict(model=self._model, batch_size=self.batch_size, n_views=self.n_views, has_batch_dim=self.has_batch_dim)
        squeezed = changes.pop("squeezed", self._squeezed)
        kw.update(changes)
        new = type(self)(store, self._name_fn, **kw)
        new._squeezed = frozenset(squeezed)
        return new

    def _act(self, name: str) -> Tensor:
        t = self[name]  # type: ignore[index]
        return t.unsqueeze(0) if name in self._squeezed else t

    def _out(self, t: Tensor, batch_axis: int = 1) -> Tensor:
        return t if self.has_batch_dim else t.squeeze(batch_axis)

    def _sites(self, view: int, stack: str) -> list[Any]:
        module = self._module()
        nv = self._nv()
        if not 1 <= view <= nv:
            raise IndexError(f"view {view} out of range for a forward on {nv} views (valid: 1..{nv})")
        sites = module.probe_sites(encoder_blocks=stack == "enc", sublayers=True, n_views=nv)
        mine = sorted((s for s in sites if s.view == view and s.stack == stack and s.kind != "enc_out"),
                      key=lambda s: s.order)
        if not mine:
            raise ValueError(f"{type(module).__name__} declares no residual sites of stack {stack!r}; "
                             f"stacks: {sorted({s.stack for s in sites})}")
        return mine

    def _tokens(self, site: Any) -> Tensor:
        try:
            act = self._act(site.hook)
        except KeyError:
            raise KeyError(f"{site.hook!r} ({site.name}) is not in this cache; the cache algebra needs every residual "
                           "and sublayer-output hook: run_with_cache without names_filter, or include "
                           "'*hook_resid*', '*_out' and '*hook_z'") from None
        return view_tokens(act, site, self._nv())

    def _finish(self, out: Tensor, labels: list[str], apply_ln: bool, layer: int, view: int, stack: str,
                return_labels: bool, recompute_ln: bool = False) -> Any:
        # ``out`` is [component, batch, pos, d] (batch restored); drop the batch axis again if the cache has none
        if apply_ln:
            out = self._ln(out, layer, view, None, recompute_ln, stack)
        out = self._out(out)
        return (out, labels) if return_labels else out

    def _depth(self, sites: Sequence[Any]) -> int:
        return max(s.layer for s in sites) + 1

    def _check_layer(self, layer: int | None, sites: Sequence[Any]) -> int:
        depth = self._depth(sites)
        if layer is None:
            return depth
        if not 0 <= layer <= depth:
            raise IndexError(f"layer {layer} out of range (valid: 0..{depth}; {depth} or None = after the last block)")
        return layer

    # -- the residual stream --------------------------------------------------------------
    def accumulated_resid(self, layer: int | None = None, view: int = 1, incl_mid: bool = True,
                          apply_ln: bool = False, return_labels: bool = False, stack: str = "dec"):
        """The residual stream of ``view`` after every skip connection, in execution order.

        ``layer``: stop before block ``layer`` (``None``: through the last block, TransformerLens
        semantics). ``incl_mid``: also the residuals inside a block (after self- and
        cross-attention); otherwise the stack input and each block's output. ``apply_ln``: pass
        each residual through the norm that reads the stream at ``layer`` (the heads' final norm
        for ``None``), with its own statistics — the 3D logit lens's input. Labels are the probe
        site names (``"dec_in.v2"``, ``"dec0.self.v2"``, …). Returns ``[site, batch, pos, d]``.
        """
        sites = self._sites(view, stack)
        layer = self._check_layer(layer, sites)
        resid = [s for s in sites if s.is_residual and s.layer < layer]
        if not incl_mid:
            last = {}
            for s in resid:
                last[s.layer] = s
            resid = list(last.values())
        return self._finish(torch.stack([self._tokens(s) for s in resid]), [s.name for s in resid], apply_ln, layer,
                            view, stack, return_labels, recompute_ln=True)

    def decompose_resid(self, layer: int | None = None, view: int = 1, mode: str = "all", incl_embeds: bool = True,
                        split_heads: bool = False, apply_ln: bool = False, return_labels: bool = False,
                        stack: str = "dec"):
        """The residual of ``view`` read by block ``layer`` (``None``: the final one), as the sum of
        what wrote it: the embedding (the stack input) and every self-attention, cross-attention
        and MLP output before it.

        ``mode``: ``"all"``, ``"attn"`` or ``"mlp"``. ``split_heads``: each attention output as its
        heads' contributions plus the out-projection bias (see :meth:`stack_head_results`).
        ``apply_ln``: through the norm that reads the stream there, its scale frozen from the
        actual residual (:meth:`apply_ln_to_stack`). With ``mode="all"`` and ``incl_embeds`` the
        components sum to the residual (to float rounding). Returns ``[component, batch, pos, d]``.
        """
        if mode not in DECOMPOSE_MODES:
            raise ValueError(f"mode must be one of {sorted(DECOMPOSE_MODES)}, got {mode!r}")
        sites = self._sites(view, stack)
        layer = self._check_layer(layer, sites)
        embeds = [s for s in sites if s.is_residual and s.layer < 0]
        outs = [s for s in sites if s.kind in SUBLAYER_OUT and s.layer < layer]
        if not outs and layer > 0:
            raise ValueError(f"{type(self._module()).__name__} declares no sublayer-output sites for stack {stack!r}: "
                             "decompose_resid needs probe sites of kinds " + ", ".join(SUBLAYER_OUT))
        parts: list[Tensor] = []
        labels: list[str] = []
        if incl_embeds:
            for s in embeds:
                parts.append(self._tokens(s))
                labels.append(s.name)
        keep = DECOMPOSE_MODES[mode]
        heads_by_out = self._attention_of_outputs(view, sites) if split_heads else {}
        for s in outs:
            if SUBLAYER_OUT[s.kind] not in keep:
                continue
            att = heads_by_out.get(s.name)
            if att is not None:
                h, hl = self._head_results(att, s, view, incl_bias=True)
                parts.extend(h.unbind(0))
                labels.extend(hl)
            else:
                parts.append(self._tokens(s))
                labels.append(s.name)
        return self._finish(torch.stack(parts), labels, apply_ln, layer, view, stack, return_labels)

    def stack_activation(self, activation_name: str, layer: int | None = None, view: int | None = None,
                         stack: str | None = None, return_labels: bool = False):
        """``activation_name`` (a short name for ``model.act_name``, e.g. ``"resid_post"``,
        ``"cross_pattern"``) of every block before ``layer`` stacked on a new leading axis."""
        module = self._module()
        names, labels = [], []
        limit = layer if layer is not None else 1 << 16
        for i in range(limit):
            try:
                names.append(module.act_name(activation_name, i, view=view, stack=stack))
            except IndexError:
                if layer is not None:
                    raise
                break
            labels.append(i)
        out = torch.stack([self[n] for n in names])  # type: ignore[index]
        return (out, labels) if return_labels else out

    # -- heads ----------------------------------------------------------------------------
    def _attention_of_outputs(self, view: int, sites: Sequence[Any]) -> dict[str, Any]:
        """``{attention-output probe site name: the attention site writing it}`` for ``view``.

        Matched by layer (and by kind where a layer has both self- and cross-attention): models
        may call the sublayer where views meet ``"cross"`` in their probe sites and ``"self"``
        in their attention sites (joint attention over all views)."""
        outs = [s for s in sites if s.kind in ("self_out", "cross_out")]
        stack = outs[0].stack if outs else "dec"
        found = {}
        for a in self._module().attention_sites(n_views=self._nv()):
            if a.stack != stack or not (a.query_view == view or (a.query_view == 0 and view in a.key_views)):
                continue
            cands = [o for o in outs if o.layer == a.layer]
            if len(cands) > 1:
                cands = [o for o in cands if SUBLAYER_OUT[o.kind] == a.kind]
            if len(cands) != 1:
                raise ValueError(f"cannot tell which attention output probe site of layer {a.layer} attention site "
                                 f"{a.name} writes (candidates: {[o.name for o in cands]})")
            found[cands[0].name] = a
        return found

    def _head_results(self, att: Any, out_site: Any, view: int, incl_bias: bool) -> tuple[Tensor, list[str]]:
        proj = attention_out_proj(self._module(), att)
        z = view_tokens(self._act(att.z_hook), out_site, self._nv())  # [batch, pos, head, d_head]
        w = rearrange(proj.weight, "d_model (head d_head) -> head d_head d_model", head=z.shape[-2])
        res = einsum(z.to(w.dtype), w, "batch pos head d_head, head d_head d_model -> head batch pos d_model")
        label = f"{out_site.stack}{out_site.layer}.{SUBLAYER_OUT[out_site.kind]}.v{view}"
        labels = [f"{label}.h{h}" for h in range(res.shape[0])]
        if incl_bias:
            bias = proj.bias if proj.bias is not None else torch.zeros_like(res[0, 0, 0])
            res = torch.cat([res, bias.expand_as(res[0]).unsqueeze(0)])
            labels.append(f"{label}.bias")
        return res, labels

    def stack_head_results(self, layer: int | None = None, view: int = 1, kinds: Sequence[str] | None = None,
                           incl_bias: bool = False, apply_ln: bool = False, return_labels: bool = False,
                           stack: str = "dec"):
        """Every head's contribution to the residual of ``view``: its slice of ``hook_z`` through
        its rows of the out-projection, for attention layers before ``layer`` (``None``: all).

        The heads of one layer plus its out-projection bias (``incl_bias`` adds it as a
        ``".bias"`` entry) sum to the layer's attention output. Labels
        ``"dec1.cross.v2.h3"``. Returns ``[head, batch, pos, d_model]``.
        """
        sites = self._sites(view, stack)
        layer = self._check_layer(layer, sites)
        by_name = {s.name: s for s in sites}
        pairs = [(by_name[o], a) for o, a in self._attention_of_outputs(view, sites).items()]
        have = sorted({SUBLAYER_OUT[o.kind] for o, _ in pairs})
        if kinds is not None and set(kinds) - set(have):
            raise ValueError(f"kinds {sorted(set(kinds) - set(have))} have no attention sites; valid kinds: {have}")
        parts, labels = [], []
        for out_site, att in sorted(pairs, key=lambda p: p[0].order):
            if out_site.layer >= layer or (kinds is not None and SUBLAYER_OUT[out_site.kind] not in kinds):
                continue
            h, hl = self._head_results(att, out_site, view, incl_bias)
            parts.append(h)
            labels.extend(hl)
        if not parts:
            raise ValueError(f"no attention layer before layer {layer} for view {view}")
        return self._finish(torch.cat(parts), labels, apply_ln, layer, view, stack, return_labels)

    # -- norms ----------------------------------------------------------------------------
    def apply_ln_to_stack(self, residual_stack: Tensor, layer: int | None = None, view: int = 1,
                          kind: str | None = None, recompute_ln: bool = False, stack: str = "dec") -> Tensor:
        """Pass a stack ``[..., batch, pos, d]`` through the norm that reads ``view``'s residual at
        sublayer ``kind`` of block ``layer`` (default: its first sublayer; ``layer=None``: the
        norm in front of the heads), as ``model.resid_norm`` declares.

        Components (default): centred, divided by the scale of the *actual* residual read there
        (from this cache) and multiplied by the norm's weight, so they stay additive: their sum
        plus the norm's bias is the norm's output. ``recompute_ln=True``: each entry is a full
        residual and gets the whole norm with its own statistics (weight and bias).
        """
        x = residual_stack if self.has_batch_dim else residual_stack.unsqueeze(-3)
        out = self._ln(x, layer, view, kind, recompute_ln, stack)
        return out if self.has_batch_dim else out.squeeze(-3)

    def _ln(self, x: Tensor, layer: int | None, view: int, kind: str | None, recompute_ln: bool,
            stack: str) -> Tensor:
        """:meth:`apply_ln_to_stack` on a stack that has its batch axis."""
        module = self._module()
        sites = self._sites(view, stack)
        depth = self._depth(sites)
        layer = None if layer is None or layer == depth else self._check_layer(layer, sites)
        resid = [s for s in sites if s.is_residual]
        if layer is None:
            read, kind = resid[-1], None
        else:
            block = [s for s in resid if s.layer == layer]
            kinds = [s.kind for s in block]
            kind = kind or kinds[0]
            if kind not in kinds:
                raise ValueError(f"block {layer} has no {kind!r} sublayer; its sublayers: {kinds}")
            read = resid[resid.index(block[kinds.index(kind)]) - 1]
        norm = module.resid_norm(view, layer, kind)
        return norm(x) if recompute_ln else frozen_norm(norm, x, self._tokens(read))

    # -- batch ----------------------------------------------------------------------------
    def _leading(self, t: Tensor) -> int:
        """How many blocks of ``batch_size`` rows the leading axis holds (1, or views stacked)."""
        b = self.batch_size
        n = t.shape[0] if t.ndim else 0
        if b is None:
            raise ValueError("this cache does not know its batch size; make it with model.run_with_cache(...)")
        if n == b:
            return 1
        if b and n % b == 0 and n > b:
            return n // b
        raise ValueError(f"an activation of leading size {n} matches neither the batch ({b}) nor views × batch")

    def remove_batch_dim(self) -> Any:
        """A cache without the batch axis (batch size 1 only). Hooks that stack views on the batch
        axis keep a leading view axis (``[views, pos, d]``)."""
        if not self.has_batch_dim:
            return self
        if self.batch_size != 1:
            raise ValueError(f"remove_batch_dim needs a batch of one, this cache has batch size {self.batch_size}; "
                             "take one example first with cache.apply_slice_to_batch_dim(i)")
        store, squeezed = {}, set()
        for k, t in self._store.items():
            if self._leading(t) == 1:
                store[k], _ = t.squeeze(0), squeezed.add(k)
            else:
                store[k] = t
        return self._derive(store, has_batch_dim=False, squeezed=squeezed)

    def apply_slice_to_batch_dim(self, batch_slice: int | slice | Sequence[int] | Tensor) -> Any:
        """The cache for some examples only: an int (then the batch axis is removed, as in
        TransformerLens), a slice, or indices. Views stacked on the batch axis are sliced per view."""
        if not self.has_batch_dim:
            raise ValueError("this cache has no batch axis left to slice")
        b = self.batch_size
        if b is None:
            raise ValueError("this cache does not know its batch size; make it with model.run_with_cache(...)")
        single = isinstance(batch_slice, int)
        if single:
            if not -b <= batch_slice < b:
                raise IndexError(f"example {batch_slice} out of range for batch size {b}")
            idx = torch.tensor([batch_slice % b])
        elif isinstance(batch_slice, slice):
            idx = torch.arange(b)[batch_slice]
        else:
            idx = torch.as_tensor(batch_slice, dtype=torch.long)
            if idx.numel() and not (-b <= int(idx.min()) and int(idx.max()) < b):
                raise IndexError(f"indices {idx.tolist()} out of range for batch size {b}")
        store = {}
        for k, t in self._store.items():
            blocks = self._leading(t)
            i = idx.to(t.device)
            store[k] = t.unflatten(0, (blocks, b))[:, i].flatten(0, 1)
        new = self._derive(store, batch_size=len(idx))
        return new.remove_batch_dim() if single else new


# --------------------------------------------------------------------------------------
# Helpers the rest of the library shares
# --------------------------------------------------------------------------------------


def frozen_norm(norm: nn.Module, parts: Tensor, resid: Tensor) -> Tensor:
    """``norm`` applied linearly to ``parts`` (``[..., batch, pos, d]``) with the statistics of
    ``resid`` (``[batch, pos, d]``, the full residual the norm actually reads): their sum plus the
    norm's bias is ``norm(resid)`` when the parts sum to ``resid``. The bias is left out."""
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "eps", None)
    r = resid.to(parts.dtype)
    if isinstance(norm, nn.LayerNorm):
        scale = (r.var(dim=-1, unbiased=False, keepdim=True) + norm.eps).sqrt()
        out = (parts - parts.mean(dim=-1, keepdim=True)) / scale
    elif type(norm).__name__ == "RMSNorm":
        eps = eps if eps is not None else torch.finfo(r.dtype).eps
        out = parts / (r.pow(2).mean(dim=-1, keepdim=True) + eps).sqrt()
    else:
        raise TypeError(f"cannot linearise a {type(norm).__name__}: apply_ln_to_stack handles LayerNorm and RMSNorm")
    return out * weight if weight is not None else out


def norm_bias(norm: nn.Module, like: Tensor) -> Tensor:
    """The norm's additive bias broadcast like ``like`` (zeros when it has none)."""
    bias = getattr(norm, "bias", None)
    return bias.expand_as(like) if bias is not None else torch.zeros_like(like)


def final_resid_site(module: MultiViewModel, view: int, n_views: int) -> ProbeSite:
    """The probe site of ``view``'s last decoder residual (what the heads' final norm reads)."""
    sites = [s for s in module.probe_sites(n_views=n_views) if s.view == view and s.stack == "dec" and s.is_residual]
    if not sites:
        raise ValueError(f"{type(module).__name__} declares no decoder residual site for view {view}")
    return max(sites, key=lambda s: s.order)


def attention_out_proj(module: MultiViewModel, site: AttentionSite) -> nn.Linear:
    """The out-projection of an attention site: what the model declares (``attention_out_proj``),
    else the ``proj`` Linear of the module holding ``site.z_hook``."""
    own = getattr(type(module), "attention_out_proj", None)
    if own is not None:
        return module.attention_out_proj(site)
    path = site.z_hook.rsplit(".", 1)[0]
    proj = getattr(module.get_submodule(path), "proj", None)
    if not isinstance(proj, nn.Linear):
        raise TypeError(f"{type(module).__name__}: no nn.Linear 'proj' next to {site.z_hook}; declare "
                        "attention_out_proj(site) on the model to name the out-projection")
    return proj


def _detach_tree(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, dict):
        return {k: _detach_tree(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_detach_tree(v) for v in x)
    return x


def scalar_metric(module: MultiViewModel, output: Any, metric: Callable[[Any], Tensor]) -> Tensor:
    """``metric`` on ``view_outputs(output)`` as one differentiable number (the mean over examples)."""
    value = metric(module.view_outputs(output))
    if not isinstance(value, Tensor):
        raise TypeError(f"metric must return a tensor (a scalar or one value per example), got {type(value).__name__}")
    return value.float().mean()


def run_with_cache_and_grads(module: MultiViewModel, args: Sequence[Any], kwargs: dict, names_filter: Any,
                             metric: Callable[[Any], Tensor] | None, device: Any) -> tuple[Any, Any]:
    """``run_with_cache(..., incl_bwd=True)``: one forward and one backward of ``metric``."""
    if metric is None:
        raise ValueError("run_with_cache(incl_bwd=True) needs metric=: a function of the per-view outputs "
                         "(model.view_outputs(out)) giving the number to differentiate, e.g. "
                         "metric=lambda outs: outs[1]['pts3d'][..., 2].mean()")
    names = module._resolve(names_filter)
    acts: dict[str, Tensor] = {}

    def grab(x: Tensor, hook: Any) -> Tensor:
        # a fresh node per hook: the gradient with respect to this hook's output alone (as a bwd hook
        # sees it); in a frozen model the activation becomes a leaf so it still gets one
        if x.requires_grad:
            y = x.view_as(x)
        elif x.is_floating_point():
            y = x.detach().requires_grad_(True)
        else:
            y = x
        acts[hook.name] = y
        return y

    with torch.enable_grad(), module.hooks([(n, grab) for n in names]):
        out = module(*args, **kwargs)
        loss = scalar_metric(module, out, metric)
        if not loss.requires_grad:
            raise ValueError("the metric does not depend on the model's output through anything differentiable")
        wanted = [n for n, t in acts.items() if t.requires_grad]
        grads = torch.autograd.grad(loss, [acts[n] for n in wanted], allow_unused=True)
    move = (lambda t: t.to(device)) if device is not None else (lambda t: t)
    store = {n: move(t.detach()) for n, t in acts.items()}
    for n, g in zip(wanted, grads):
        store[n + "_grad"] = move(g.detach() if g is not None else torch.zeros_like(acts[n]).detach())
    return _detach_tree(out), module._make_cache(store, args)
