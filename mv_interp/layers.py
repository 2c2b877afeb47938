"""Building blocks shared by the CroCo-family models (DUSt3R, MASt3R, Fast3R).

Clean-room re-implementation from the facts in DESIGN.md: patch embedding, RoPE2D,
self- and cross-attention with hook points on q/k/v, scores, pattern and z,
pre-LN encoder and decoder blocks, and the linear / DPT heads with DUSt3R's
post-processing. Module and parameter names mirror the official checkpoints so
their state dicts load with ``strict=True``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor, nn

from .hooks import HookPoint

# --------------------------------------------------------------------------------------
# Positions and RoPE2D
# --------------------------------------------------------------------------------------


def patch_positions(h: int, w: int, device: torch.device | str | None = None) -> Int[Tensor, "pos 2"]:
    """(y, x) of every token on an ``h × w`` patch grid, row-major (token n at (n // w, n % w))."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=-1)


def rope2d_cos_sin(pos: Int[Tensor, "pos 2"], d_head: int, base: float = 100.0) -> tuple[Tensor, Tensor]:
    """cos/sin tables ``[pos, d_head]`` for RoPE2D; the first half of a head encodes y, the second x.

    Within a half of size ``D' = d_head / 2`` the frequency of pair ``(j, j + D'/2)`` is
    ``base ** (-2j / D')``. Angles are computed in fp32 whatever the activation dtype.
    """
    if d_head % 4:
        raise ValueError(f"RoPE2D needs a head dimension divisible by 4, got d_head={d_head}")
    half = d_head // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, device=pos.device).float() / half))
    cos, sin = [], []
    for axis in (0, 1):
        ang = pos[:, axis].float()[:, None] * inv_freq[None, :]
        ang = torch.cat([ang, ang], dim=-1)
        cos.append(ang.cos())
        sin.append(ang.sin())
    return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


def _rotate_half(u: Tensor) -> Tensor:
    u1, u2 = u.chunk(2, dim=-1)
    return torch.cat([-u2, u1], dim=-1)


def apply_rope2d(
    x: Float[Tensor, "batch head pos d_head"], cos: Float[Tensor, "pos d_head"], sin: Float[Tensor, "pos d_head"]
) -> Float[Tensor, "batch head pos d_head"]:
    """Rotate each half of every head (y half, x half) with its own rotate-half RoPE."""
    half = x.shape[-1] // 2
    out = []
    for i in range(2):
        u = x[..., i * half : (i + 1) * half].float()
        c, s = cos[:, i * half : (i + 1) * half], sin[:, i * half : (i + 1) * half]
        out.append(u * c + _rotate_half(u) * s)
    return torch.cat(out, dim=-1).to(x.dtype)


def _is_fake(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "meta" or is_fake(t)


class RoPE2D(nn.Module):
    """RoPE2D with a cache of cos/sin tables per (grid, device)."""

    def __init__(self, base: float = 100.0):
        super().__init__()
        self.base = base
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def tables(self, pos: Int[Tensor, "pos 2"], d_head: int) -> tuple[Tensor, Tensor]:
        if torch.compiler.is_compiling() or _is_fake(pos):
            # compiled: the key would read tensor values (a graph break); the tables fold into the graph.
            # Shape inference (model.scan / hook_shapes): no values to key a cache on
            return rope2d_cos_sin(pos, d_head, self.base)
        key = (pos.device, d_head, tuple(pos.shape), int(pos[:, 0].max()), int(pos[:, 1].max()), int(pos.sum()))
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = rope2d_cos_sin(pos, d_head, self.base)
        return hit

    def forward(self, x: Tensor, pos: Int[Tensor, "pos 2"]) -> Tensor:
        cos, sin = self.tables(pos, x.shape[-1])
        return apply_rope2d(x, cos, sin)


# --------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------


_ATTN_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_attn_scores", "hook_pattern", "hook_z")
_QK_NORM_HOOKS = ("hook_q_normed", "hook_k_normed")


def add_attention_hooks(module: nn.Module, qk_norm: bool = False) -> None:
    """Give ``module`` the hook points of one attention call (see :class:`AttentionCore`)."""
    for name in _ATTN_HOOKS + (_QK_NORM_HOOKS if qk_norm else ()):
        setattr(module, name, HookPoint())


class AttentionHooks(nn.Module):
    """The hook points of one attention call, without parameters.

    For a layer whose weights run several times per forward (VGGT's camera trunk, once per
    refinement iteration): each call gets its own :class:`AttentionHooks`, so every hook still
    runs once per forward. Pass it as ``hooks=`` to :meth:`AttentionCore.attend`.
    """

    def __init__(self, qk_norm: bool = False):
        super().__init__()
        add_attention_hooks(self, qk_norm)


class AttentionCore(nn.Module):
    """q/k/v (already split into heads) → per-head output z, with every hook on the path.

    Hooks: ``hook_q``/``hook_k``/``hook_v`` [batch, head, pos, d_head] as projected,
    ``hook_q_normed``/``hook_k_normed`` after the qk-norm (only with ``qk_norm_dim``),
    ``hook_rot_q``/``hook_rot_k`` after RoPE (what the softmax sees), ``hook_attn_scores``
    [batch, head, q_pos, k_pos] (pre-softmax, scaled), ``hook_pattern`` (post-softmax),
    ``hook_z`` [batch, q_pos, head, d_head].

    The fused SDPA kernel is used unless a score/pattern hook is active (a torch hook,
    an nnsight read, or ``force_eager``); the two paths agree to fp32 rounding. Patterns of a
    few queries alone come from :func:`query_patterns` without leaving SDPA.

    ``qk_norm_dim``: one ``LayerNorm(d_head)`` each for q and k (``q_norm``/``k_norm``, shared
    by all heads) applied before RoPE, as VGGT does. ``hooks=False`` builds the weights alone,
    for layers whose calls each pass their own :class:`AttentionHooks`.
    """

    force_eager: bool = False

    def __init__(self, n_heads: int, rope: RoPE2D | None, scale: float | None = None,
                 qk_norm_dim: int | None = None, qk_norm_eps: float = 1e-5, hooks: bool = True):
        super().__init__()
        self.n_heads = n_heads
        self.rope = rope
        #: logit scale; ``None`` is the usual ``d_head ** -0.5``
        self.scale = scale
        self.q_norm = nn.LayerNorm(qk_norm_dim, eps=qk_norm_eps) if qk_norm_dim else None
        self.k_norm = nn.LayerNorm(qk_norm_dim, eps=qk_norm_eps) if qk_norm_dim else None
        if hooks:
            add_attention_hooks(self, qk_norm=bool(qk_norm_dim))

    def needs_pattern(self, hooks: nn.Module | None = None) -> bool:
        h = self if hooks is None else hooks
        return self.force_eager or h.hook_attn_scores.is_active or h.hook_pattern.is_active

    def logit_scale(self, d_head: int) -> float:
        return d_head**-0.5 if self.scale is None else self.scale

    def attend(self, q: Tensor, k: Tensor, v: Tensor, qpos: Tensor | None, kpos: Tensor | None,
               hooks: nn.Module | None = None) -> Tensor:
        h = self if hooks is None else hooks
        q, k, v = h.hook_q(q), h.hook_k(k), h.hook_v(v)
        if self.q_norm is not None:
            q, k = h.hook_q_normed(self.q_norm(q)), h.hook_k_normed(self.k_norm(k))
        if self.rope is not None:
            q, k = self.rope(q, qpos), self.rope(k, kpos)
        q, k = h.hook_rot_q(q), h.hook_rot_k(k)
        scale = self.logit_scale(q.shape[-1])
        if self.needs_pattern(h):
            scores = h.hook_attn_scores((q @ k.transpose(-2, -1)) * scale)
            pattern = h.hook_pattern(scores.softmax(dim=-1))
            out = pattern.to(v.dtype) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        return h.hook_z(rearrange(out, "batch head pos d_head -> batch pos head d_head"))


def query_patterns(
    q: Float[Tensor, "batch head q_pos d_head"],
    k: Float[Tensor, "batch head k_pos d_head"],
    scale: float,
    queries: Int[Tensor, " n"] | Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
) -> Float[Tensor, "batch n_head n k_pos"]:
    """``softmax(q kᵀ · scale)`` for the chosen query rows and heads only, in fp32.

    ``q``, ``k`` are what the softmax sees (after qk-norm and RoPE: an attention's ``hook_rot_q`` /
    ``hook_rot_k``). Memory is ``batch · heads · len(queries) · k_pos``, so a few hundred queries
    of a many-view global attention cost what one view's full pattern would.
    """
    if heads is not None:
        idx = torch.as_tensor(list(heads), dtype=torch.long, device=q.device)
        q, k = q.index_select(1, idx), k.index_select(1, idx)
    if queries is not None:
        q = q.index_select(2, torch.as_tensor(queries, dtype=torch.long, device=q.device))
    return ((q.float() @ k.float().transpose(-2, -1)) * scale).softmax(dim=-1)


class QueryPatterns:
    """Attention patterns of chosen queries (and heads), recorded while the forward stays on SDPA.

    For each attention (named by its pattern hook, e.g. ``"decoder.dec_blocks.3.attn.hook_pattern"``)
    the recorder hooks the attention's ``hook_rot_q`` (keeps the chosen query rows) and
    ``hook_rot_k`` (computes their softmax against every key with :func:`query_patterns`), so the
    explicit ``[batch, head, q_pos, k_pos]`` pattern is never built. ``queries`` index the pattern's
    query axis (for a ``"global"`` site: the token of every view, view-major); ``None`` is every query.

    >>> rec = QueryPatterns(model, {"decoder.dec_blocks.3.attn.hook_pattern": [0, 17, 40]}, heads=[0, 2])
    >>> with model.hooks(rec.hooks()):
    ...     model(*views)
    >>> rec.patterns["decoder.dec_blocks.3.attn.hook_pattern"].shape   # [batch, 2, 3, k_pos]

    ``on_pattern(pattern_hook, pattern)`` instead of storing: each pattern is handed over as soon as
    it exists (what the head scorer does, so one pattern is alive at a time).
    """

    def __init__(self, model: nn.Module, queries: dict[str, Sequence[int] | Tensor | None],
                 heads: Sequence[int] | dict[str, Sequence[int]] | None = None, on_pattern=None):
        module = getattr(model, "_module", model)
        self.patterns: dict[str, Tensor] = {}
        self.on_pattern = on_pattern
        self._hooks: list[tuple[str, object]] = []
        self._q: dict[str, Tensor] = {}
        for pattern_hook, qs in queries.items():
            prefix, _, leaf = pattern_hook.rpartition(".")
            if leaf != "hook_pattern":
                raise ValueError(f"QueryPatterns takes pattern hook names (…attn.hook_pattern), got {pattern_hook!r}")
            try:
                core = module.get_submodule(prefix)
            except AttributeError:
                raise KeyError(f"no attention at {prefix!r} (from {pattern_hook!r})") from None
            for need in ("hook_rot_q", "hook_rot_k"):
                if not hasattr(core, need):
                    raise ValueError(f"{prefix} has no {need}: QueryPatterns needs an attention with rot_q/rot_k hooks")
            hs = heads.get(pattern_hook) if isinstance(heads, dict) else heads
            q_idx = None if qs is None else torch.as_tensor(qs, dtype=torch.long)
            scale_of = getattr(core, "logit_scale", lambda d: d**-0.5)
            self._hooks.append((f"{prefix}.hook_rot_q", self._keep_q(pattern_hook, q_idx, hs)))
            self._hooks.append((f"{prefix}.hook_rot_k", self._softmax(pattern_hook, hs, scale_of)))

    def _keep_q(self, name: str, q_idx: Tensor | None, heads: Sequence[int] | None):
        def hook(q: Tensor, hook) -> None:
            if heads is not None:
                q = q.index_select(1, torch.as_tensor(list(heads), dtype=torch.long, device=q.device))
            if q_idx is not None:
                if len(q_idx) and int(q_idx.max()) >= q.shape[2]:
                    raise IndexError(f"{name}: query index {int(q_idx.max())} out of range for {q.shape[2]} queries")
                q = q.index_select(2, q_idx.to(q.device))
            self._q[name] = q.detach()

        return hook

    def _softmax(self, name: str, heads: Sequence[int] | None, scale_of):
        def hook(k: Tensor, hook) -> None:
            q, k = self._q.pop(name), k.detach()  # q: the chosen rows and heads already
            if heads is not None:
                k = k.index_select(1, torch.as_tensor(list(heads), dtype=torch.long, device=k.device))
            pattern = query_patterns(q, k, scale_of(k.shape[-1]))
            if self.on_pattern is not None:
                self.on_pattern(name, pattern)
            else:
                self.patterns[name] = pattern

        return hook

    def hooks(self) -> list[tuple[str, object]]:
        """``[(hook name, fn)]`` for ``model.hooks(...)`` / ``run_with_hooks(fwd_hooks=...)``."""
        return list(self._hooks)


class SelfAttention(AttentionCore):
    """Multi-head self-attention with one fused ``qkv`` projection (rows [q | k | v], head-major)."""

    def __init__(self, dim: int, n_heads: int, rope: RoPE2D | None = None, qkv_bias: bool = True,
                 scale: float | None = None, qk_norm: bool = False, qk_norm_eps: float = 1e-5, hooks: bool = True):
        super().__init__(n_heads, rope, scale, dim // n_heads if qk_norm else None, qk_norm_eps, hooks)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Float[Tensor, "batch pos d_model"], pos: Tensor | None = None,
                hooks: nn.Module | None = None) -> Float[Tensor, "batch pos d_model"]:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.n_heads)
        # subclasses that override attend(q, k, v, qpos, kpos) keep working without hooks=
        z = self.attend(q, k, v, pos, pos) if hooks is None else self.attend(q, k, v, pos, pos, hooks=hooks)
        return self.proj(rearrange(z, "b n h d -> b n (h d)"))


class CrossAttention(AttentionCore):
    """Multi-head cross-attention: queries from this view, keys/values from the memory."""

    def __init__(self, dim: int, n_heads: int, rope: RoPE2D | None = None):
        super().__init__(n_heads, rope)
        self.projq, self.projk, self.projv = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: Float[Tensor, "batch q_pos d_model"],
        memory: Float[Tensor, "batch k_pos d_model"],
        qpos: Tensor | None = None,
        kpos: Tensor | None = None,
    ) -> Float[Tensor, "batch q_pos d_model"]:
        split = lambda t: rearrange(t, "b n (h d) -> b h n d", h=self.n_heads)  # noqa: E731
        z = self.attend(split(self.projq(x)), split(self.projk(memory)), split(self.projv(memory)), qpos, kpos)
        return self.proj(rearrange(z, "b n h d -> b n (h d)"))


class Mlp(nn.Module):
    """Linear → exact GELU → Linear (output width ``out_dim``, default ``dim``)."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim or dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


# --------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------


class EncoderBlock(nn.Module):
    """Pre-LN ViT block: ``x += attn(norm1 x); x += mlp(norm2 x)``, every state hooked."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-6, rope: RoPE2D | None = None,
                 qkv_bias: bool = True, attn_scale: float | None = None):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, n_heads, rope, qkv_bias, attn_scale)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.hook_resid_pre, self.hook_attn_out, self.hook_resid_mid = HookPoint(), HookPoint(), HookPoint()
        self.hook_mlp_out, self.hook_resid_post = HookPoint(), HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"], pos: Tensor | None = None) -> Float[Tensor, "batch pos d_model"]:
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(x + self.hook_attn_out(self.attn(self.norm1(x), pos)))
        return self.hook_resid_post(x + self.hook_mlp_out(self.mlp(self.norm2(x))))


