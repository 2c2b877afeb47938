"""Adapting a new multi-view transformer to mv_interp — the whole job, in one file.

The model: "TinyAlt", a tiny multi-view transformer with *alternating* attention (the design of
VGGT-style models, and a shape neither DUSt3R nor Fast3R has). Any number of views share all
weights. Each block runs

* frame attention — every view attends to itself (views stacked on the batch axis, RoPE2D),
* global attention — all views' tokens attend to each other (views concatenated on the token axis),
* an MLP,

and a per-token linear head predicts points + confidence for every pixel of its patch.

What an adapter provides (see docs/adding-a-model.md):

1. a frozen config dataclass (``TinyAltConfig``);
2. a hooked module (``HookedTinyAlt``, a ``MultiViewModel``) with a HookPoint on every state,
   written on the data path (``x = self.hook_x(x)``), plus its probe sites, attention sites,
   ``act_name`` and (optionally) the 3D lens;
3. a pure checkpoint-conversion function (``convert_state_dict``);
4. one ``register_adapter(Adapter(...))`` call.

Run it::

    python examples/custom_adapter.py

It registers the family, loads a checkpoint in the "upstream" key format through the standard
loader, runs the conformity suite (``mv_interp.testing.check_adapter``) on 3 views, and reads a
global attention pattern through nnsight. A third-party package would expose this module through
the ``mv_interp.adapters`` entry-point group instead of importing it by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn

from mv_interp.adapters import Adapter, AttentionSite, MultiViewModel, ProbeSite, register_adapter
from mv_interp.adapters.base import ConfigMixin
from mv_interp.hooks import HookPoint
from mv_interp.layers import (Mlp, PatchEmbed, RoPE2D, SelfAttention, patch_positions, postprocess_conf,
                              postprocess_points)

# --------------------------------------------------------------------------------------
# 1. Config
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyAltConfig(ConfigMixin):
    """Architecture of a TinyAlt model."""

    img_size: tuple[int, int] = (32, 48)
    """(H, W) of the training images; any multiple of ``patch_size`` runs."""
    patch_size: int = 8
    """Side of the square patches."""
    dim: int = 48
    """Model width."""
    depth: int = 3
    """Number of blocks (frame attention, global attention, MLP)."""
    n_heads: int = 4
    """Attention heads."""
    mlp_ratio: float = 2.0
    """MLP hidden width over model width."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "img_size", tuple(int(s) for s in self.img_size))
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 4:
            raise ValueError(f"dim={self.dim} must split into {self.n_heads} heads of a size divisible by 4 (RoPE2D)")
        if any(s % self.patch_size for s in self.img_size):
            raise ValueError(f"img_size={self.img_size} must be a multiple of patch_size={self.patch_size}")


# --------------------------------------------------------------------------------------
# 2. Hooked module
# --------------------------------------------------------------------------------------


class AltBlock(nn.Module):
    """Frame attention → global attention → MLP, each with its own residual hook.

    The residual stream is ``[views·batch, pos, dim]`` (views stacked) around frame attention and
    the MLP, and ``[batch, views·pos, dim]`` (views concatenated) around global attention.
    """

    def __init__(self, c: TinyAltConfig, rope: RoPE2D):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(c.dim) for _ in range(3))
        self.frame_attn = SelfAttention(c.dim, c.n_heads, rope)  # brings hook_q/k/v/attn_scores/pattern/z
        self.global_attn = SelfAttention(c.dim, c.n_heads)  # no RoPE across views
        self.mlp = Mlp(c.dim, int(c.dim * c.mlp_ratio))
        self.hook_resid_pre, self.hook_frame_out, self.hook_resid_mid = HookPoint(), HookPoint(), HookPoint()
        self.hook_global_out, self.hook_resid_mid_global = HookPoint(), HookPoint()
        self.hook_mlp_out, self.hook_resid_post = HookPoint(), HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"], pos: Tensor,
                n_views: int) -> Float[Tensor, "batch pos d_model"]:
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(x + self.hook_frame_out(self.frame_attn(self.norm1(x), pos)))
        g = rearrange(x, "(v b) n d -> b (v n) d", v=n_views)
        g = self.hook_resid_mid_global(g + self.hook_global_out(self.global_attn(self.norm2(g))))
        x = rearrange(g, "b (v n) d -> (v b) n d", v=n_views)
        return self.hook_resid_post(x + self.hook_mlp_out(self.mlp(self.norm3(x))))


