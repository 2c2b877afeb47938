"""Fast3R: N views in one forward — shared CroCo encoder, global fusion decoder, two DPT heads.

Clean-room from the facts in ``tests/fixtures/README.md``:

* every view is encoded by the same CroCo ViT (RoPE100, LayerNorm eps 1e-6), views stacked
  view-major on the batch axis as DUSt3R's encoder;
* the encoder tokens of all views are concatenated on the token axis, projected by
  ``decoder_embed`` and tagged with a 1-D sin-cos embedding of each view's *image id*;
* the decoder is a stack of plain pre-LN blocks (LayerNorm eps 1e-5, no RoPE) doing
  self-attention over all ``ΣN`` tokens of all views, then ``dec_norm`` (eps 1e-6);
* two DPT heads read, per view, ``[encoder output, block 0 … L-2 outputs, dec_norm(block L-1)]``:
  ``downstream_head`` gives every view's points in view 1's frame (``pts3d``, ``conf``),
  ``downstream_head_local`` each view's points in its own frame (``pts3d_local``, ``conf_local``).

Image ids. Upstream draws them at random per forward (view 1: 0; others: distinct in
[1, 999]) when ``random_image_idx_embedding`` is set, which makes two runs of the same
views differ and activation patching meaningless. Here they are an explicit input:
``model(*views, image_ids=ids)`` with ``ids`` a ``[batch, view]`` (or ``[view]``) integer tensor or
a list; the default is deterministic, **view v gets id v − 1** (``0, 1, 2, …``, upstream's
choice when it does not randomise). :meth:`HookedFast3R.sample_image_ids` draws ids the way
upstream does, for users who want to average over draws.

Hook names mirror the official state dict (``encoder.*``, ``decoder.*``, ``downstream_head*``):

| hook | shape |
|---|---|
| ``encoder.hook_patch_embed``, ``encoder.enc_blocks.{j}.hook_*``, ``encoder.hook_enc_out`` | ``[views·batch, P, d]`` |
| ``decoder.hook_embed`` (``decoder_embed`` output), ``decoder.hook_image_pos`` (id table) | ``[batch, views·P, d]`` |
| ``decoder.dec_blocks.{i}.hook_resid_pre/attn_out/resid_mid/mlp_out/resid_post`` | ``[batch, views·P, d_dec]`` |
| ``decoder.dec_blocks.{i}.attn.hook_pattern`` / ``hook_attn_scores`` | ``[batch, head, views·P, views·P]`` |
| ``decoder.hook_dec_out`` (after ``dec_norm``) | ``[batch, views·P, d_dec]`` |
| ``downstream_head.hook_raw``, ``downstream_head_local.hook_raw`` | ``[views·batch, 4, H, W]`` |

Token ``n`` of a decoder activation belongs to view ``n // P + 1`` (``view_tokens`` /
``pattern_blocks`` in :mod:`mv_interp.adapters.base` split them). SDPA is used unless a
pattern or score hook is read, so many views stay affordable.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor, nn

from ..errors import OutOfRangeError
from ..hooks import HookPoint
from ..layers import (
    DPTHead,
    EncoderBlock,
    PatchEmbed,
    RoPE2D,
    dpt_hooks_idx,
    patch_positions,
    postprocess_conf,
    postprocess_points,
    resolve_dpt_aliases,
)
from .base import Adapter, AttentionSite, ConfigMixin, MultiViewModel, ProbeSite, _from_jsonable, register_adapter

INF = math.inf
# Fast3R's inference-time attention "bias": the decoder's logit scale d_head^-0.5 is multiplied by
# sqrt(ln(inference_seqlen) / ln(train_seqlen)) with the reference's constants 137 and 20.
_ATTN_BIAS_FACTOR = math.sqrt(math.log(137) / math.log(20))

ImageIds = Union[Int[Tensor, "batch view"], Int[Tensor, "view"], Sequence[int], None]


@dataclass(frozen=True)
class Fast3RConfig(ConfigMixin):
    """Architecture of a Fast3R model with a CroCo encoder and the ``fast3r`` fusion decoder."""

    checks_field_types = True

    img_size: tuple[int, int] = (512, 512)
    """(H, W) the model was trained at; any multiple of ``patch_size`` runs."""
    patch_size: int = 16
    """Side of the square patches (the Conv2d patch embedding's kernel and stride)."""
    enc_embed_dim: int = 1024
    """Encoder width."""
    enc_depth: int = 24
    """Number of encoder blocks."""
    enc_num_heads: int = 16
    """Encoder attention heads."""
    enc_mlp_ratio: float = 4.0
    """Encoder MLP hidden width over model width."""
    dec_embed_dim: int = 768
    """Decoder (fusion transformer) width."""
    dec_depth: int = 12
    """Number of decoder blocks."""
    dec_num_heads: int = 12
    """Decoder attention heads."""
    dec_mlp_ratio: float = 4.0
    """Decoder MLP hidden width over model width."""
    qkv_bias: bool = True
    """Whether the decoder's fused qkv projection has a bias (the encoder's always has)."""
    attn_bias_for_inference: bool = True
    """Upstream ``attn_bias_for_inference_enabled``: at inference the decoder's attention logits are
    scaled by ``d_head^-0.5 · sqrt(ln 137 / ln 20)`` instead of ``d_head^-0.5`` (mv_interp always runs
    in inference mode, so the flag is applied whenever set)."""
    with_local_head: bool = True
    """Whether there is a second DPT head for each view's points in its own frame."""
    head_type: str = "dpt"
    """Only ``"dpt"``."""
    output_mode: str = "pts3d"
    """Only ``"pts3d"`` (3 point channels + 1 confidence)."""
    depth_mode: tuple = ("exp", -INF, INF)
    """Post-processing of the point norm: (mode, vmin, vmax)."""
    conf_mode: tuple = ("exp", 1, INF)
    """Post-processing of the confidence: (mode, vmin, vmax)."""
    pos_embed: str = "RoPE100"
    """Encoder positional encoding; only RoPE2D (``"RoPE{base}"``)."""
    enc_norm_eps: float = 1e-6
    """LayerNorm epsilon in the encoder blocks and ``enc_norm``."""
    dec_block_eps: float = 1e-5
    """LayerNorm epsilon inside the decoder blocks (torch's default, as upstream)."""
    dec_norm_eps: float = 1e-6
    """LayerNorm epsilon of ``dec_norm``."""
    n_image_ids: int = 1000
    """Rows of the image-id sin-cos table; ids must lie in ``[0, n_image_ids)``."""
    random_image_idx_embedding: bool = True
    """Upstream flag recorded from the checkpoint: the model was trained with random view ids.
    mv_interp never draws ids at random (see the module docstring)."""
    patch_embed_cls: str = "PatchEmbedDust3R"
    """Upstream patch-embedding class (``ManyAR_PatchEmbed`` behaves the same for landscape input)."""
    landscape_only: bool = False
    """Upstream flag for transposing portrait inputs; heads here handle any aspect."""

    def __post_init__(self) -> None:
        self.check_fields()
        object.__setattr__(self, "img_size", _pair(self.img_size))
        object.__setattr__(self, "enc_mlp_ratio", float(self.enc_mlp_ratio))
        object.__setattr__(self, "dec_mlp_ratio", float(self.dec_mlp_ratio))
        object.__setattr__(self, "depth_mode", tuple(self.depth_mode))
        object.__setattr__(self, "conf_mode", tuple(self.conf_mode))
        for w, h, what in ((self.enc_embed_dim, self.enc_num_heads, "enc"),
                           (self.dec_embed_dim, self.dec_num_heads, "dec")):
            if w % h:
                raise ValueError(f"{what}_embed_dim={w} is not divisible by {what}_num_heads={h}")
        if (self.enc_embed_dim // self.enc_num_heads) % 4:
            raise ValueError(f"encoder head dim {self.enc_embed_dim // self.enc_num_heads} must be divisible by 4 "
                             "for RoPE2D")
        if self.dec_embed_dim % 2:
            raise ValueError(f"dec_embed_dim={self.dec_embed_dim} must be even for the sin-cos image-id embedding")
        if not self.pos_embed.startswith("RoPE"):
            raise ValueError(f"pos_embed={self.pos_embed!r} is not supported: the Fast3R CroCo encoder uses RoPE2D "
                             "('RoPE100')")
        if self.head_type != "dpt" or self.output_mode != "pts3d":
            raise ValueError(f"head_type={self.head_type!r}, output_mode={self.output_mode!r}: Fast3R supports "
                             "head_type='dpt' with output_mode='pts3d' only (as upstream)")
        if any(s % self.patch_size for s in self.img_size):
            raise ValueError(f"img_size={self.img_size} must be a multiple of patch_size={self.patch_size}")
        if self.n_image_ids < 2:
            raise ValueError(f"n_image_ids={self.n_image_ids} must be at least 2")

    @property
    def rope_base(self) -> float:
        return float(self.pos_embed[4:] or 100)

    @property
    def dec_attn_scale(self) -> float:
        """The decoder's attention logit scale."""
        scale = (self.dec_embed_dim // self.dec_num_heads) ** -0.5
        return scale * _ATTN_BIAS_FACTOR if self.attn_bias_for_inference else scale

    # -- upstream format ------------------------------------------------------------------
    constructor_name = "Fast3R"

    def constructor_kwargs(self) -> dict[str, Any]:
        """``encoder_args`` / ``decoder_args`` / ``head_args`` as upstream's ``Fast3R(...)`` takes them."""
        return dict(
            encoder_args=dict(
                encoder_type="croco", img_size=self.img_size, patch_size=self.patch_size,
                patch_embed_cls=self.patch_embed_cls, embed_dim=self.enc_embed_dim, num_heads=self.enc_num_heads,
                depth=self.enc_depth, mlp_ratio=self.enc_mlp_ratio, pos_embed=self.pos_embed,
            ),
            decoder_args=dict(
                decoder_type="fast3r", random_image_idx_embedding=self.random_image_idx_embedding,
                enc_embed_dim=self.enc_embed_dim, embed_dim=self.dec_embed_dim, num_heads=self.dec_num_heads,
                depth=self.dec_depth, mlp_ratio=self.dec_mlp_ratio, qkv_bias=self.qkv_bias,
                attn_bias_for_inference_enabled=self.attn_bias_for_inference,
            ),
            head_args=dict(
                head_type=self.head_type, output_mode=self.output_mode, with_local_head=self.with_local_head,
                patch_size=self.patch_size, landscape_only=self.landscape_only, depth_mode=self.depth_mode,
                conf_mode=self.conf_mode,
            ),
        )

    def to_constructor(self) -> str:
        """The upstream constructor string (``Fast3R(encoder_args=dict(...), ...)``)."""

        def lit(v: Any) -> str:
            if isinstance(v, dict):
                return "dict(" + ", ".join(f"{k}={lit(x)}" for k, x in v.items()) + ")"
            if isinstance(v, float) and math.isinf(v):
                return "inf" if v > 0 else "-inf"
            if isinstance(v, (tuple, list)):
                return "(" + ", ".join(lit(x) for x in v) + ("," if len(v) == 1 else "") + ")"
            return repr(v)

        return "Fast3R(" + ", ".join(f"{k}={lit(v)}" for k, v in self.constructor_kwargs().items()) + ")"

    def to_hf_config(self) -> dict[str, Any]:
        """The ``config.json`` content of an upstream HF checkpoint directory (JSON-safe)."""

        def js(v: Any) -> Any:
            if isinstance(v, dict):
                return {k: js(x) for k, x in v.items()}
            if isinstance(v, (tuple, list)):
                return [js(x) for x in v]
            if isinstance(v, float) and math.isinf(v):
                return "inf" if v > 0 else "-inf"
            return v

        return js(self.constructor_kwargs())


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    return (int(v[0]), int(v[1]))


# Upstream keywords with no effect on the inference network (dropout, kernels, training flags).
_IGNORED = {
    "encoder": {"encoder_type", "attn_implementation", "norm_layer"},
    "decoder": {"decoder_type", "drop", "attn_drop", "attn_implementation", "norm_layer"},
    "head": {"skip_load_pretrained_head"},
}
_FIELDS = {
    "encoder": {"img_size": "img_size", "patch_size": "patch_size", "patch_embed_cls": "patch_embed_cls",
                "embed_dim": "enc_embed_dim", "num_heads": "enc_num_heads", "depth": "enc_depth",
                "mlp_ratio": "enc_mlp_ratio", "pos_embed": "pos_embed"},
    "decoder": {"random_image_idx_embedding": "random_image_idx_embedding", "embed_dim": "dec_embed_dim",
                "num_heads": "dec_num_heads", "depth": "dec_depth", "mlp_ratio": "dec_mlp_ratio",
                "qkv_bias": "qkv_bias", "attn_bias_for_inference_enabled": "attn_bias_for_inference",
                "enc_embed_dim": None},
    "head": {"head_type": "head_type", "output_mode": "output_mode", "with_local_head": "with_local_head",
             "patch_size": None, "landscape_only": "landscape_only", "depth_mode": "depth_mode",
             "conf_mode": "conf_mode"},
}
# Defaults of the upstream constructors for keywords a checkpoint may leave out.
_UPSTREAM_DEFAULTS = {
    "encoder": dict(img_size=512, patch_size=16, patch_embed_cls="ManyAR_PatchEmbed", embed_dim=768, num_heads=12,
                    depth=12, mlp_ratio=4, pos_embed="RoPE100"),
    "decoder": dict(embed_dim=768, num_heads=12, depth=12, mlp_ratio=4.0, qkv_bias=True,
                    attn_bias_for_inference_enabled=True),
    "head": dict(with_local_head=False, landscape_only=True),
}


def _jsonable_deep(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _jsonable_deep(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_jsonable_deep(v) for v in value)
    return _from_jsonable(value)


def fast3r_config_from_constructor(kwargs: dict[str, Any]) -> Fast3RConfig:
    """Config from ``Fast3R(encoder_args=..., decoder_args=..., head_args=...)`` keyword arguments,
    an upstream HF ``config.json`` (the same three dicts) or a flat mv_interp config dict."""
    kwargs = _jsonable_deep(kwargs)
    if "encoder_args" not in kwargs:
        return Fast3RConfig.from_dict(kwargs)
    unknown = sorted(set(kwargs) - {"encoder_args", "decoder_args", "head_args", "freeze"})
    if unknown:
        raise ValueError(f"Fast3R constructor has keyword(s) {unknown} that mv_interp does not know; "
                         "known: encoder_args, decoder_args, head_args, freeze")
    missing = [k for k in ("encoder_args", "decoder_args", "head_args") if k not in kwargs]
    if missing:
        raise ValueError(f"Fast3R constructor lacks {missing}")
    enc, dec, head = (dict(kwargs[k]) for k in ("encoder_args", "decoder_args", "head_args"))
    if enc.get("encoder_type", "croco") != "croco":
        raise ValueError(f"Fast3R encoder_type={enc['encoder_type']!r} is not supported: mv_interp implements the "
                         "'croco' encoder (the DINOv2 variant needs torch.hub weights)")
    if dec.get("decoder_type", "fast3r") != "fast3r":
        raise ValueError(f"Fast3R decoder_type={dec['decoder_type']!r} is not supported: mv_interp implements the "
                         "'fast3r' fusion decoder")
    if "enc_embed_dim" in dec and "embed_dim" in enc and dec["enc_embed_dim"] != enc["embed_dim"]:
        raise ValueError(f"decoder_args.enc_embed_dim={dec['enc_embed_dim']} differs from "
                         f"encoder_args.embed_dim={enc['embed_dim']}")
    if "patch_size" in head and "patch_size" in enc and head["patch_size"] != enc["patch_size"]:
        raise ValueError(f"head_args.patch_size={head['patch_size']} differs from "
                         f"encoder_args.patch_size={enc['patch_size']}")
    fields: dict[str, Any] = {}
    for part, args in (("encoder", enc), ("decoder", dec), ("head", head)):
        table, ignored = _FIELDS[part], _IGNORED[part]
        bad = sorted(set(args) - set(table) - ignored)
        if bad:
            raise ValueError(f"Fast3R {part}_args has keyword(s) {bad} that mv_interp does not know; "
                             f"known: {sorted(set(table) | ignored)}")
        for key, value in {**_UPSTREAM_DEFAULTS.get(part, {}), **args}.items():
            if table.get(key):
                fields[table[key]] = value
    if fields.get("patch_embed_cls") == "ManyAR_PatchEmbed":
        fields["patch_embed_cls"] = "PatchEmbedDust3R"  # same weights and maths for one aspect ratio per batch
    if isinstance(fields["img_size"], int):
        fields["img_size"] = _pair(fields["img_size"])  # upstream allows one int for a square size
    for key in ("enc_mlp_ratio", "dec_mlp_ratio"):
        if isinstance(fields.get(key), int) and not isinstance(fields[key], bool):
            fields[key] = float(fields[key])
    Fast3RConfig.check_values(fields)
    return Fast3RConfig(**fields)


def convert_state_dict(state_dict: dict[str, Tensor], config: Fast3RConfig) -> dict[str, Tensor]:
    """Map an official Fast3R state dict onto :class:`HookedFast3R`'s keys (pure).

    * wrapper prefixes (``module.``, and ``net.`` of the Lightning training module) are removed;
    * the DPT heads' duplicate ``scratch.layer{i+1}_rn`` names collapse onto ``scratch.layer_rn.{i}``;
    * ``decoder.image_idx_emb`` (a non-persistent buffer some exports carry) is dropped: it is a
      fixed sin-cos table that the model recomputes.
    """
    sd = dict(state_dict)
    for prefix in ("module.", "net."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    sd.pop("decoder.image_idx_emb", None)
    return resolve_dpt_aliases(sd)


def image_id_embedding(n_ids: int, dim: int) -> Float[Tensor, "n_ids dim"]:
    """The sin-cos table of image ids: row ``p`` is ``[sin(p·ω_j) for j < D/2] + [cos(p·ω_j) …]``,
    ``ω_j = 10000^(-j / (D/2))``, computed in float64 and returned as float32."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(np.arange(n_ids, dtype=np.float64), omega)
    return torch.from_numpy(np.concatenate([np.sin(out), np.cos(out)], axis=1)).float()


class CroCoEncoder(nn.Module):
    """Patch embedding → RoPE2D ViT blocks → ``enc_norm``, on views stacked on the batch axis."""

    def __init__(self, c: Fast3RConfig):
        super().__init__()
        rope = RoPE2D(c.rope_base)
        self.patch_embed = PatchEmbed(c.patch_size, c.enc_embed_dim)
        self.enc_blocks = nn.ModuleList(
            EncoderBlock(c.enc_embed_dim, c.enc_num_heads, c.enc_mlp_ratio, c.enc_norm_eps, rope)
            for _ in range(c.enc_depth)
        )
        self.enc_norm = nn.LayerNorm(c.enc_embed_dim, eps=c.enc_norm_eps)
        self.hook_patch_embed = HookPoint()  # [views·batch, pos, d_enc]
        self.hook_enc_out = HookPoint()  # [views·batch, pos, d_enc], after enc_norm

    def forward(
        self, imgs: Float[Tensor, "batch 3 H W"], pos: Int[Tensor, "pos 2"]
    ) -> Float[Tensor, "batch pos d_model"]:
        x = self.hook_patch_embed(self.patch_embed(imgs))
        for blk in self.enc_blocks:
            x = blk(x, pos)
        return self.hook_enc_out(self.enc_norm(x))


class Fast3RDecoder(nn.Module):
    """``decoder_embed`` + image-id embedding, then global self-attention blocks over all views' tokens."""

    def __init__(self, c: Fast3RConfig):
        super().__init__()
        self.decoder_embed = nn.Linear(c.enc_embed_dim, c.dec_embed_dim)
        self.dec_blocks = nn.ModuleList(
            EncoderBlock(c.dec_embed_dim, c.dec_num_heads, c.dec_mlp_ratio, c.dec_block_eps, rope=None,
                         qkv_bias=c.qkv_bias, attn_scale=c.dec_attn_scale)
            for _ in range(c.dec_depth)
        )
        self.dec_norm = nn.LayerNorm(c.dec_embed_dim, eps=c.dec_norm_eps)
        # fixed table, not a parameter: left out of the state dict as upstream
        self.register_buffer("image_idx_emb", image_id_embedding(c.n_image_ids, c.dec_embed_dim), persistent=False)
        self.hook_embed = HookPoint()  # [batch, views·pos, d_dec], decoder_embed output
        self.hook_image_pos = HookPoint()  # [batch, views·pos, d_dec], the added id embedding
        self.hook_dec_out = HookPoint()  # [batch, views·pos, d_dec], after dec_norm

    def forward(
        self, tokens: Float[Tensor, "batch pos d_enc"], token_ids: Int[Tensor, "batch pos"]
    ) -> list[Float[Tensor, "batch pos d_model"]]:
        """Returns ``[block 0 out, …, block L-2 out, dec_norm(block L-1 out)]``."""
        x = self.hook_embed(self.decoder_embed(tokens))
        x = x + self.hook_image_pos(self.image_idx_emb[token_ids].to(x.dtype))
        outs = []
        for blk in self.dec_blocks:
            x = blk(x)
            outs.append(x)
        outs[-1] = self.hook_dec_out(self.dec_norm(x))
        return outs


class HookedFast3R(MultiViewModel):
    """Fast3R with a hook point on every residual stream, sublayer, attention pattern and head.

    ``forward(*views, image_ids=None)`` takes ``V ≥ 2`` images ``[batch, 3, H, W]`` in [-1, 1] (any
    order; view 1 is the reference frame) and returns ``V`` dicts with ``pts3d`` ``[batch, H, W, 3]``
    (global head, view 1's frame), ``conf``, and with the local head ``pts3d_local`` (each view's
    own frame) and ``conf_local``.

    Example::

        >>> cfg = Fast3RConfig(img_size=(32, 48), enc_embed_dim=32, enc_depth=2, enc_num_heads=2,
        ...                    dec_embed_dim=32, dec_depth=2, dec_num_heads=2)
        >>> model = HookedFast3R(cfg)
        >>> views = model.example_inputs(n_views=3)
        >>> out, cache = model.run_with_cache(*views, image_ids=[0, 5, 9], names_filter="*hook_pattern")
        >>> cache["decoder.dec_blocks.1.attn.hook_pattern"].shape     # [batch, head, 3·6, 3·6]
        torch.Size([1, 2, 18, 18])
    """

    family = "fast3r"
    fixed_n_views = None
    config: Fast3RConfig

    def __init__(self, config: Fast3RConfig):
        super().__init__()
        self.config = c = config
        self.encoder = CroCoEncoder(c)
        self.decoder = Fast3RDecoder(c)
        self.downstream_head = self._build_head()
        self.downstream_head_local = self._build_head() if c.with_local_head else None
        self.setup()

    def _build_head(self) -> DPTHead:
        c = self.config
        return DPTHead([c.enc_embed_dim] + [c.dec_embed_dim] * 3, dpt_hooks_idx(c.dec_depth), out_channels=4)

    # -- image ids ----------------------------------------------------------------------
    def image_ids(self, image_ids: ImageIds, batch: int, n_views: int, device: torch.device) -> Tensor:
        """``[batch, view]`` long ids from what the forward was given (default: view v → v − 1)."""
        if image_ids is None:
            ids = torch.arange(n_views, device=device).expand(batch, n_views)
        else:
            ids = torch.as_tensor(image_ids, device=device)
            if ids.is_floating_point() or ids.dtype == torch.bool:
                raise TypeError(f"image_ids must be integers, got dtype {ids.dtype}")
            if ids.ndim == 1:
                ids = ids.expand(batch, -1)
            if ids.ndim != 2 or ids.shape != (batch, n_views):
                raise ValueError(f"image_ids must have shape [batch, view] = [{batch}, {n_views}] or [{n_views}], "
                                 f"got {tuple(torch.as_tensor(image_ids).shape)}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.config.n_image_ids:
            raise ValueError(f"image_ids must lie in [0, {self.config.n_image_ids - 1}] (rows of the id embedding), "
                             f"got values in [{lo}, {hi}]")
        return ids.long()

    def sample_image_ids(self, batch: int, n_views: int, generator: torch.Generator | None = None) -> Tensor:
        """Ids drawn as upstream does with ``random_image_idx_embedding``: view 1 gets 0, the other
        views distinct ids uniform in ``[1, n_image_ids - 1]``, independently per sample."""
        ids = torch.zeros(batch, n_views, dtype=torch.long)
        for b in range(batch):
            ids[b, 1:] = torch.randperm(self.config.n_image_ids - 1, generator=generator)[: n_views - 1] + 1
        return ids

    # -- forward ----------------------------------------------------------------------
    def forward(self, *views: Float[Tensor, "_batch 3 _H _W"], image_ids: ImageIds = None) -> tuple[dict, ...]:
        if len(views) < 2:
            raise ValueError(f"Fast3R needs at least 2 views, got {len(views)}")
        if len({tuple(v.shape) for v in views}) != 1:
            raise ValueError(
                f"all views must have the same shape, got {[tuple(v.shape) for v in views]}; "
                "mv_interp stacks views on the batch axis (crop them with mv_interp.images.make_views)"
            )
        n_views, batch = len(views), views[0].shape[0]
        grid = (views[0].shape[-2] // self.patch_size, views[0].shape[-1] // self.patch_size)
        n_pos = grid[0] * grid[1]
        ids = self.image_ids(image_ids, batch, n_views, views[0].device)
        enc = self.encoder(torch.cat(views), patch_positions(*grid, device=views[0].device))
        dec = self.decoder(rearrange(enc, "(v b) p d -> b (v p) d", v=n_views), ids.repeat_interleave(n_pos, dim=1))
        # the heads see each view's own tokens: stack views on the batch axis again
        feats = [enc] + [rearrange(f, "b (v p) d -> (v b) p d", v=n_views) for f in dec]
        out = self.head(self.downstream_head, feats, grid)
        if self.downstream_head_local is not None:
            local = self.head(self.downstream_head_local, feats, grid)
            out.update(pts3d_local=local["pts3d"], conf_local=local["conf"])
        return tuple({k: v[i * batch : (i + 1) * batch] for k, v in out.items()} for i in range(n_views))

    def head(self, head: nn.Module, feats: list[Tensor], grid: tuple[int, int]) -> dict[str, Tensor]:
        """Run one DPT head in fp32 (autocast off) and post-process to points + confidence."""
        with torch.autocast(device_type=feats[-1].device.type, enabled=False):
            dtype = next(head.parameters()).dtype  # fp32 unless the user cast the whole model
            raw = head([f.to(dtype) for f in feats], grid).permute(0, 2, 3, 1)
        c = self.config
        return {"pts3d": postprocess_points(raw[..., :3], c.depth_mode),
                "conf": postprocess_conf(raw[..., 3], c.conf_mode)}

    # -- names and sites ----------------------------------------------------------------
    _ATTN = {"q": "hook_q", "k": "hook_k", "v": "hook_v", "rot_q": "hook_rot_q", "rot_k": "hook_rot_k",
             "attn_scores": "hook_attn_scores", "scores": "hook_attn_scores", "pattern": "hook_pattern", "z": "hook_z"}
    _ROOT = {"patch_embed": "encoder.hook_patch_embed", "embed": "encoder.hook_patch_embed",
             "enc_out": "encoder.hook_enc_out", "dec_embed": "decoder.hook_embed",
             "image_pos": "decoder.hook_image_pos",
             "dec_out": "decoder.hook_dec_out", "head_raw": "downstream_head.hook_raw",
             "local_head_raw": "downstream_head_local.hook_raw"}

    def act_name(self, name: str, layer: int | None = None, view: int | None = None, stack: str | None = None) -> str:
        """Full hook name from a short one, TransformerLens style.

        Decoder hooks hold every view's tokens (``[batch, views·P, d]``), so there is no ``view``:
        slice views with :func:`mv_interp.adapters.base.view_tokens`.

        >>> model.act_name("resid_post", 3)                 # 'decoder.dec_blocks.3.hook_resid_post'
        >>> model.act_name("pattern", 0)                    # 'decoder.dec_blocks.0.attn.hook_pattern'
        >>> model.act_name("resid_post", 1, stack="enc")    # 'encoder.enc_blocks.1.hook_resid_post'
        >>> model.act_name("image_pos")                     # 'decoder.hook_image_pos'
        """
        if view is not None:
            raise ValueError("Fast3R hooks hold all views (decoder: concatenated on the token axis, encoder and heads: "
                             "stacked on the batch axis); omit view= and slice with mv_interp.adapters.view_tokens")
        if layer is None:
            if name in self._ROOT:
                return self._ROOT[name]
            raise ValueError(f"{name!r} needs a layer; root hooks: {sorted(self._ROOT)}")
        stack = stack or "dec"
        if stack not in ("enc", "dec"):
            raise ValueError(f"stack must be 'enc' or 'dec', got {stack!r}")
        prefix, depth = (("encoder.enc_blocks", self.config.enc_depth) if stack == "enc"
                         else ("decoder.dec_blocks", self.config.dec_depth))
        if not -depth <= layer < depth:
            raise OutOfRangeError(f"layer {layer} out of range for {prefix} (valid: 0..{depth - 1})")
        layer %= depth
        if name in self._ATTN:
            return f"{prefix}.{layer}.attn.{self._ATTN[name]}"
        block = {"resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"}
        if name not in block:
            raise ValueError(f"unknown hook {name!r}; expected one of {sorted(block | set(self._ATTN))} "
                             "(Fast3R has no cross-attention)")
        return f"{prefix}.{layer}.hook_{name}"

    def probe_sites(self, encoder_blocks: bool = False, sublayers: bool = False,
                    n_views: int | None = None) -> list[ProbeSite]:
        """Encoder output, decoder input, and the residual after each decoder skip connection
        (self-attention, MLP), for each of ``n_views`` views (default 2).

        Decoder sites have layout ``"concat"`` (the view's token slice of the joint sequence);
        encoder sites ``"stacked"``.
        """
        n_views = self.default_n_views(n_views)
        c = self.config
        sites: list[ProbeSite] = []
        for v in range(1, n_views + 1):
            order = 0

            def add(name, hook, layer, kind, stack, dim, layout):
                nonlocal order
                sites.append(ProbeSite(name, hook, v, layer, kind, stack, order, dim, layout))
                order += 1

            if encoder_blocks:
                for j in range(c.enc_depth):
                    add(f"enc{j}.v{v}", f"encoder.enc_blocks.{j}.hook_resid_post", j, "enc_block", "enc",
                        c.enc_embed_dim, "stacked")
            add(f"enc_out.v{v}", "encoder.hook_enc_out", -1, "enc_out", "enc", c.enc_embed_dim, "stacked")
            add(f"dec_in.v{v}", "decoder.dec_blocks.0.hook_resid_pre", -1, "dec_in", "dec", c.dec_embed_dim, "concat")
            for i in range(c.dec_depth):
                for kind, resid, out in (("self", "resid_mid", "attn_out"), ("mlp", "resid_post", "mlp_out")):
                    if sublayers:
                        add(f"dec{i}.{kind}_out.v{v}", f"decoder.dec_blocks.{i}.hook_{out}", i, f"{kind}_out", "dec",
                            c.dec_embed_dim, "concat")
                    add(f"dec{i}.{kind}.v{v}", f"decoder.dec_blocks.{i}.hook_{resid}", i, kind, "dec",
                        c.dec_embed_dim, "concat")
        return sites

    def attention_sites(self, n_views: int | None = None) -> list[AttentionSite]:
        """Encoder self-attention per view (``"stacked"``) and the decoder's global self-attention
        (``"global"``: ``[batch, head, views·P, views·P]``; split with ``pattern_blocks``)."""
        n_views = self.default_n_views(n_views)
        c = self.config
        views = tuple(range(1, n_views + 1))
        sites = []
        stacks = (("enc", "encoder.enc_blocks", c.enc_depth, c.enc_num_heads, "stacked"),
                  ("dec", "decoder.dec_blocks", c.dec_depth, c.dec_num_heads, "global"))
        for stack, prefix, depth, heads, layout in stacks:
            for i in range(depth):
                base = f"{prefix}.{i}.attn"
                sites.append(AttentionSite(f"{stack}{i}.self", f"{base}.hook_pattern", f"{base}.hook_attn_scores",
                                           f"{base}.hook_z", "self", stack, i, 0, views, heads, layout))
        return sites

    def resid_norm(self, view: int, layer: int | None = None, kind: str | None = None) -> nn.Module:
        """``decoder.dec_norm`` (``layer=None``), else ``norm1`` (``"self"``) / ``norm2`` (``"mlp"``)
        of the shared decoder block (every view's tokens go through the same blocks)."""
        if layer is None:
            return self.decoder.dec_norm
        norms = {"self": "norm1", "mlp": "norm2"}
        if kind is not None and kind not in norms:
            raise ValueError(f"kind must be one of {sorted(norms)} (Fast3R has no cross-attention), got {kind!r}")
        return getattr(self.decoder.dec_blocks[layer], norms[kind or "self"])

    def head_input_hook(self, view: int) -> str:
        return self._ROOT["dec_out"]

    def pointmap_lens(self, site: ProbeSite, tokens: Tensor, grid: tuple[int, int],
                      enc_tokens: Tensor | None = None) -> dict[str, Tensor]:
        """Decode one view's intermediate state with ``dec_norm`` and the global head (the 3D
        logit lens). Encoder states go through ``decoder_embed`` (without the id embedding). The
        DPT head reads four states: the probed state feeds its three decoder inputs and
        ``enc_tokens`` (this view's encoder output; the probed state itself for encoder sites) the first.
        """
        x = tokens
        if site.stack == "enc":
            enc_tokens = x if enc_tokens is None else enc_tokens
            x = self.decoder.decoder_embed(x)
        if enc_tokens is None:
            raise ValueError("the pointmap lens of a DPT head needs enc_tokens= "
                             "(this view's encoder.hook_enc_out tokens)")
        x = self.decoder.dec_norm(x)
        return self.head(self.downstream_head, [enc_tokens] + [x] * self.config.dec_depth, grid)


ADAPTER = register_adapter(
    Adapter(
        name="fast3r",
        config_cls=Fast3RConfig,
        model_cls=HookedFast3R,
        convert_state_dict=convert_state_dict,
        constructor_names=("Fast3R",),
        config_from_constructor=fast3r_config_from_constructor,
        matches_hf_config=lambda cfg: "encoder_args" in cfg and "decoder_args" in cfg,
    )
)