class DecoderBlock(nn.Module):
    """CroCo decoder block: self-attention, cross-attention to the other view, MLP.

    ``y`` is the other view's block input; ``hook_memory`` holds ``norm_y(y)``.
    """

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-6, rope: RoPE2D | None = None):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim, eps=eps) for _ in range(3))
        self.norm_y = nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, n_heads, rope)
        self.cross_attn = CrossAttention(dim, n_heads, rope)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.hook_resid_pre, self.hook_attn_out, self.hook_resid_mid = HookPoint(), HookPoint(), HookPoint()
        self.hook_memory, self.hook_cross_attn_out, self.hook_resid_mid_cross = HookPoint(), HookPoint(), HookPoint()
        self.hook_mlp_out, self.hook_resid_post = HookPoint(), HookPoint()

    def forward(
        self,
        x: Float[Tensor, "batch q_pos d_model"],
        y: Float[Tensor, "batch k_pos d_model"],
        xpos: Tensor | None = None,
        ypos: Tensor | None = None,
    ) -> Float[Tensor, "batch q_pos d_model"]:
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(x + self.hook_attn_out(self.attn(self.norm1(x), xpos)))
        y = self.hook_memory(self.norm_y(y))
        x = self.hook_resid_mid_cross(x + self.hook_cross_attn_out(self.cross_attn(self.norm2(x), y, xpos, ypos)))
        return self.hook_resid_post(x + self.hook_mlp_out(self.mlp(self.norm3(x))))


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch × patch`` convolution; tokens row-major over the patch grid."""

    def __init__(self, patch_size: int, dim: int, in_chans: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, img: Float[Tensor, "batch 3 H W"]) -> Float[Tensor, "batch pos d_model"]:
        H, W = img.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(
                f"image size {H}x{W} is not a multiple of the patch size {p}; "
                "crop or resize with mv_interp.images.make_views / load_images"
            )
        # images arrive in fp32; a model cast to bf16/fp16 embeds them in its own dtype
        return rearrange(self.proj(img.to(self.proj.weight.dtype)), "b c h w -> b (h w) c")


# --------------------------------------------------------------------------------------
# Heads and post-processing
# --------------------------------------------------------------------------------------


def postprocess_points(
    raw: Float[Tensor, "batch H W C"], depth_mode: Sequence = ("exp", -math.inf, math.inf)
) -> Float[Tensor, "batch H W 3"]:
    """DUSt3R's ``reg_dense_depth``: direction of xyz times a function of its norm."""
    mode, vmin, vmax = depth_mode
    xyz = raw[..., :3]
    d = xyz.norm(dim=-1, keepdim=True)
    direction = xyz / d.clip(min=1e-8)
    if mode == "exp":
        return direction * torch.expm1(d)
    if mode == "square":
        return direction * d.square()
    if mode == "linear":
        if vmin == -math.inf and vmax == math.inf:
            return xyz
        return direction * d.clip(min=vmin, max=vmax)
    raise ValueError(f"unknown depth_mode {mode!r}; expected 'exp', 'square' or 'linear'")