class HookedTinyAlt(MultiViewModel):
    """TinyAlt with hooks everywhere. ``forward(*views)`` (any number ≥ 2 of ``[batch, 3, H, W]``
    images) returns one ``{"pts3d", "conf"}`` dict per view."""

    family = "tiny_alt"  # = the adapter name
    fixed_n_views = None  # any number of views

    def __init__(self, config: TinyAltConfig):
        super().__init__()
        self.config = c = config
        rope = RoPE2D(100.0)
        self.patch_embed = PatchEmbed(c.patch_size, c.dim)
        self.blocks = nn.ModuleList(AltBlock(c, rope) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, 4 * c.patch_size**2)
        self.hook_embed = HookPoint()  # [views·batch, pos, dim]
        self.hook_out = HookPoint()  # [views·batch, pos, dim], after the final norm
        self.hook_head_raw = HookPoint()  # [views·batch, 4, H, W], before post-processing
        self.setup()  # names every HookPoint; call it last

    def forward(self, *views: Float[Tensor, "_batch 3 _H _W"]) -> tuple[dict, ...]:
        if len(views) < 2 or len({v.shape for v in views}) != 1:
            raise ValueError(f"TinyAlt takes ≥ 2 views of one shape, got {[tuple(v.shape) for v in views]}")
        grid = (views[0].shape[-2] // self.patch_size, views[0].shape[-1] // self.patch_size)
        pos = patch_positions(*grid, device=views[0].device)
        x = self.hook_embed(self.patch_embed(torch.cat(views)))
        for blk in self.blocks:
            x = blk(x, pos, len(views))
        out = self.decode(self.hook_out(self.norm(x)), grid)
        b = views[0].shape[0]
        return tuple({k: t[v * b : (v + 1) * b] for k, t in out.items()} for v in range(len(views)))

    def decode(self, tokens: Tensor, grid: tuple[int, int]) -> dict[str, Tensor]:
        """Final tokens → points + confidence (pixel shuffle of a per-token linear map)."""
        h, w = grid
        raw = F.pixel_shuffle(rearrange(self.head(tokens), "b (h w) c -> b c h w", h=h, w=w), self.patch_size)
        raw = self.hook_head_raw(raw).permute(0, 2, 3, 1)
        return {"pts3d": postprocess_points(raw[..., :3]), "conf": postprocess_conf(raw[..., 3])}

    # -- what the generic tools ask -----------------------------------------------------
    def act_name(self, name: str, layer: int | None = None, view: int | None = None, stack: str | None = None) -> str:
        """``act_name("resid_post", 2)`` → ``"blocks.2.hook_resid_post"``; ``"pattern"`` (frame attention),
        ``"global_pattern"`` (global attention); root hooks ``"embed"``, ``"out"``, ``"head_raw"``."""
        if layer is None:
            return {"embed": "hook_embed", "out": "hook_out", "head_raw": "hook_head_raw"}[name]
        if name.startswith("global_"):
            return f"blocks.{layer}.global_attn.hook_{name[7:]}"
        if name in ("q", "k", "v", "rot_q", "rot_k", "attn_scores", "pattern", "z"):
            return f"blocks.{layer}.frame_attn.hook_{name}"
        return f"blocks.{layer}.hook_{name}"

    def probe_sites(self, encoder_blocks: bool = False, sublayers: bool = False,
                    n_views: int | None = None) -> list[ProbeSite]:
        """Per view: the embedding, then the residual after every skip connection. The global
        attention's skip is kind ``"cross"``: it is where views exchange information."""
        n_views = self.default_n_views(n_views)
        c, sites = self.config, []
        for v in range(1, n_views + 1):
            order = 0

            def add(name: str, hook: str, layer: int, kind: str, layout: str) -> None:
                nonlocal order
                sites.append(ProbeSite(name, hook, v, layer, kind, "dec", order, c.dim, layout))
                order += 1

            add(f"embed.v{v}", "hook_embed", -1, "dec_in", "stacked")
            for i in range(c.depth):
                for kind, resid, out, layout in (("self", "resid_mid", "frame_out", "stacked"),
                                                 ("cross", "resid_mid_global", "global_out", "concat"),
                                                 ("mlp", "resid_post", "mlp_out", "stacked")):
                    if sublayers:
                        add(f"blk{i}.{kind}_out.v{v}", f"blocks.{i}.hook_{out}", i, f"{kind}_out", layout)
                    add(f"blk{i}.{kind}.v{v}", f"blocks.{i}.hook_{resid}", i, kind, layout)
        return sites

    def attention_sites(self, n_views: int | None = None) -> list[AttentionSite]:
        """Frame attention (``"stacked"``: each view alone) and global attention (``"global"``: all
        views' tokens) of every block."""
        views = tuple(range(1, self.default_n_views(n_views) + 1))
        c, sites = self.config, []
        for i in range(c.depth):
            for kind, mod, layout in (("self", "frame_attn", "stacked"), ("cross", "global_attn", "global")):
                base = f"blocks.{i}.{mod}"
                sites.append(AttentionSite(f"blk{i}.{mod}", f"{base}.hook_pattern", f"{base}.hook_attn_scores",
                                           f"{base}.hook_z", kind, "dec", i, 0, views, c.n_heads, layout))
        return sites

    def resid_norm(self, view: int, layer: int | None = None, kind: str | None = None) -> nn.Module:
        """The norm that reads the residual before sublayer ``kind`` of block ``layer`` (``None``: the final norm)."""
        if layer is None:
            return self.norm
        return getattr(self.blocks[layer], {"self": "norm1", "cross": "norm2", "mlp": "norm3"}[kind or "self"])

    def head_input_hook(self, view: int) -> str:
        """The hook holding the head's input (the final norm's output; views stacked like the probe sites)."""
        return "hook_out"

    def pointmap_lens(self, site: ProbeSite, tokens: Tensor, grid: tuple[int, int]) -> dict[str, Tensor]:
        """The model's own final norm and head applied to an intermediate state ``[batch, pos, dim]``."""
        return self.decode(self.norm(tokens), grid)


# --------------------------------------------------------------------------------------
# 3. Checkpoint conversion (pure)
# --------------------------------------------------------------------------------------


def convert_state_dict(state_dict: dict[str, Tensor], config: TinyAltConfig) -> dict[str, Tensor]:
    """Map the (imaginary) upstream release's keys onto ours: it wraps everything in ``model.``
    and calls the blocks ``transformer.layers``."""
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("model.")
        key = key.replace("transformer.layers.", "blocks.")
        out[key] = value
    return out


# --------------------------------------------------------------------------------------
# 4. Registration
# --------------------------------------------------------------------------------------

ADAPTER = register_adapter(
    Adapter(
        name="tiny_alt",
        config_cls=TinyAltConfig,
        model_cls=HookedTinyAlt,
        convert_state_dict=convert_state_dict,
        constructor_names=("TinyAlt",),  # the class name in an upstream ``args.model`` string
        matches_hf_config=lambda cfg: {"dim", "depth", "n_heads"} <= set(cfg) and "enc_embed_dim" not in cfg,
        named_configs={"tiny": TinyAltConfig()},
    )
)


def main() -> None:
    import mv_interp
    from mv_interp.testing import check_adapter

    torch.manual_seed(0)
    upstream = {f"model.{k.replace('blocks.', 'transformer.layers.')}": v
                for k, v in HookedTinyAlt(TinyAltConfig()).state_dict().items()}
    model = mv_interp.load_model(upstream, config="tiny_alt:tiny")  # through convert_state_dict, strict
    print(check_adapter(model))  # 3 views by default for a model of any number of views

    views = model.example_inputs(batch=1, n_views=3)
    with torch.no_grad(), model.trace(*views):
        pattern = model.blocks[1].global_attn.hook_pattern.output.save()
    site = next(s for s in model.attention_sites(n_views=3) if s.pattern_hook == "blocks.1.global_attn.hook_pattern")
    blocks = mv_interp.adapters.pattern_blocks(pattern, site, n_views=3)
    print("global attention of block 1:", tuple(pattern.shape), "(batch, head, 3·pos, 3·pos);",
          f"view 2 → view 1 mass {blocks[(2, 1)].sum(-1).mean():.3f}")


if __name__ == "__main__":
    main()
