"""VGGT (facebookresearch/vggt, VGGT-1B): N frames in one forward — DINOv2 patch embedding with
registers, alternating frame / global attention with qk-norm and RoPE, a camera head that refines
a pose encoding iteratively, and DPT heads for depth and world points.

Clean-room from the facts in ``tests/fixtures/README.md`` (section VGGT):

* frames are normalised inside (mean/std of ImageNet on [0, 1] images; mv_interp views arrive in
  [-1, 1] and are mapped to [0, 1] first), embedded by a complete DINOv2 ViT (cls + register tokens,
  a bicubic-antialiased positional table, LayerNorm eps 1e-6, LayerScale) of which only the patch
  tokens leave;
* each frame's aggregator tokens are ``[camera, register_0 … register_{R-1}, patches]``; frame 0
  (the reference frame) gets its own camera and register tokens, every other frame shares a
  second set — the only thing that marks the reference frame;
* 24 layers, each a frame block (attention among one frame's tokens) then a global block (among all
  frames' tokens of a sample), pre-LN (eps 1e-5), qk-norm before RoPE100 (patch (r, c) at
  (r + 1, c + 1), special tokens at (0, 0)), LayerScale;
* the camera head reads the last layer's camera tokens and refines a 9-d pose encoding
  ``[t (3), quaternion XYZW (4), fov_h, fov_w]`` in 4 iterations of an adaLN-modulated trunk;
* two DPT heads read layers 4, 11, 17, 23 (each ``cat(frame out, global out)``) with a UV
  positional embedding, residual units that add their *rectified* input, and activations
  ``exp`` (depth) / ``sign · expm1 |·|`` (world points), confidences ``1 + exp``.

Layout. Frames are stacked frame-major on the batch axis wherever each frame is processed alone
(DINO ViT, frame blocks, DPT heads): ``[frames·batch, pos, d]``; global blocks hold
``[batch, frames·P, d]`` with token ``n = s·P + p`` of frame ``s``. Within a frame, aggregator token
0 is the camera token, 1 … R the registers and the rest the patches, row-major
(:meth:`HookedVGGT.token_groups`); DINO tokens are ``[cls, registers, patches]``.

| hook | shape |
|---|---|
| ``aggregator.patch_embed.hook_patch_proj`` | ``[frames·batch, Np, C]`` conv patch tokens |
| ``aggregator.patch_embed.hook_embed`` | ``[frames·batch, T, C]`` ViT block-0 input (cls + pos, registers, patches + pos) |
| ``aggregator.patch_embed.blocks.{j}.hook_*`` / ``.attn.hook_*`` | DINO blocks, as below without qk-norm/RoPE |
| ``aggregator.patch_embed.hook_norm`` | ``[frames·batch, T, C]`` final LayerNorm |
| ``aggregator.frame_blocks.{i}.hook_resid_pre/attn_out/resid_mid/mlp_out/resid_post`` | ``[frames·batch, P, C]`` (sublayer outputs after LayerScale) |
| ``aggregator.frame_blocks.{i}.attn.hook_{q,k,v}`` → ``hook_{q,k}_normed`` → ``hook_rot_{q,k}`` | ``[frames·batch, head, P, d_head]`` |
| ``aggregator.frame_blocks.{i}.attn.hook_attn_scores/hook_pattern`` | ``[frames·batch, head, P, P]`` |
| ``aggregator.global_blocks.{i}.*`` | the same on ``[batch, frames·P, C]``; patterns ``[batch, head, frames·P, frames·P]`` |
| ``camera_head.hook_tokens`` | ``[batch, frames, 2C]`` normalised camera tokens of the last layer |
| ``camera_head.iters.{n}.hook_modulated`` / ``.trunk.{b}.*`` / ``hook_trunk_out`` / ``hook_delta`` / ``hook_pose`` | iteration ``n``: trunk input, trunk blocks (attention among the frames' camera tokens), output, raw increment ``[batch, frames, 9]``, activated pose encoding |
| ``depth_head.hook_in.{k}``, ``point_head.hook_in.{k}`` | ``[frames·batch, P, 2C]`` the k-th layer the head reads |
| ``depth_head.hook_raw``, ``point_head.hook_raw`` | ``[frames·batch, 2 / 4, H, W]`` before the activations |

The camera trunk's weights run once per refinement iteration, so its hooks live under
``camera_head.iters.{n}.trunk.{b}`` (one set per call) while its weights stay at
``camera_head.trunk.{b}`` as in the official checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor, nn

from ..hooks import HookPoint
from ..layers import AttentionHooks, Mlp, PatchEmbed, RoPE2D, SelfAttention
from .base import Adapter, AttentionSite, ConfigMixin, MultiViewModel, ProbeSite, register_adapter

RESNET_MEAN = (0.485, 0.456, 0.406)
RESNET_STD = (0.229, 0.224, 0.225)
_DINO_EPS = 1e-6  # DINOv2 blocks and final norm
_AGG_EPS = 1e-5  # aggregator / camera trunk blocks, qk-norm, heads' norms (torch's default)
_ADALN_EPS = 1e-6
_POSE_DIM = 9


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VGGTConfig(ConfigMixin):
    """Architecture of a VGGT model. The defaults are the official VGGT-1B (``VGGTConfig()``,
    ``load_model(..., config="vggt:1b")``); :meth:`from_upstream` reads upstream's per-part kwargs."""

    img_size: int | tuple[int, int] = (518, 518)
    """Training size (square; an int is read as ``(n, n)``, stored as a pair); sets the DINO positional table to ``(img_size / patch_size)²`` rows.
    Any multiple of ``patch_size`` runs."""
    patch_size: int = 14
    """Side of the square patches."""
    embed_dim: int = 1024
    """Width ``C`` of the DINO ViT and the aggregator (the heads read ``2C``)."""
    depth: int = 24
    """Aggregator layers (each one frame block and one global block)."""
    num_heads: int = 16
    """Aggregator attention heads."""
    mlp_ratio: float = 4.0
    """MLP hidden width over model width (aggregator, DINO and camera trunk)."""
    num_register_tokens: int = 4
    """Register tokens per frame in the aggregator (after the camera token)."""
    rope_freq: float = 100.0
    """RoPE2D base frequency of the aggregator."""
    dino_depth: int = 24
    """Blocks of the DINOv2 patch-embedding ViT (ViT-L/14: 24)."""
    dino_num_heads: int = 16
    """Heads of the DINOv2 ViT."""
    dino_num_register_tokens: int = 4
    """Register tokens of the DINOv2 ViT (``dinov2_vitl14_reg``); they never leave the ViT."""
    camera_trunk_depth: int = 4
    """Blocks of the camera head's trunk."""
    camera_num_heads: int = 16
    """Heads of the camera trunk (hard-coded upstream)."""
    camera_num_iterations: int = 4
    """Refinement iterations of the camera head."""
    dpt_features: int = 256
    """DPT fusion width."""
    dpt_out_channels: tuple[int, ...] = (256, 512, 1024, 1024)
    """DPT channels of the four projected layers."""
    dpt_layers: tuple[int, ...] = (4, 11, 17, 23)
    """Aggregator layers the DPT heads read."""
    enable_camera: bool = True
    """Build the camera head (pose encodings)."""
    enable_depth: bool = True
    """Build the depth head."""
    enable_point: bool = True
    """Build the point head (world points in frame 0's camera frame: the ``pts3d`` of every view)."""
    enable_track: bool = True
    """Upstream flag recorded from the checkpoint. The track head (query-point tracking) is not
    built: it produces no pointmap, and its ``track_head.*`` weights are dropped on loading."""

    def __post_init__(self) -> None:
        size = self.img_size
        size = (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))
        object.__setattr__(self, "img_size", size)
        object.__setattr__(self, "mlp_ratio", float(self.mlp_ratio))
        object.__setattr__(self, "rope_freq", float(self.rope_freq))
        object.__setattr__(self, "dpt_out_channels", tuple(int(c) for c in self.dpt_out_channels))
        object.__setattr__(self, "dpt_layers", tuple(int(i) for i in self.dpt_layers))
        C = self.embed_dim
        if size[0] != size[1] or size[0] % self.patch_size:
            raise ValueError(f"img_size={size} must be square and a multiple of patch_size={self.patch_size} "
                             "(it sets the DINO positional table); other input sizes run anyway")
        for what, heads, width in (("num_heads", self.num_heads, C), ("dino_num_heads", self.dino_num_heads, C),
                                   ("camera_num_heads", self.camera_num_heads, 2 * C)):
            if heads < 1 or width % heads:
                raise ValueError(f"{what}={heads} does not divide the width {width}")
        if (C // self.num_heads) % 4:
            raise ValueError(f"aggregator head dim {C // self.num_heads} (embed_dim / num_heads) must be divisible by "
                             "4 for RoPE2D")
        if min(self.depth, self.dino_depth, self.camera_trunk_depth, self.camera_num_iterations) < 1:
            raise ValueError("depth, dino_depth, camera_trunk_depth and camera_num_iterations must be >= 1")
        if len(self.dpt_out_channels) != 4 or len(self.dpt_layers) != 4:
            raise ValueError(f"the DPT heads read exactly 4 layers with 4 channel counts, got dpt_layers="
                             f"{self.dpt_layers}, dpt_out_channels={self.dpt_out_channels}")
        bad = [i for i in self.dpt_layers if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"dpt_layers {bad} outside the aggregator's layers 0..{self.depth - 1}")
        if self.dpt_features % 2 or self.num_register_tokens < 0 or self.dino_num_register_tokens < 0:
            raise ValueError("dpt_features must be even and register counts >= 0")
        if not self.enable_point:
            raise ValueError("enable_point=False: mv_interp's per-view pointmaps (pts3d) come from the point head; "
                             "load the checkpoint with enable_point=True")

    @property
    def n_special(self) -> int:
        """Aggregator tokens before the patches in each frame (camera + registers)."""
        return 1 + self.num_register_tokens

    @property
    def dino_n_special(self) -> int:
        """DINO tokens before the patches (cls + registers)."""
        return 1 + self.dino_num_register_tokens

    # -- upstream format ------------------------------------------------------------------
    @classmethod
    def from_upstream(cls, d: Mapping[str, Any]) -> VGGTConfig:
        """A config from upstream constructor kwargs per part (the fixtures' ``config`` field):
        ``{"vggt": VGGT(...) kwargs, "aggregator": ..., "patch_embed_vit": ..., "camera_head": ...,
        "depth_head": ..., "point_head": ...}``. Parts may be left out (upstream defaults); a value
        mv_interp does not implement raises a ``ValueError`` naming it."""
        return vggt_config_from_upstream(d)

    def to_hf_config(self) -> dict[str, Any]:
        """What upstream's ``config.json`` can hold (``VGGT.__init__`` kwargs)."""
        return {"img_size": self.img_size[0], "patch_size": self.patch_size, "embed_dim": self.embed_dim,
                "enable_camera": self.enable_camera, "enable_point": self.enable_point,
                "enable_depth": self.enable_depth, "enable_track": self.enable_track}


_PARTS = ("vggt", "aggregator", "patch_embed_vit", "camera_head", "depth_head", "point_head")
# upstream kwargs that change nothing at inference (initialisation, chunking, dropout, kernels)
_INERT = {"init_values", "block_chunks", "drop_path_rate", "frames_chunk_size", "block_fn", "cls", "norm_layer"}
# kwargs with the one value mv_interp implements
_FIXED = {
    "aggregator": {"qkv_bias": True, "proj_bias": True, "ffn_bias": True, "patch_embed": "dinov2_vitl14_reg",
                   "aa_order": ("frame", "global"), "aa_block_size": 1, "qk_norm": True},
    "patch_embed_vit": {"in_chans": 3, "qkv_bias": True, "ffn_bias": True, "proj_bias": True,
                        "interpolate_antialias": True, "interpolate_offset": 0.0, "ffn_layer": "mlp", "qk_norm": False},
    "camera_head": {"pose_encoding_type": "absT_quaR_FoV", "trans_act": "linear", "quat_act": "linear",
                    "fl_act": "relu"},
    "depth_head": {"output_dim": 2, "activation": "exp", "conf_activation": "expp1", "pos_embed": True,
                   "feature_only": False, "down_ratio": 1},
    "point_head": {"output_dim": 4, "activation": "inv_log", "conf_activation": "expp1", "pos_embed": True,
                   "feature_only": False, "down_ratio": 1},
}
# upstream kwarg -> config field
_MAP = {
    "vggt": {"img_size": "img_size", "patch_size": "patch_size", "embed_dim": "embed_dim",
             "enable_camera": "enable_camera", "enable_point": "enable_point", "enable_depth": "enable_depth",
             "enable_track": "enable_track"},
    "aggregator": {"img_size": "img_size", "patch_size": "patch_size", "embed_dim": "embed_dim", "depth": "depth",
                   "num_heads": "num_heads", "mlp_ratio": "mlp_ratio", "num_register_tokens": "num_register_tokens",
                   "rope_freq": "rope_freq"},
    "patch_embed_vit": {"img_size": "img_size", "patch_size": "patch_size", "embed_dim": "embed_dim",
                        "depth": "dino_depth", "num_heads": "dino_num_heads", "mlp_ratio": "mlp_ratio",
                        "num_register_tokens": "dino_num_register_tokens"},
    "camera_head": {"trunk_depth": "camera_trunk_depth", "num_heads": "camera_num_heads", "mlp_ratio": "mlp_ratio",
                    "num_iterations": "camera_num_iterations", "dim_in": None},
    "depth_head": {"features": "dpt_features", "out_channels": "dpt_out_channels",
                   "intermediate_layer_idx": "dpt_layers", "patch_size": "patch_size", "dim_in": None},
}
_MAP["point_head"] = _MAP["depth_head"]


def _norm_value(v: Any) -> Any:
    return tuple(_norm_value(x) for x in v) if isinstance(v, (list, tuple)) else v


def _coerce(name: str, value: Any) -> Any:
    """Upstream spellings of a field (``img_size=518``, ``mlp_ratio=4``) in the config's types."""
    if name == "img_size" and isinstance(value, (int, float)):
        return (int(value), int(value))
    if name in ("mlp_ratio", "rope_freq") and isinstance(value, int):
        return float(value)
    return value


def vggt_config_from_upstream(d: Mapping[str, Any]) -> VGGTConfig:
    """See :meth:`VGGTConfig.from_upstream`."""
    unknown = sorted(set(d) - set(_PARTS) - {"overrides", "official_1b", "doc"})
    if unknown:
        raise ValueError(f"VGGT upstream config has part(s) {unknown}; known parts: {list(_PARTS)} "
                         "('overrides' and 'official_1b' are documentation and ignored)")
    fields: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for part in _PARTS:
        args = dict(d.get(part) or {})
        fixed, table = _FIXED.get(part, {}), _MAP[part]
        bad = sorted(set(args) - set(table) - set(fixed) - _INERT)
        if bad:
            raise ValueError(f"VGGT {part} has keyword(s) {bad} that mv_interp does not know; known: "
                             f"{sorted(set(table) | set(fixed) | _INERT)}")
        for key, want in fixed.items():
            if key in args and _norm_value(args[key]) != want:
                raise ValueError(f"VGGT {part}.{key}={args[key]!r} is not supported: mv_interp implements "
                                 f"{key}={want!r} (the released architecture)")
        if part in ("aggregator", "patch_embed_vit") and "block_fn" in args \
                and not str(args["block_fn"]).startswith(("Block", "NestedTensorBlock")):
            raise ValueError(f"VGGT {part}.block_fn={args['block_fn']!r} is not supported (Block only)")
        for key, value in args.items():
            name = table.get(key)
            if name is None:
                continue
            value = _coerce(name, _norm_value(value))
            if name in fields and fields[name] != value:
                raise ValueError(f"VGGT {part}.{key}={value!r} contradicts {origin[name]}={fields[name]!r}")
            fields[name], origin[name] = value, f"{part}.{key}"
    cfg = VGGTConfig(**fields)
    for part in ("camera_head", "depth_head", "point_head"):
        dim_in = (d.get(part) or {}).get("dim_in")
        if dim_in is not None and dim_in != 2 * cfg.embed_dim:
            raise ValueError(f"VGGT {part}.dim_in={dim_in} must be 2 * embed_dim = {2 * cfg.embed_dim}")
    return cfg


def vggt_config_from_kwargs(kwargs: dict[str, Any]) -> VGGTConfig:
    """A config from an upstream ``config.json`` (``VGGT.__init__`` kwargs: the 1B geometry with those
    values), the per-part upstream dict (:meth:`VGGTConfig.from_upstream`) or mv_interp's own dict."""
    if set(kwargs) & {"aggregator", "patch_embed_vit", "camera_head", "depth_head", "point_head", "vggt"}:
        return vggt_config_from_upstream(kwargs)
    return VGGTConfig.from_dict({k: _coerce(k, v) for k, v in kwargs.items()})


_HF_KEYS = {"img_size", "patch_size", "embed_dim", "enable_camera", "enable_point", "enable_depth", "enable_track"}


def convert_state_dict(state_dict: dict[str, Tensor], config: VGGTConfig) -> dict[str, Tensor]:
    """Map an official VGGT state dict onto :class:`HookedVGGT`'s keys (pure).

    The official keys are the module names here, so only two things change: a ``module.`` wrapper
    prefix is removed, and the track head's ``track_head.*`` tensors are dropped (mv_interp does
    not build the track head; it produces no pointmap). Everything else must match exactly —
    loading is strict afterwards, unlike upstream's ``PyTorchModelHubMixin`` (``strict=False``).
    """
    sd = dict(state_dict)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if not k.startswith("track_head.")}