def postprocess_conf(raw: Float[Tensor, "*batch"], conf_mode: Sequence = ("exp", 1, math.inf)) -> Float[Tensor, "*batch"]:
    """DUSt3R's ``reg_dense_conf``: ``vmin + exp(x)`` (clipped) or a scaled sigmoid."""
    mode, vmin, vmax = conf_mode
    if mode == "exp":
        return vmin + raw.exp().clip(max=vmax - vmin)
    if mode == "sigmoid":
        return (vmax - vmin) * torch.sigmoid(raw) + vmin
    raise ValueError(f"unknown conf_mode {mode!r}; expected 'exp' or 'sigmoid'")


class LinearHead(nn.Module):
    """Per-token Linear to ``channels · p²`` values, pixel-shuffled to full resolution."""

    def __init__(self, dim: int, patch_size: int, channels: int = 4):
        super().__init__()
        self.patch_size, self.channels = patch_size, channels
        self.proj = nn.Linear(dim, channels * patch_size**2)
        self.hook_raw = HookPoint()

    def forward(self, feats: list[Tensor], grid: tuple[int, int]) -> Float[Tensor, "batch C H W"]:
        h, w = grid
        x = rearrange(self.proj(feats[-1]), "b (h w) c -> b c h w", h=h, w=w)
        return self.hook_raw(F.pixel_shuffle(x, self.patch_size))


