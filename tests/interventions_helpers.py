"""Hand-written reference computations shared by the intervention tests.

They recompute attention from cached q/k/v with plain tensor maths (no mv_interp code beyond
the cache), so a test comparing them with an intervened run checks the intervention itself.
"""

from __future__ import annotations

import torch
from torch import Tensor


def inputs(model, seed: int, batch: int = 1):
    return model.example_inputs(batch=batch, seed=seed)


def cache_with(model, views, fwd_hooks=(), names=None):
    """Run with ``fwd_hooks`` installed and record ``names``; returns (output, cache)."""
    with torch.no_grad(), model.hooks(list(fwd_hooks)):
        return model.run_with_cache(*views, names_filter=names)


def attention_by_hand(q: Tensor, k: Tensor, v: Tensor, edit_scores=None, edit_pattern=None) -> tuple[Tensor, Tensor]:
    """softmax(q kᵀ / sqrt(d)) v with optional edits; q/k/v ``[batch, head, pos, d]``.

    Returns (pattern, z) with z as ``[batch, pos, head, d]``.
    """
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    if edit_scores is not None:
        scores = edit_scores(scores.clone())
    pattern = scores.softmax(dim=-1)
    if edit_pattern is not None:
        pattern = edit_pattern(pattern.clone())
    z = (pattern @ v).permute(0, 2, 1, 3)
    return pattern, z


def project(attn_module, z: Tensor) -> Tensor:
    """The attention module's output projection of z ``[batch, pos, head, d]``."""
    return attn_module.proj(z.reshape(*z.shape[:2], -1))


def hand_knockout_post(pattern: Tensor, heads, queries, keys) -> Tensor:
    """Zero ``pattern[:, h, q, k]`` for every listed head, query and key (loops, on purpose)."""
    for h in heads:
        for qi in queries:
            for ki in keys:
                pattern[:, h, qi, ki] = 0.0
    return pattern


def hand_knockout_pre(scores: Tensor, heads, queries, keys) -> Tensor:
    for h in heads:
        for qi in queries:
            for ki in keys:
                scores[:, h, qi, ki] = float("-inf")
    return scores


# --------------------------------------------------------------------------------------
# A toy model whose attention spans all views' tokens (layout "global", tokens "concat"),
# any number of views: checks that the interventions only rely on the site metadata.
# --------------------------------------------------------------------------------------

from dataclasses import dataclass  # noqa: E402

from torch import nn  # noqa: E402

from mv_interp.adapters.base import AttentionSite, ConfigMixin, MultiViewModel, ProbeSite  # noqa: E402
from mv_interp.hooks import HookPoint  # noqa: E402
from mv_interp.layers import EncoderBlock, PatchEmbed  # noqa: E402


@dataclass(frozen=True)
class GlobalToyConfig(ConfigMixin):
    img_size: tuple = (32, 32)
    patch_size: int = 16
    dim: int = 16
    depth: int = 2
    heads: int = 2


class GlobalToy(MultiViewModel):
    """Patch-embed every view, concatenate the tokens, run joint self-attention blocks, and
    decode each view's tokens to points + confidence with one linear head."""

    family = "global_toy_for_tests"
    fixed_n_views = None

    def __init__(self, config: GlobalToyConfig):
        super().__init__()
        self.config = c = config
        self.patch_embed = PatchEmbed(c.patch_size, c.dim)
        self.view_embed = nn.Parameter(torch.randn(8, c.dim) * 0.5)
        self.blocks = nn.ModuleList(EncoderBlock(c.dim, c.heads) for _ in range(c.depth))
        self.head = nn.Linear(c.dim, 4 * c.patch_size**2)
        self.hook_embed = HookPoint()
        self.setup()

    def forward(self, *views):
        P = (views[0].shape[-2] // self.patch_size) * (views[0].shape[-1] // self.patch_size)
        x = torch.cat([self.patch_embed(v) + self.view_embed[i] for i, v in enumerate(views)], dim=1)
        x = self.hook_embed(x)
        for blk in self.blocks:
            x = blk(x)
        outs = []
        h, w = views[0].shape[-2] // self.patch_size, views[0].shape[-1] // self.patch_size
        for i in range(len(views)):
            raw = self.head(x[:, i * P : (i + 1) * P])
            raw = raw.reshape(-1, h, w, self.patch_size, self.patch_size, 4).permute(0, 1, 3, 2, 4, 5)
            raw = raw.reshape(-1, h * self.patch_size, w * self.patch_size, 4)
            outs.append({"pts3d": raw[..., :3], "conf": 1 + raw[..., 3].exp()})
        return tuple(outs)

    def attention_sites(self, n_views=None):
        c = self.config
        return [AttentionSite(f"blk{i}.global", f"blocks.{i}.attn.hook_pattern", f"blocks.{i}.attn.hook_attn_scores",
                              f"blocks.{i}.attn.hook_z", "self", "dec", i, 0, (1, 2, 3), c.heads, "global")
                for i in range(c.depth)]

    def probe_sites(self, encoder_blocks=False, sublayers=False, n_views=None):
        sites = []
        for v in (1, 2, 3):
            for i in range(self.config.depth):
                sites.append(ProbeSite(f"blk{i}.self.v{v}", f"blocks.{i}.hook_resid_mid", v, i, "self", "dec", 2 * i,
                                       self.config.dim, "concat"))
                sites.append(ProbeSite(f"blk{i}.mlp.v{v}", f"blocks.{i}.hook_resid_post", v, i, "mlp", "dec",
                                       2 * i + 1, self.config.dim, "concat"))
        return sites

    def example_inputs(self, batch=1, size=None, n_views=3, seed=0):
        return super().example_inputs(batch, size, n_views, seed)


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Run these tiny-model tests on one thread: with tensors this small, a second intra-op
    thread only adds synchronisation, which costs 10-100x on a loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