# --------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------

_BLOCK_HOOKS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")


class LayerScale(nn.Module):
    """Per-channel scale ``gamma`` (official name ``ls{1,2}.gamma``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class BlockHooks(nn.Module):
    """The hook points of one call of a :class:`Block` (``hook_resid_*``, ``attn.hook_*``)."""

    def __init__(self, qk_norm: bool = False):
        super().__init__()
        for name in _BLOCK_HOOKS:
            setattr(self, name, HookPoint())
        self.attn = AttentionHooks(qk_norm)


class Block(nn.Module):
    """Pre-LN ViT block with LayerScale: ``x += ls1(attn(norm1 x)); x += ls2(mlp(norm2 x))``.

    ``hooks=False`` builds the weights only; each call then passes its own :class:`BlockHooks`.
    """

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float, eps: float, rope: RoPE2D | None = None,
                 qk_norm: bool = False, hooks: bool = True):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, n_heads, rope, qk_norm=qk_norm, qk_norm_eps=_AGG_EPS, hooks=hooks)
        self.ls1, self.ls2 = LayerScale(dim), LayerScale(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if hooks:
            for name in _BLOCK_HOOKS:
                setattr(self, name, HookPoint())

    def forward(self, x: Float[Tensor, "batch pos d_model"], pos: Tensor | None = None,
                hooks: BlockHooks | None = None) -> Float[Tensor, "batch pos d_model"]:
        h = self if hooks is None else hooks
        x = h.hook_resid_pre(x)
        x = h.hook_resid_mid(x + h.hook_attn_out(self.ls1(self.attn(self.norm1(x), pos, hooks=h.attn))))
        return h.hook_resid_post(x + h.hook_mlp_out(self.ls2(self.mlp(self.norm2(x)))))


# --------------------------------------------------------------------------------------
# DINOv2 patch embedding and the aggregator
# --------------------------------------------------------------------------------------


class DinoViT(nn.Module):
    """DINOv2 ViT with registers (official ``aggregator.patch_embed``); returns ``x_norm``."""

    def __init__(self, c: VGGTConfig):
        super().__init__()
        C, grid = c.embed_dim, c.img_size[0] // c.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, C))
        self.register_tokens = nn.Parameter(torch.zeros(1, c.dino_num_register_tokens, C)) \
            if c.dino_num_register_tokens else None
        self.mask_token = nn.Parameter(torch.zeros(1, C))  # in the checkpoint, unused at inference
        self.patch_embed = PatchEmbed(c.patch_size, C)
        self.blocks = nn.ModuleList(Block(C, c.dino_num_heads, c.mlp_ratio, _DINO_EPS) for _ in range(c.dino_depth))
        self.norm = nn.LayerNorm(C, eps=_DINO_EPS)
        self.hook_patch_proj = HookPoint()  # [frames·batch, Np, C]
        self.hook_embed = HookPoint()  # [frames·batch, T, C], block-0 input
        self.hook_norm = HookPoint()  # [frames·batch, T, C], final LayerNorm

    def pos_table(self, h: int, w: int) -> Float[Tensor, "1 pos d_model"]:
        """The positional table added for an ``h × w`` patch grid: cls row, then the stored square
        grid resized bicubically with antialiasing (fp32), unless it already is ``h × w`` square."""
        pos = self.pos_embed
        M = math.isqrt(pos.shape[1] - 1)
        if h == w == M:
            return pos
        grid = rearrange(pos[:, 1:].float(), "1 (y x) c -> 1 c y x", y=M)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=True)
        return torch.cat([pos[:, :1], rearrange(grid, "1 c y x -> 1 (y x) c").to(pos.dtype)], dim=1)

    def forward(self, imgs: Float[Tensor, "batch 3 H W"]) -> Float[Tensor, "batch pos d_model"]:
        p = self.patch_embed.patch_size
        h, w = imgs.shape[-2] // p, imgs.shape[-1] // p
        x = self.hook_patch_proj(self.patch_embed(imgs))
        n = x.shape[0]
        x = torch.cat([self.cls_token.expand(n, -1, -1).to(x.dtype), x], dim=1) + self.pos_table(h, w).to(x.dtype)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(n, -1, -1).to(x.dtype), x[:, 1:]], dim=1)
        x = self.hook_embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.hook_norm(self.norm(x))


def token_positions(h: int, w: int, n_special: int, device: Any = None) -> Int[Tensor, "pos 2"]:
    """RoPE ``(y, x)`` of one frame's tokens: ``(0, 0)`` for the special tokens, patch (r, c) at
    ``(r + 1, c + 1)``."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    patches = torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=-1) + 1
    return torch.cat([torch.zeros(n_special, 2, dtype=patches.dtype, device=device), patches])