class ResidualConvUnit(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, 1)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = F.interpolate(self.resConfUnit2(x), scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class _Upsample(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class _Scratch(nn.Module):
    def __init__(self, layer_dims: Sequence[int], features: int):
        super().__init__()
        self.layer_rn = nn.ModuleList(nn.Conv2d(d, features, 3, padding=1, bias=False) for d in layer_dims)
        self.refinenet1, self.refinenet2 = FusionBlock(features), FusionBlock(features)
        self.refinenet3, self.refinenet4 = FusionBlock(features), FusionBlock(features)


class DPT(nn.Module):
    """The DPT decoder used by DUSt3R-family heads (official parameter names)."""

    def __init__(self, dim_tokens: Sequence[int], out_channels: int = 4, layer_dims=(96, 192, 384, 768),
                 features: int = 256, last_dim: int = 128):
        super().__init__()
        ups = [
            nn.ConvTranspose2d(layer_dims[0], layer_dims[0], 4, stride=4),
            nn.ConvTranspose2d(layer_dims[1], layer_dims[1], 2, stride=2),
            None,
            nn.Conv2d(layer_dims[3], layer_dims[3], 3, stride=2, padding=1),
        ]
        self.act_postprocess = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dt, ld, 1), *([up] if up is not None else []))
            for dt, ld, up in zip(dim_tokens, layer_dims, ups)
        )
        self.scratch = _Scratch(layer_dims, features)
        self.head = nn.Sequential(
            nn.Conv2d(features, last_dim, 3, padding=1), _Upsample(),
            nn.Conv2d(last_dim, last_dim, 3, padding=1), nn.ReLU(), nn.Conv2d(last_dim, out_channels, 1),
        )

    def forward(self, feats: Sequence[Tensor], grid: tuple[int, int]) -> Tensor:
        h, w = grid
        layers = [
            rn(post(rearrange(f, "b (h w) c -> b c h w", h=h, w=w)))
            for f, post, rn in zip(feats, self.act_postprocess, self.scratch.layer_rn)
        ]
        s = self.scratch
        p = s.refinenet4(layers[3])[:, :, : layers[2].shape[2], : layers[2].shape[3]]
        p = s.refinenet3(p, layers[2])
        p = s.refinenet2(p, layers[1])
        p = s.refinenet1(p, layers[0])
        return self.head(p)


