"""DUSt3R (``AsymmetricCroCo3DStereo``): config, hooked module, checkpoint conversion, sites.

Module names mirror the official checkpoint (``enc_blocks``, ``dec_blocks`` for view 1,
``dec_blocks2`` for view 2, ``downstream_head1/2``), so official state dicts load with
``strict=True``. Hook names follow TransformerLens inside blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from ..errors import ConfigError, OutOfRangeError, suggest
from ..hooks import HookPoint
from ..layers import (
    DecoderBlock,
    DPTHead,
    EncoderBlock,
    LinearHead,
    PatchEmbed,
    RoPE2D,
    dpt_hooks_idx,
    patch_positions,
    postprocess_conf,
    postprocess_points,
    resolve_dpt_aliases,
)
from .base import Adapter, AttentionSite, ConfigMixin, MultiViewModel, ProbeSite, register_adapter

INF = math.inf


@dataclass(frozen=True)
class DUSt3RConfig(ConfigMixin):
    """Architecture of a DUSt3R-family model (defaults: DUSt3R_ViTLarge_BaseDecoder_224_linear)."""

    checks_field_types = True

    img_size: tuple[int, int] = (224, 224)
    """(H, W) the model was trained at; any multiple of ``patch_size`` runs."""
    patch_size: int = 16
    """Side of the square patches (the Conv2d patch embedding's kernel and stride)."""
    enc_embed_dim: int = 1024
    """Encoder width."""
    enc_depth: int = 24
    """Number of encoder blocks."""
    enc_num_heads: int = 16
    """Encoder attention heads."""
    dec_embed_dim: int = 768
    """Decoder width."""
    dec_depth: int = 12
    """Number of blocks in each of the two decoders."""
    dec_num_heads: int = 12
    """Decoder attention heads (self and cross)."""
    mlp_ratio: float = 4.0
    """MLP hidden width over model width."""
    head_type: str = "linear"
    """``"linear"`` or ``"dpt"`` (MASt3R adds ``"catmlp+dpt"``)."""
    output_mode: str = "pts3d"
    """What the head predicts; DUSt3R: ``"pts3d"`` (3 point channels + 1 confidence)."""
    depth_mode: tuple = ("exp", -INF, INF)
    """Post-processing of the point norm: (mode, vmin, vmax)."""
    conf_mode: tuple = ("exp", 1, INF)
    """Post-processing of the confidence: (mode, vmin, vmax)."""
    pos_embed: str = "RoPE100"
    """Positional encoding; only RoPE2D (``"RoPE{base}"``) is supported."""
    norm_eps: float = 1e-6
    """LayerNorm epsilon of every norm."""
    patch_embed_cls: str = "PatchEmbedDust3R"
    """Upstream patch-embedding class (``ManyAR_PatchEmbed`` behaves the same here)."""
    landscape_only: bool = False
    """Upstream flag for transposing portrait inputs; heads here handle any aspect."""

    def __post_init__(self) -> None:
        self.check_fields()
        object.__setattr__(self, "img_size", _pair(self.img_size))
        object.__setattr__(self, "depth_mode", tuple(self.depth_mode))
        object.__setattr__(self, "conf_mode", tuple(self.conf_mode))
        for w, h, what in ((self.enc_embed_dim, self.enc_num_heads, "enc"), (self.dec_embed_dim, self.dec_num_heads, "dec")):
            if w % h:
                raise ValueError(f"{what}_embed_dim={w} is not divisible by {what}_num_heads={h}")
            if (w // h) % 4:
                raise ValueError(f"{what} head dim {w // h} must be divisible by 4 for RoPE2D")
        if not self.pos_embed.startswith("RoPE"):
            raise ValueError(
                f"pos_embed={self.pos_embed!r} is not supported: mv_interp implements RoPE2D ('RoPE100'), "
                "which every released DUSt3R/MASt3R checkpoint uses"
            )
        if any(s % self.patch_size for s in self.img_size):
            raise ValueError(f"img_size={self.img_size} must be a multiple of patch_size={self.patch_size}")
        if self.head_type not in self.supported_heads():
            raise ValueError(f"head_type={self.head_type!r}; supported: {self.supported_heads()}")

    @classmethod
    def supported_heads(cls) -> tuple[str, ...]:
        return ("linear", "dpt")

    @property
    def rope_base(self) -> float:
        return float(self.pos_embed[4:] or 100)

    @property
    def out_channels(self) -> int:
        return 4

    #: upstream class name written by :meth:`to_constructor`
    constructor_name = "AsymmetricCroCo3DStereo"

    def constructor_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the upstream constructor that builds this architecture."""
        return dict(
            pos_embed=self.pos_embed, patch_embed_cls=self.patch_embed_cls, img_size=self.img_size,
            head_type=self.head_type, output_mode=self.output_mode, depth_mode=self.depth_mode,
            conf_mode=self.conf_mode, enc_embed_dim=self.enc_embed_dim, enc_depth=self.enc_depth,
            enc_num_heads=self.enc_num_heads, dec_embed_dim=self.dec_embed_dim, dec_depth=self.dec_depth,
            dec_num_heads=self.dec_num_heads, landscape_only=self.landscape_only,
        )

    def to_constructor(self, class_name: str | None = None) -> str:
        """The upstream ``args.model`` string for this config."""
        kw = self.constructor_kwargs()
        return f"{class_name or self.constructor_name}(" + ", ".join(f"{k}={_py_literal(v)}" for k, v in kw.items()) + ")"


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    return (int(v[0]), int(v[1]))


def _py_literal(v: Any) -> str:
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if isinstance(v, tuple):
        return "(" + ", ".join(_py_literal(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    return repr(v)


# Defaults of the upstream constructors (CroCoNet then AsymmetricCroCo3DStereo), applied to
# keyword arguments an ``args.model`` string leaves out.
UPSTREAM_DEFAULTS: dict[str, Any] = dict(
    img_size=224, patch_size=16, enc_embed_dim=768, enc_depth=12, enc_num_heads=12, dec_embed_dim=512,
    dec_depth=8, dec_num_heads=16, mlp_ratio=4.0, pos_embed="cosine", output_mode="pts3d", head_type="linear",
    depth_mode=("exp", -INF, INF), conf_mode=("exp", 1, INF), landscape_only=True, patch_embed_cls="PatchEmbedDust3R",
)
# Upstream keywords that do not change the inference network.
IGNORED_KWARGS = {"freeze", "mask_ratio", "norm_im2_in_dec", "norm_layer"}


def config_from_constructor(kwargs: dict[str, Any], config_cls: type = DUSt3RConfig,
                            defaults: dict[str, Any] = UPSTREAM_DEFAULTS, extra_ignored: set[str] = frozenset()) -> Any:
    """Config from the keyword arguments of an upstream constructor string."""
    known = {f for f in config_cls.__dataclass_fields__}
    ignored = IGNORED_KWARGS | set(extra_ignored)
    unknown = sorted(set(kwargs) - known - ignored)
    if unknown:
        raise ConfigError(
            f"checkpoint constructor / config.json has keyword(s) {unknown} that mv_interp does not know."
            + "".join(suggest(u, known) for u in unknown) + f" Known: {sorted(known | ignored)}"
        )
    if kwargs.get("norm_im2_in_dec") is False:
        raise ValueError("norm_im2_in_dec=False is not supported (every released checkpoint uses True)")
    merged = {**{k: v for k, v in defaults.items() if k in known}, **{k: v for k, v in kwargs.items() if k in known}}
    if isinstance(merged.get("img_size"), int):
        merged["img_size"] = _pair(merged["img_size"])
    for key in ("mlp_ratio", "norm_eps"):
        if isinstance(merged.get(key), int) and not isinstance(merged[key], bool):
            merged[key] = float(merged[key])  # other types are left for the config's field check
    if merged.get("patch_embed_cls") == "ManyAR_PatchEmbed":
        merged["patch_embed_cls"] = "PatchEmbedDust3R"  # same weights and maths for one aspect ratio per batch
    config_cls.check_values(merged)
    return config_cls(**merged)


def convert_state_dict(state_dict: dict[str, Tensor], config: DUSt3RConfig) -> dict[str, Tensor]:
    """Map an official DUSt3R state dict onto :class:`HookedDUSt3R`'s keys (pure).

    * ``dec_blocks2.*`` is copied from ``dec_blocks.*`` when absent (CroCo-pretrained weights).
    * DPT heads save one tensor under two names (``scratch.layer{i+1}_rn`` and
      ``scratch.layer_rn.{i}``); the ``layer_rn.{i}`` value wins, as in upstream loading.
    * keys of a wrapper (``module.``) are unwrapped.
    """
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    if not any(k.startswith("dec_blocks2.") for k in sd):
        sd.update({"dec_blocks2." + k[len("dec_blocks."):]: v for k, v in list(sd.items()) if k.startswith("dec_blocks.")})
    return resolve_dpt_aliases(sd)


class HookedDUSt3R(MultiViewModel):
    """DUSt3R with a hook point on every residual stream, sublayer, attention pattern and head.

    ``forward(img1, img2)`` takes ``[batch, 3, H, W]`` images in [-1, 1] and returns
    ``({"pts3d", "conf"}, {"pts3d", "conf"})``; both pointmaps are in view 1's frame.

    Example::

        >>> model = HookedDUSt3R(DUSt3RConfig(enc_embed_dim=64, enc_depth=2, enc_num_heads=4,
        ...                                   dec_embed_dim=48, dec_depth=2, dec_num_heads=4, img_size=(32, 32)))
        >>> out, cache = model.run_with_cache(*model.example_inputs(), names_filter="*hook_resid_post")
        >>> cache["dec_blocks2.1.hook_resid_post"].shape
        torch.Size([1, 4, 48])
    """

    family = "dust3r"

    def __init__(self, config: DUSt3RConfig):
        super().__init__()
        self.config = c = config
        rope = RoPE2D(c.rope_base)
        self.patch_embed = PatchEmbed(c.patch_size, c.enc_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.dec_embed_dim))  # unused at inference; in checkpoints
        self.enc_blocks = nn.ModuleList(
            EncoderBlock(c.enc_embed_dim, c.enc_num_heads, c.mlp_ratio, c.norm_eps, rope) for _ in range(c.enc_depth)
        )
        self.enc_norm = nn.LayerNorm(c.enc_embed_dim, eps=c.norm_eps)
        self.decoder_embed = nn.Linear(c.enc_embed_dim, c.dec_embed_dim)
        self.dec_blocks = self._decoder(rope)
        self.dec_blocks2 = self._decoder(rope)
        self.dec_norm = nn.LayerNorm(c.dec_embed_dim, eps=c.norm_eps)
        self.downstream_head1 = self._build_head()
        self.downstream_head2 = self._build_head()
        self.hook_patch_embed = HookPoint()  # [views·batch, pos, d_enc]
        self.hook_enc_out = HookPoint()  # [views·batch, pos, d_enc], after enc_norm
        self.hook_dec_out1, self.hook_dec_out2 = HookPoint(), HookPoint()  # [batch, pos, d_dec], after dec_norm
        self.setup()

    def _decoder(self, rope: RoPE2D) -> nn.ModuleList:
        c = self.config
        return nn.ModuleList(
            DecoderBlock(c.dec_embed_dim, c.dec_num_heads, c.mlp_ratio, c.norm_eps, rope) for _ in range(c.dec_depth)
        )

    def _build_head(self) -> nn.Module:
        c = self.config
        if c.head_type == "linear":
            return LinearHead(c.dec_embed_dim, c.patch_size, c.out_channels)
        dims = [c.enc_embed_dim] + [c.dec_embed_dim] * 3
        return DPTHead(dims, dpt_hooks_idx(c.dec_depth), c.out_channels)

    # -- forward ----------------------------------------------------------------------
    def forward(self, img1: Float[Tensor, "batch 3 H W"], img2: Float[Tensor, "batch2 3 H2 W2"]) -> tuple[dict, dict]:
        if img1.shape != img2.shape:
            raise ValueError(
                f"the two views must have the same shape, got {tuple(img1.shape)} and {tuple(img2.shape)}; "
                "mv_interp stacks views on the batch axis (crop both with mv_interp.images.make_views)"
            )
        grid = (img1.shape[-2] // self.patch_size, img1.shape[-1] // self.patch_size)
        pos = patch_positions(*grid, device=img1.device)
        enc1, enc2 = self.encode(torch.cat([img1, img2]), pos).chunk(2)
        feats1, feats2 = self.decode(enc1, enc2, pos)
        return self.head(1, feats1, grid), self.head(2, feats2, grid)

    def encode(self, imgs: Tensor, pos: Tensor) -> Tensor:
        x = self.hook_patch_embed(self.patch_embed(imgs))
        for blk in self.enc_blocks:
            x = blk(x, pos)
        return self.hook_enc_out(self.enc_norm(x))

    def decode(self, enc1: Tensor, enc2: Tensor, pos: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Interleaved decoders; returns the head input lists ``[enc, block 0 … L-2, dec_norm(L-1)]``."""
        f1, f2 = self.decoder_embed(enc1), self.decoder_embed(enc2)
        feats1, feats2 = [enc1], [enc2]
        for blk1, blk2 in zip(self.dec_blocks, self.dec_blocks2):
            # both views read the other's *input* to this depth
            f1, f2 = blk1(f1, f2, pos, pos), blk2(f2, f1, pos, pos)
            feats1.append(f1)
            feats2.append(f2)
        feats1[-1] = self.hook_dec_out1(self.dec_norm(f1))
        feats2[-1] = self.hook_dec_out2(self.dec_norm(f2))
        return feats1, feats2

    def head(self, view: int, feats: list[Tensor], grid: tuple[int, int]) -> dict[str, Tensor]:
        """Run view ``view``'s head with autocast off (fp32 weights: fp32, as upstream) and post-process."""
        head = self.downstream_head1 if view == 1 else self.downstream_head2
        with torch.autocast(device_type=feats[-1].device.type, enabled=False):
            dtype = next(head.parameters()).dtype  # fp32 unless the user cast the whole model
            raw = head([f.to(dtype) for f in feats], grid)
        return self.postprocess(raw)

    def postprocess(self, raw: Float[Tensor, "batch C H W"]) -> dict[str, Tensor]:
        raw = raw.permute(0, 2, 3, 1)
        return {"pts3d": postprocess_points(raw[..., :3], self.config.depth_mode),
                "conf": postprocess_conf(raw[..., 3], self.config.conf_mode)}

    # -- names and sites ------------------------------------------------------------
    _ATTN = {"q": "hook_q", "k": "hook_k", "v": "hook_v", "rot_q": "hook_rot_q", "rot_k": "hook_rot_k",
             "attn_scores": "hook_attn_scores", "scores": "hook_attn_scores", "pattern": "hook_pattern", "z": "hook_z"}

    def act_name(self, name: str, layer: int | None = None, view: int | None = None, stack: str | None = None) -> str:
        """Full hook name from a short one, TransformerLens style.

        >>> model.act_name("resid_post", 3, view=2)      # 'dec_blocks2.3.hook_resid_post'
        >>> model.act_name("pattern", 0, view=1)          # 'dec_blocks.0.attn.hook_pattern'
        >>> model.act_name("cross_pattern", 0, view=2)    # 'dec_blocks2.0.cross_attn.hook_pattern'
        >>> model.act_name("resid_post", 5, stack="enc")  # 'enc_blocks.5.hook_resid_post'
        >>> model.act_name("enc_out")                     # 'hook_enc_out'
        """
        if layer is None:
            root = {"patch_embed": "hook_patch_embed", "embed": "hook_patch_embed", "enc_out": "hook_enc_out"}
            if name in root:
                return root[name]
            if name in ("dec_out", "head_raw") and view in (1, 2):
                return f"hook_dec_out{view}" if name == "dec_out" else f"downstream_head{view}.hook_raw"
            raise ValueError(f"{name!r} needs a layer (and for decoder hooks a view); root hooks: {sorted(root)}, "
                             "'dec_out'/'head_raw' with view=1|2")
        stack = stack or ("dec" if view is not None else None)
        if stack is None:
            raise ValueError("give view=1|2 for a decoder hook or stack='enc' for an encoder hook")
        if stack == "enc":
            if view is not None:
                raise ValueError("encoder hooks hold both views stacked on the batch axis: omit view")
            prefix, depth = "enc_blocks", self.config.enc_depth
        elif stack == "dec":
            if view not in (1, 2):
                raise ValueError(f"view must be 1 or 2 for DUSt3R decoder hooks, got {view!r}")
            prefix, depth = ("dec_blocks" if view == 1 else "dec_blocks2"), self.config.dec_depth
        else:
            raise ValueError(f"stack must be 'enc' or 'dec', got {stack!r}")
        if not -depth <= layer < depth:
            raise OutOfRangeError(f"layer {layer} out of range for {prefix} (valid: 0..{depth - 1})")
        layer %= depth
        if name.startswith("cross_") and name[6:] in self._ATTN:
            if stack == "enc":
                raise ValueError("the encoder has no cross-attention")
            return f"{prefix}.{layer}.cross_attn.{self._ATTN[name[6:]]}"
        if name in self._ATTN:
            return f"{prefix}.{layer}.attn.{self._ATTN[name]}"
        block = {"resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"}
        if stack == "dec":
            block |= {"memory", "cross_attn_out", "resid_mid_cross"}
        if name not in block:
            raise ValueError(f"unknown hook {name!r} for {stack} blocks; expected one of "
                             f"{sorted(block | set(self._ATTN))} (or cross_<attn hook>)")
        return f"{prefix}.{layer}.hook_{name}"

    def probe_sites(self, encoder_blocks: bool = False, sublayers: bool = False,
                    n_views: int | None = None) -> list[ProbeSite]:
        """The paper's probing locations: encoder output, decoder input, and the residual after
        every skip connection of every decoder block, for both views.

        ``encoder_blocks`` adds every encoder block's output; ``sublayers`` adds each sublayer's
        output before its skip connection (the "probing granularity" ablation).
        """
        self.default_n_views(n_views)
        c = self.config
        sites: list[ProbeSite] = []
        for v in (1, 2):
            order = 0

            def add(name, hook, layer, kind, stack, dim, layout="view"):
                nonlocal order
                sites.append(ProbeSite(name, hook, v, layer, kind, stack, order, dim, layout))
                order += 1

            if encoder_blocks:
                for j in range(c.enc_depth):
                    add(f"enc{j}.v{v}", f"enc_blocks.{j}.hook_resid_post", j, "enc_block", "enc", c.enc_embed_dim, "stacked")
            add(f"enc_out.v{v}", "hook_enc_out", -1, "enc_out", "enc", c.enc_embed_dim, "stacked")
            prefix = "dec_blocks" if v == 1 else "dec_blocks2"
            add(f"dec_in.v{v}", f"{prefix}.0.hook_resid_pre", -1, "dec_in", "dec", c.dec_embed_dim)
            for i in range(c.dec_depth):
                for kind, resid, out in (("self", "resid_mid", "attn_out"), ("cross", "resid_mid_cross", "cross_attn_out"),
                                         ("mlp", "resid_post", "mlp_out")):
                    if sublayers:
                        add(f"dec{i}.{kind}_out.v{v}", f"{prefix}.{i}.hook_{out}", i, f"{kind}_out", "dec", c.dec_embed_dim)
                    add(f"dec{i}.{kind}.v{v}", f"{prefix}.{i}.hook_{resid}", i, kind, "dec", c.dec_embed_dim)
        return sites

    def attention_sites(self, n_views: int | None = None) -> list[AttentionSite]:
        """Encoder self-attention (``"stacked"``) and, per view and block, decoder self- and
        cross-attention (``"view"``)."""
        self.default_n_views(n_views)
        c = self.config
        sites = [
            AttentionSite(f"enc{j}.self", f"enc_blocks.{j}.attn.hook_pattern", f"enc_blocks.{j}.attn.hook_attn_scores",
                          f"enc_blocks.{j}.attn.hook_z", "self", "enc", j, 0, (1, 2), c.enc_num_heads, "stacked")
            for j in range(c.enc_depth)
        ]
        for i in range(c.dec_depth):
            for v, prefix in ((1, "dec_blocks"), (2, "dec_blocks2")):
                other = 3 - v
                for kind, mod, keys in (("self", "attn", (v,)), ("cross", "cross_attn", (other,))):
                    base = f"{prefix}.{i}.{mod}"
                    sites.append(AttentionSite(f"dec{i}.{kind}.v{v}", f"{base}.hook_pattern", f"{base}.hook_attn_scores",
                                               f"{base}.hook_z", kind, "dec", i, v, keys, c.dec_num_heads, "view"))
        return sites

    _NORMS = {"self": "norm1", "cross": "norm2", "mlp": "norm3"}

    def resid_norm(self, view: int, layer: int | None = None, kind: str | None = None) -> nn.Module:
        """``dec_norm`` (``layer=None``), else ``norm1``/``norm2``/``norm3`` of view ``view``'s block."""
        if layer is None:
            return self.dec_norm
        if kind is not None and kind not in self._NORMS:
            raise ValueError(f"kind must be one of {sorted(self._NORMS)}, got {kind!r}")
        blocks = self.dec_blocks if view == 1 else self.dec_blocks2
        return getattr(blocks[layer], self._NORMS[kind or "self"])

    def head_input_hook(self, view: int) -> str:
        return self.act_name("dec_out", view=view)

    def pointmap_lens(self, site: ProbeSite, tokens: Tensor, grid: tuple[int, int],
                      enc_tokens: Tensor | None = None) -> dict[str, Tensor]:
        """Decode an intermediate state with the model's own ``dec_norm`` and the head of ``site.view``
        (the 3D analogue of the logit lens).

        Encoder states go through ``decoder_embed`` first. A DPT head reads four states: the
        lens feeds the probed state to its three decoder inputs and ``enc_tokens`` (this view's
        encoder output; the probed state itself for encoder sites) to the first.
        """
        c = self.config
        x = tokens
        if site.stack == "enc":
            enc_tokens = x if enc_tokens is None else enc_tokens
            x = self.decoder_embed(x)
        x = self.dec_norm(x)
        if c.head_type == "linear":
            return self.head(site.view, [x], grid)
        if enc_tokens is None:
            raise ValueError("the pointmap lens of a DPT head needs enc_tokens= (this view's hook_enc_out tokens)")
        return self.head(site.view, [enc_tokens] + [x] * c.dec_depth, grid)


def _matches_hf(cfg: dict[str, Any]) -> bool:
    """An upstream ``AsymmetricCroCo3DStereo`` config.json: CroCo widths, a DUSt3R head, plain points."""
    return ("encoder_args" not in cfg and any(k in cfg for k in ("enc_embed_dim", "dec_embed_dim", "dec_depth"))
            and cfg.get("head_type", "linear") in ("linear", "dpt") and cfg.get("output_mode", "pts3d") == "pts3d")


NAMED_CONFIGS = {
    "224_linear": DUSt3RConfig(img_size=(224, 224), head_type="linear"),
    "512_linear": DUSt3RConfig(img_size=(512, 512), head_type="linear"),
    "512_dpt": DUSt3RConfig(img_size=(512, 512), head_type="dpt"),
}

ADAPTER = register_adapter(
    Adapter(
        name="dust3r",
        config_cls=DUSt3RConfig,
        model_cls=HookedDUSt3R,
        convert_state_dict=convert_state_dict,
        constructor_names=("AsymmetricCroCo3DStereo",),
        config_from_constructor=config_from_constructor,
        matches_hf_config=_matches_hf,
        named_configs=NAMED_CONFIGS,
    )
)