class Aggregator(nn.Module):
    """Patch embedding, camera / register tokens, and the alternating frame / global blocks."""

    def __init__(self, c: VGGTConfig):
        super().__init__()
        self.config = c
        C, R = c.embed_dim, c.num_register_tokens
        self.patch_embed = DinoViT(c)
        self.camera_token = nn.Parameter(torch.zeros(1, 2, 1, C))
        self.register_token = nn.Parameter(torch.zeros(1, 2, R, C))
        rope = RoPE2D(c.rope_freq)
        self.frame_blocks = nn.ModuleList(Block(C, c.num_heads, c.mlp_ratio, _AGG_EPS, rope, qk_norm=True)
                                          for _ in range(c.depth))
        self.global_blocks = nn.ModuleList(Block(C, c.num_heads, c.mlp_ratio, _AGG_EPS, rope, qk_norm=True)
                                           for _ in range(c.depth))
        self.register_buffer("_resnet_mean", torch.tensor(RESNET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_resnet_std", torch.tensor(RESNET_STD).view(1, 3, 1, 1), persistent=False)

    def special_tokens(self, n_frames: int, batch: int) -> Float[Tensor, "frames_batch special d_model"]:
        """``[camera, registers]`` of every frame, frame-major: set 0 for frame 0, set 1 for the rest."""
        special = torch.cat([self.camera_token, self.register_token], dim=2)[0]  # [2, 1+R, C]
        which = torch.ones(n_frames, dtype=torch.long, device=special.device)
        which[0] = 0
        return special[which].repeat_interleave(batch, dim=0)

    def forward(self, frames: Sequence[Tensor], keep: set[int]) -> dict[int, Tensor]:
        """Layer outputs ``{i: cat([frame block i out, global block i out], -1)}`` for ``i`` in
        ``keep``, each ``[frames·batch, P, 2C]``."""
        c = self.config
        S, B = len(frames), frames[0].shape[0]
        h, w = frames[0].shape[-2] // c.patch_size, frames[0].shape[-1] // c.patch_size
        x = (torch.cat(frames).float() + 1) / 2  # mv_interp's [-1, 1] → VGGT's [0, 1]
        x = (x - self._resnet_mean) / self._resnet_std
        patches = self.patch_embed(x)[:, c.dino_n_special:]
        tokens = torch.cat([self.special_tokens(S, B).to(patches.dtype), patches], dim=1)
        pos = token_positions(h, w, c.n_special, device=tokens.device)
        global_pos = pos.repeat(S, 1)
        outs = {}
        for i, (fb, gb) in enumerate(zip(self.frame_blocks, self.global_blocks)):
            f = fb(tokens, pos)
            g = gb(rearrange(f, "(s b) p c -> b (s p) c", s=S), global_pos)
            tokens = rearrange(g, "b (s p) c -> (s b) p c", s=S)
            if i in keep:
                outs[i] = torch.cat([f, tokens], dim=-1)
        return outs


# --------------------------------------------------------------------------------------
# Camera head
# --------------------------------------------------------------------------------------


class CameraIteration(nn.Module):
    """The hook points of one refinement iteration of the camera head."""

    def __init__(self, trunk_depth: int):
        super().__init__()
        self.hook_modulated = HookPoint()  # [batch, frames, 2C] trunk input
        self.trunk = nn.ModuleList(BlockHooks() for _ in range(trunk_depth))
        self.hook_trunk_out = HookPoint()  # [batch, frames, 2C]
        self.hook_delta = HookPoint()  # [batch, frames, 9] raw increment
        self.hook_pose = HookPoint()  # [batch, frames, 9] activated pose encoding after this iteration


def activate_pose(pred: Float[Tensor, "*batch 9"]) -> Float[Tensor, "*batch 9"]:
    """``[t, quaternion]`` as they are (linear), field of view through a ReLU."""
    return torch.cat([pred[..., :7], F.relu(pred[..., 7:])], dim=-1)


class CameraHead(nn.Module):
    """Iterative pose refinement from the last layer's camera tokens (official ``camera_head``)."""

    def __init__(self, c: VGGTConfig):
        super().__init__()
        D = 2 * c.embed_dim
        self.token_norm = nn.LayerNorm(D, eps=_AGG_EPS)
        self.trunk = nn.ModuleList(Block(D, c.camera_num_heads, c.mlp_ratio, _AGG_EPS, hooks=False)
                                   for _ in range(c.camera_trunk_depth))
        self.trunk_norm = nn.LayerNorm(D, eps=_AGG_EPS)
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, _POSE_DIM))
        self.embed_pose = nn.Linear(_POSE_DIM, D)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 3 * D))
        self.adaln_norm = nn.LayerNorm(D, eps=_ADALN_EPS, elementwise_affine=False)
        self.pose_branch = Mlp(D, D // 2, _POSE_DIM)
        self.iters = nn.ModuleList(CameraIteration(c.camera_trunk_depth) for _ in range(c.camera_num_iterations))
        self.hook_tokens = HookPoint()  # [batch, frames, 2C] normalised camera tokens

    def forward(self, camera_tokens: Float[Tensor, "batch frames d"]) -> list[Float[Tensor, "batch frames 9"]]:
        """Activated pose encodings after each iteration (the last is the prediction)."""
        tokens = self.hook_tokens(self.token_norm(camera_tokens))
        pred, out = None, []
        for it in self.iters:
            e = self.embed_pose(self.empty_pose_tokens.expand(*tokens.shape[:2], -1) if pred is None else pred)
            shift, scale, gate = self.poseLN_modulation(e).chunk(3, dim=-1)
            x = it.hook_modulated(gate * (self.adaln_norm(tokens) * (1 + scale) + shift) + tokens)
            for blk, hooks in zip(self.trunk, it.trunk):
                x = blk(x, hooks=hooks)
            x = it.hook_trunk_out(x)
            delta = it.hook_delta(self.pose_branch(self.trunk_norm(x)))
            pred = delta if pred is None else pred + delta
            out.append(it.hook_pose(activate_pose(pred)))
        return out


# --------------------------------------------------------------------------------------
# DPT heads
# --------------------------------------------------------------------------------------


def uv_embedding(channels: int, h: int, w: int, aspect: float) -> Float[Tensor, "1 channels h w"]:
    """VGGT's UV positional map: ``[sin(u ω), cos(u ω), sin(v ω), cos(v ω)]`` with u across the
    width in ``±(a/d)(w-1)/w``, v down the height in ``±(1/d)(h-1)/h`` (``a`` = W/H of the image,
    ``d = √(a² + 1)``), ``ω_k = 100^(-k / (c/4))``; coordinates fp32, sin/cos in fp64."""
    d = math.sqrt(aspect * aspect + 1)
    su, sv = aspect / d * (w - 1) / w, 1 / d * (h - 1) / h
    q = channels // 4
    omega = 1.0 / 100.0 ** (np.arange(q, dtype=np.float64) / q)
    # separable: the u half depends on the column only, the v half on the row only
    eu = np.outer(torch.linspace(-su, su, w, dtype=torch.float32).double().numpy(), omega).T  # [q, w]
    ev = np.outer(torch.linspace(-sv, sv, h, dtype=torch.float32).double().numpy(), omega).T  # [q, h]
    cols = torch.from_numpy(np.concatenate([np.sin(eu), np.cos(eu)]).astype(np.float32))  # [c/2, w]
    rows = torch.from_numpy(np.concatenate([np.sin(ev), np.cos(ev)]).astype(np.float32))  # [c/2, h]
    return torch.cat([cols[:, None, :].expand(-1, h, -1), rows[:, :, None].expand(-1, -1, w)])[None]


class RectifiedRCU(nn.Module):
    """``conv2(relu(conv1(relu(x)))) + relu(x)``: upstream's in-place ReLU makes the skip add the
    rectified input (DUSt3R's DPT adds ``x``)."""

    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(x)
        return self.conv2(F.relu(self.conv1(x))) + x


class Fusion(nn.Module):
    """``out = x (+ RCU1(skip)); out = RCU2(out)``, bilinear (align corners) to ``size`` (default ×2), 1×1 conv."""

    def __init__(self, features: int, has_skip: bool = True):
        super().__init__()
        self.resConfUnit1 = RectifiedRCU(features) if has_skip else None
        self.resConfUnit2 = RectifiedRCU(features)
        self.out_conv = nn.Conv2d(features, features, 1)

    def forward(self, x: Tensor, skip: Tensor | None = None, size: tuple[int, int] | None = None) -> Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if size is None:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class DPTHead(nn.Module):
    """VGGT's DPT head (official ``depth_head`` / ``point_head`` names) over four aggregator layers."""

    def __init__(self, c: VGGTConfig, out_dim: int, activation: str):
        super().__init__()
        D, oc, f = 2 * c.embed_dim, c.dpt_out_channels, c.dpt_features
        self.activation, self.patch_size = activation, c.patch_size
        self.norm = nn.LayerNorm(D, eps=_AGG_EPS)
        self.projects = nn.ModuleList(nn.Conv2d(D, ch, 1) for ch in oc)
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(oc[0], oc[0], 4, stride=4), nn.ConvTranspose2d(oc[1], oc[1], 2, stride=2),
            nn.Identity(), nn.Conv2d(oc[3], oc[3], 3, stride=2, padding=1)])
        self.scratch = nn.Module()
        for i, ch in enumerate(oc):
            setattr(self.scratch, f"layer{i + 1}_rn", nn.Conv2d(ch, f, 3, padding=1, bias=False))
        for i in range(1, 5):
            setattr(self.scratch, f"refinenet{i}", Fusion(f, has_skip=i != 4))
        self.scratch.output_conv1 = nn.Conv2d(f, f // 2, 3, padding=1)
        self.scratch.output_conv2 = nn.Sequential(nn.Conv2d(f // 2, 32, 3, padding=1), nn.ReLU(),
                                                  nn.Conv2d(32, out_dim, 1))
        self.hook_in = nn.ModuleList(HookPoint() for _ in range(4))  # [frames·batch, P, 2C] layers read
        self.hook_raw = HookPoint()  # [frames·batch, out_dim, H, W] before the activations

    def forward(self, feats: Sequence[Tensor], grid: tuple[int, int], n_special: int) -> Float[Tensor, "batch C H W"]:
        """``feats``: the four layers ``[batch, n_special + h·w, 2C]``; returns the raw output."""
        h, w = grid
        s = self.scratch
        layers = []
        for i, x in enumerate(feats):
            x = self.norm(self.hook_in[i](x)[:, n_special:])
            x = self.projects[i](rearrange(x, "b (h w) c -> b c h w", h=h, w=w))
            x = self.resize_layers[i](x + 0.1 * uv_embedding(x.shape[1], h, w, w / h).to(x))
            layers.append(getattr(s, f"layer{i + 1}_rn")(x))
        p = s.refinenet4(layers[3], size=layers[2].shape[2:])
        p = s.refinenet3(p, layers[2], size=layers[1].shape[2:])
        p = s.refinenet2(p, layers[1], size=layers[0].shape[2:])
        p = s.refinenet1(p, layers[0])
        H, W = h * self.patch_size, w * self.patch_size
        out = F.interpolate(s.output_conv1(p), size=(H, W), mode="bilinear", align_corners=True)
        out = s.output_conv2(out + 0.1 * uv_embedding(out.shape[1], H, W, W / H).to(out))
        return self.hook_raw(out)

    def activate(self, raw: Float[Tensor, "batch C H W"]) -> tuple[Tensor, Tensor]:
        """``(values [batch, H, W, C-1], conf [batch, H, W])``."""
        raw = raw.permute(0, 2, 3, 1)
        x, conf = raw[..., :-1], 1 + raw[..., -1].exp()
        if self.activation == "exp":
            return x.exp(), conf
        return torch.sign(x) * torch.expm1(x.abs()), conf  # "inv_log"


# --------------------------------------------------------------------------------------
# The hooked model
# --------------------------------------------------------------------------------------


class HookedVGGT(MultiViewModel):
    """VGGT with a hook point on every residual stream, sublayer, attention pattern and head.

    ``forward(*frames)`` takes ``S ≥ 2`` images ``[batch, 3, H, W]`` in [-1, 1] (H, W multiples of
    14; frame 1 is the reference frame) and returns ``S`` dicts with ``pts3d`` ``[batch, H, W, 3]``
    (the point head's world points, in frame 1's camera frame), ``conf``, ``depth``
    ``[batch, H, W, 1]`` and ``depth_conf`` (depth head), ``pose_enc`` ``[batch, 9]`` and
    ``pose_enc_list`` ``[batch, iterations, 9]`` (camera head: ``[t, quaternion XYZW, fov_h, fov_w]``).

    Example::

        >>> cfg = VGGTConfig(img_size=28, embed_dim=32, depth=4, num_heads=2, dino_depth=1, dino_num_heads=2,
        ...                  camera_trunk_depth=1, dpt_features=16, dpt_out_channels=(8, 8, 16, 16),
        ...                  dpt_layers=(0, 1, 2, 3))
        >>> model = HookedVGGT(cfg)
        >>> frames = model.example_inputs(n_views=3)
        >>> out, cache = model.run_with_cache(*frames, names_filter="*global_blocks.1.attn.hook_pattern")
        >>> cache["aggregator.global_blocks.1.attn.hook_pattern"].shape   # [batch, head, 3·(5+4), 3·(5+4)]
        torch.Size([1, 2, 27, 27])
    """

    family = "vggt"
    fixed_n_views = None
    config: VGGTConfig
    # the camera trunk attends among one camera token per frame: no patch grid to probe or score
    off_grid_hooks = ("camera_head.*",)

    def __init__(self, config: VGGTConfig):
        super().__init__()
        self.config = c = config
        self.aggregator = Aggregator(c)
        self.camera_head = CameraHead(c) if c.enable_camera else None
        self.depth_head = DPTHead(c, 2, "exp") if c.enable_depth else None
        self.point_head = DPTHead(c, 4, "inv_log")
        self._init_tokens()
        self.setup()

    def _init_tokens(self) -> None:
        # a randomly initialised model (tests, examples, the report's control) gets distinct special
        # tokens and positions, as upstream's initialisation does; checkpoints overwrite them
        dino, agg = self.aggregator.patch_embed, self.aggregator
        params = [dino.cls_token, dino.pos_embed, agg.camera_token, agg.register_token]
        params += [dino.register_tokens] if dino.register_tokens is not None else []
        with torch.no_grad():
            for prm in params:
                prm.copy_(torch.randn(prm.shape) * 0.02)

    # -- forward ----------------------------------------------------------------------
    def forward(self, *frames: Float[Tensor, "_batch 3 _H _W"]) -> tuple[dict, ...]:
        if len(frames) < 2:
            raise ValueError(f"VGGT in mv_interp takes at least 2 frames, got {len(frames)}")
        if len({tuple(f.shape) for f in frames}) != 1:
            raise ValueError(f"all frames must have the same shape, got {[tuple(f.shape) for f in frames]}; "
                             "crop them with mv_interp.images.make_views")
        c = self.config
        S, B = len(frames), frames[0].shape[0]
        H, W = frames[0].shape[-2:]
        if H % c.patch_size or W % c.patch_size:
            raise ValueError(f"frames are {H}x{W}; VGGT needs multiples of its patch size {c.patch_size} "
                             "(resize or crop them, e.g. to 518 wide)")
        grid = (H // c.patch_size, W // c.patch_size)
        keep = set(c.dpt_layers) | {c.depth - 1}
        layers = self.aggregator(frames, keep)
        per_frame: dict[str, Tensor] = {}
        with torch.autocast(device_type=frames[0].device.type, enabled=False):
            if self.camera_head is not None:
                dtype = self.camera_head.token_norm.weight.dtype
                cam = rearrange(layers[c.depth - 1][:, 0], "(s b) d -> b s d", s=S).to(dtype)
                poses = torch.stack(self.camera_head(cam), dim=2)  # [B, S, iters, 9]
                per_frame["pose_enc"] = rearrange(poses[:, :, -1], "b s k -> (s b) k")
                per_frame["pose_enc_list"] = rearrange(poses, "b s n k -> (s b) n k")
            pts, conf = self.run_dpt(self.point_head, [layers[i] for i in c.dpt_layers], grid)
            per_frame.update(pts3d=pts, conf=conf)
            if self.depth_head is not None:
                depth, depth_conf = self.run_dpt(self.depth_head, [layers[i] for i in c.dpt_layers], grid)
                per_frame.update(depth=depth, depth_conf=depth_conf)
        return tuple({k: v[s * B : (s + 1) * B] for k, v in per_frame.items()} for s in range(S))

    def run_dpt(self, head: DPTHead, feats: Sequence[Tensor], grid: tuple[int, int],
                n_special: int | None = None) -> tuple[Tensor, Tensor]:
        """One DPT head in its own dtype (fp32 unless the model was cast), activated."""
        dtype = head.norm.weight.dtype
        n_special = self.config.n_special if n_special is None else n_special
        return head.activate(head([f.to(dtype) for f in feats], grid, n_special))

    # -- token groups -----------------------------------------------------------------
    def token_groups(self, grid: tuple[int, int] | None = None) -> dict[str, tuple[int, ...]]:
        """Indices of each kind of token within one frame's aggregator tokens: ``camera`` (0),
        ``registers`` (1 … R), ``patches`` (row-major over ``grid``; default: the training size's grid).

        A frame's block in a global activation starts at ``(frame - 1) · P`` (1-based frames),
        so "the register tokens of frame 3" are ``[2 · P + i for i in token_groups()["registers"]]``;
        knockouts and patching take the within-frame indices with ``view=`` / ``key_view=``.
        """
        c = self.config
        h, w = grid if grid is not None else (c.img_size[0] // c.patch_size, c.img_size[1] // c.patch_size)
        R = c.num_register_tokens
        return {"camera": (0,), "registers": tuple(range(1, 1 + R)),
                "patches": tuple(range(1 + R, 1 + R + h * w))}

    def global_token_index(self, group: str, n_views: int, frames: int | Sequence[int] | None = None,
                           grid: tuple[int, int] | None = None) -> tuple[int, ...]:
        """Indices of the ``group`` tokens (``"camera"``, ``"registers"``, ``"patches"``) of ``frames``
        (1-based; ``None``: every frame) along the token axis of a global activation or pattern of a
        forward on ``n_views`` frames — e.g. ``keys=`` of a knockout with no ``key_view``.

        >>> model.global_token_index("registers", 3, frames=3, grid=(2, 3))   # P = 11
        (23, 24, 25, 26)
        """
        groups = self.token_groups(grid)
        if group not in groups:
            raise KeyError(f"unknown token group {group!r}; groups: {sorted(groups)}")
        frames = range(1, n_views + 1) if frames is None else ([frames] if isinstance(frames, int) else frames)
        bad = [f for f in frames if not 1 <= f <= n_views]
        if bad:
            raise IndexError(f"frames {bad} outside 1..{n_views}")
        P = sum(len(v) for v in groups.values())
        return tuple((f - 1) * P + i for f in frames for i in groups[group])

    # -- names and sites ----------------------------------------------------------------
    _ATTN = {"q": "hook_q", "k": "hook_k", "v": "hook_v", "q_normed": "hook_q_normed", "k_normed": "hook_k_normed",
             "rot_q": "hook_rot_q", "rot_k": "hook_rot_k", "attn_scores": "hook_attn_scores",
             "scores": "hook_attn_scores", "pattern": "hook_pattern", "z": "hook_z"}
    _ROOT = {"patch_proj": "aggregator.patch_embed.hook_patch_proj", "embed": "aggregator.patch_embed.hook_embed",
             "dino_out": "aggregator.patch_embed.hook_norm", "camera_tokens": "camera_head.hook_tokens",
             "point_raw": "point_head.hook_raw", "depth_raw": "depth_head.hook_raw", "head_raw": "point_head.hook_raw"}
    _STACKS = {"frame": "aggregator.frame_blocks", "global": "aggregator.global_blocks",
               "dino": "aggregator.patch_embed.blocks", "enc": "aggregator.patch_embed.blocks"}

    def act_name(self, name: str, layer: int | None = None, view: int | None = None, stack: str | None = None) -> str:
        """Full hook name from a short one, TransformerLens style. ``stack``: ``"frame"`` (default),
        ``"global"``, ``"dino"`` (the patch-embedding ViT), ``"dec"`` (the aggregator's blocks in
        execution order: layer ``2i`` = frame block i, ``2i + 1`` = global block i, as the sites number
        them) or ``"camera"`` (``layer`` = iteration).

        >>> model.act_name("resid_post", 3)                  # 'aggregator.frame_blocks.3.hook_resid_post'
        >>> model.act_name("pattern", 3, stack="global")     # 'aggregator.global_blocks.3.attn.hook_pattern'
        >>> model.act_name("pattern", 7, stack="dec")        # 'aggregator.global_blocks.3.attn.hook_pattern'
        >>> model.act_name("pose", 2, stack="camera")        # 'camera_head.iters.2.hook_pose'
        """
        if view is not None:
            raise ValueError("VGGT hooks hold all frames (stacked on the batch axis or concatenated on the token axis); "
                             "omit view= and slice with mv_interp.adapters.view_tokens")
        c = self.config
        if layer is None:
            if name in self._ROOT:
                return self._ROOT[name]
            raise ValueError(f"{name!r} needs a layer; root hooks: {sorted(self._ROOT)}")
        stack = stack or "frame"
        if stack == "camera":
            names = {"modulated", "trunk_out", "delta", "pose"}
            if name not in names:
                raise ValueError(f"camera hooks per iteration: {sorted(names)}")
            if not 0 <= layer < c.camera_num_iterations:
                raise IndexError(f"iteration {layer} out of range (valid: 0..{c.camera_num_iterations - 1})")
            return f"camera_head.iters.{layer}.hook_{name}"
        if stack == "dec":
            if not 0 <= layer < 2 * c.depth:
                raise IndexError(f"layer {layer} out of range for the aggregator (valid: 0..{2 * c.depth - 1})")
            stack, layer = ("frame", layer // 2) if layer % 2 == 0 else ("global", layer // 2)
        if stack not in self._STACKS:
            raise ValueError(f"stack must be one of {sorted(self._STACKS) + ['camera', 'dec']}, got {stack!r}")
        depth = c.dino_depth if stack in ("dino", "enc") else c.depth
        if not -depth <= layer < depth:
            raise IndexError(f"layer {layer} out of range for {self._STACKS[stack]} (valid: 0..{depth - 1})")
        layer %= depth
        prefix = f"{self._STACKS[stack]}.{layer}"
        if name in self._ATTN:
            if name in ("q_normed", "k_normed") and stack in ("dino", "enc"):
                raise ValueError("the DINO blocks have no qk-norm")
            return f"{prefix}.attn.{self._ATTN[name]}"
        if name not in {n[5:] for n in _BLOCK_HOOKS}:
            raise ValueError(f"unknown hook {name!r}; expected one of "
                             f"{sorted({n[5:] for n in _BLOCK_HOOKS} | set(self._ATTN))}")
        return f"{prefix}.hook_{name}"

    def probe_sites(self, encoder_blocks: bool = False, sublayers: bool = False,
                    n_views: int | None = None) -> list[ProbeSite]:
        """Per frame: the DINO output (``enc_out``), the aggregator input (``dec_in``), and the
        residual after every skip of every aggregator block — frame block i (layer ``2i``:
        ``self`` after attention within the frame, ``mlp``) and global block i (layer ``2i + 1``:
        ``cross`` after attention across frames, ``mlp``). ``encoder_blocks``: also every DINO block.
        Frame-block and DINO sites are ``"stacked"``, global-block sites ``"concat"``; every site's
        ``n_prefix`` special tokens (camera + registers, or cls + registers) precede the patches.
        """
        n_views = self.default_n_views(n_views)
        c = self.config
        C, ns, nd = c.embed_dim, c.n_special, c.dino_n_special
        sites: list[ProbeSite] = []
        for v in range(1, n_views + 1):
            order = 0

            def add(name, hook, layer, kind, stack, layout, prefix):
                nonlocal order
                sites.append(ProbeSite(name, hook, v, layer, kind, stack, order, C, layout, prefix))
                order += 1

            if encoder_blocks:
                for j in range(c.dino_depth):
                    add(f"dino{j}.v{v}", f"aggregator.patch_embed.blocks.{j}.hook_resid_post", j, "enc_block", "enc",
                        "stacked", nd)
            add(f"dino_out.v{v}", "aggregator.patch_embed.hook_norm", -1, "enc_out", "enc", "stacked", nd)
            add(f"agg_in.v{v}", "aggregator.frame_blocks.0.hook_resid_pre", -1, "dec_in", "dec", "stacked", ns)
            for i in range(c.depth):
                for which, layer, layout, attn_kind in (("frame", 2 * i, "stacked", "self"),
                                                         ("global", 2 * i + 1, "concat", "cross")):
                    prefix = f"aggregator.{which}_blocks.{i}"
                    for kind, resid, out in ((attn_kind, "resid_mid", "attn_out"), ("mlp", "resid_post", "mlp_out")):
                        label = "attn" if kind == attn_kind else "mlp"
                        if sublayers:
                            add(f"{which}{i}.{label}_out.v{v}", f"{prefix}.hook_{out}", layer, f"{kind}_out", "dec",
                                layout, ns)
                        add(f"{which}{i}.{label}.v{v}", f"{prefix}.hook_{resid}", layer, kind, "dec", layout, ns)
        return sites

    def attention_sites(self, n_views: int | None = None) -> list[AttentionSite]:
        """DINO self-attention and frame attention per frame (``"stacked"``), global attention over all
        frames (``"global"``: ``[batch, head, frames·P, frames·P]``). Layers number the aggregator's
        blocks in execution order (frame block i: ``2i``, global block i: ``2i + 1``); the camera
        trunk (one token per frame) is not a site."""
        n_views = self.default_n_views(n_views)
        c = self.config
        views = tuple(range(1, n_views + 1))
        sites = []
        for j in range(c.dino_depth):
            base = f"aggregator.patch_embed.blocks.{j}.attn"
            sites.append(AttentionSite(f"dino{j}.self", f"{base}.hook_pattern", f"{base}.hook_attn_scores",
                                       f"{base}.hook_z", "self", "enc", j, 0, views, c.dino_num_heads, "stacked",
                                       c.dino_n_special))
        for i in range(c.depth):
            for which, layer, layout in (("frame", 2 * i, "stacked"), ("global", 2 * i + 1, "global")):
                base = f"aggregator.{which}_blocks.{i}.attn"
                sites.append(AttentionSite(f"{which}{i}.self", f"{base}.hook_pattern", f"{base}.hook_attn_scores",
                                           f"{base}.hook_z", "self", "dec", layer, 0, views, c.num_heads, layout,
                                           c.n_special))
        return sites

    # -- cache algebra ----------------------------------------------------------------
    def attention_out_proj(self, site: AttentionSite) -> nn.Linear:
        """The out-projection of a site's attention with its block's LayerScale folded in
        (``hook_attn_out`` is ``ls1(proj(z))``), so per-head results sum to the attention output."""
        block = self.get_submodule(site.z_hook.rsplit(".", 2)[0])
        proj, gamma = block.attn.proj, block.ls1.gamma
        folded = nn.Linear(proj.in_features, proj.out_features, bias=proj.bias is not None).to(proj.weight)
        with torch.no_grad():
            folded.weight.copy_(proj.weight * gamma[:, None])
            if proj.bias is not None:
                folded.bias.copy_(proj.bias * gamma)
        return folded

    def resid_norm(self, view: int, layer: int | None = None, kind: str | None = None) -> nn.Module:
        """``norm1`` (before attention) / ``norm2`` (before the MLP) of aggregator layer ``layer``
        (frame block ``layer // 2`` or global block ``layer // 2``). There is no single final norm:
        the heads read frame- and global-block outputs concatenated through their own norm."""
        if layer is None:
            raise NotImplementedError("VGGT's heads read the concatenation of a frame- and a global-block output "
                                      "through the DPT's own norm, not one normed residual")
        which = self.aggregator.frame_blocks if layer % 2 == 0 else self.aggregator.global_blocks
        return which[layer // 2].norm2 if kind == "mlp" else which[layer // 2].norm1

    def head_input_hook(self, view: int) -> str:
        raise NotImplementedError("VGGT's heads read four concatenated frame/global layer pairs, not one residual")

    # -- lenses -------------------------------------------------------------------------
    def pointmap_lens(self, site: ProbeSite, tokens: Tensor, grid: tuple[int, int]) -> dict[str, Tensor]:
        """The point head applied to one frame's intermediate state (the 3D logit lens).

        ``tokens``: the frame's patch tokens ``[batch, h·w, C]`` (special tokens included is also
        accepted: ``[batch, n_prefix + h·w, C]``). The head reads ``cat([x, x])`` — the aggregator's
        layers concatenate the frame- and global-block outputs, two points of one residual stream —
        at all four of its inputs. Returns ``{"pts3d", "conf"}`` in frame 1's coordinates.
        """
        n_patch = grid[0] * grid[1]
        x = tokens[:, tokens.shape[1] - n_patch:] if tokens.shape[1] > n_patch else tokens
        feat = torch.cat([x, x], dim=-1)
        with torch.autocast(device_type=x.device.type, enabled=False):
            pts, conf = self.run_dpt(self.point_head, [feat] * 4, grid, n_special=0)
        return {"pts3d": pts, "conf": conf}

    def camera_lens(self, camera_tokens: Float[Tensor, "batch frames d_model"]) -> Float[Tensor, "batch frames 9"]:
        """The camera head applied to intermediate camera tokens (token 0 of every frame, e.g. from
        ``aggregator.global_blocks.{i}.hook_resid_post``): the pose encoding it would predict."""
        if self.camera_head is None:
            raise ValueError("this VGGT has no camera head (enable_camera=False)")
        feat = torch.cat([camera_tokens, camera_tokens], dim=-1)
        with torch.autocast(device_type=feat.device.type, enabled=False):
            return self.camera_head(feat.to(self.camera_head.token_norm.weight.dtype))[-1]


ADAPTER = register_adapter(
    Adapter(
        name="vggt",
        config_cls=VGGTConfig,
        model_cls=HookedVGGT,
        convert_state_dict=convert_state_dict,
        constructor_names=("VGGT",),
        config_from_constructor=vggt_config_from_kwargs,
        matches_hf_config=lambda cfg: "embed_dim" in cfg and set(cfg) <= _HF_KEYS,
        named_configs={"1b": VGGTConfig(), "VGGT-1B": VGGTConfig()},
    )
)