class DPTHead(nn.Module):
    """DPT head over four decoder states picked by ``hooks_idx`` from the head input list."""

    def __init__(self, dim_tokens: Sequence[int], hooks_idx: Sequence[int], out_channels: int = 4, **dpt_kwargs):
        super().__init__()
        self.hooks_idx = list(hooks_idx)
        self.dpt = DPT(dim_tokens, out_channels, **dpt_kwargs)
        self.hook_raw = HookPoint()

    def forward(self, feats: list[Tensor], grid: tuple[int, int]) -> Float[Tensor, "batch C H W"]:
        return self.hook_raw(self.dpt([feats[i] for i in self.hooks_idx], grid))


def resolve_dpt_aliases(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Keep one name per DPT tensor (pure).

    Upstream DPT heads save ``scratch.layer_rn.{i}`` also as ``scratch.layer{i+1}_rn``; the two
    names hold one tensor. ``layer_rn.{i}`` wins when both are present (it is loaded last upstream);
    a checkpoint holding only the ``layer{i+1}_rn`` name is renamed.
    """
    out: dict[str, Tensor] = {}
    for k, v in state_dict.items():
        alias = _dpt_alias(k)
        if alias is None:
            out[k] = v
        elif alias not in state_dict:
            out[alias] = v
    return out


def _dpt_alias(key: str) -> str | None:
    """``…scratch.layer3_rn.weight`` → ``…scratch.layer_rn.2.weight`` (else None)."""
    marker = ".scratch.layer"
    if marker not in key or "_rn." not in key:
        return None
    head, tail = key.split(marker, 1)
    num, rest = tail.split("_rn.", 1)
    if not num.isdigit():
        return None
    return f"{head}.scratch.layer_rn.{int(num) - 1}.{rest}"


def dpt_hooks_idx(dec_depth: int) -> list[int]:
    """Indices into ``[enc_out, block_0 out, …, dec_norm(last)]`` that DPT reads."""
    return [0, dec_depth * 2 // 4, dec_depth * 3 // 4, dec_depth]
