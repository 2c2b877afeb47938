"""The CroCo architecture fields shared by DUSt3R, MASt3R and Fast3R.

All three families encode every view with the same CroCo ViT (patch embedding, RoPE2D
self-attention blocks) and decode with a transformer of their own, read by per-view heads.
:class:`CroCoConfig` declares those shared fields once, with their validation; each family's
config derives from it and adds what is its own (DUSt3R's decoder norms, Fast3R's image ids,
MASt3R's descriptors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from .base import ModelConfig


@dataclass(frozen=True)
class CroCoConfig(ModelConfig):
    """A CroCo encoder (RoPE2D ViT) + a decoder + heads (defaults: the ViT-Large/Base-decoder widths)."""

    enc_embed_dim: int = 1024
    """Encoder width."""
    enc_depth: int = 24
    """Number of encoder blocks."""
    enc_num_heads: int = 16
    """Encoder attention heads."""
    dec_embed_dim: int = 768
    """Decoder width."""
    dec_depth: int = 12
    """Number of decoder blocks (DUSt3R/MASt3R: in each of the two decoders)."""
    dec_num_heads: int = 12
    """Decoder attention heads."""
    head_type: str = "linear"
    """Head architecture: ``"linear"``, ``"dpt"`` (MASt3R: ``"catmlp+dpt"``); see ``supported_heads``."""
    output_mode: str = "pts3d"
    """What the head predicts: ``"pts3d"`` (3 point channels + 1 confidence; MASt3R adds ``+desc{D}``)."""
    pos_embed: str = "RoPE100"
    """Encoder positional encoding; only RoPE2D (``"RoPE{base}"``) is supported."""
    patch_embed_cls: str = "PatchEmbedDust3R"
    """Upstream patch-embedding class (``ManyAR_PatchEmbed`` behaves the same here)."""
    landscape_only: bool = False
    """Upstream flag for transposing portrait inputs; heads here handle any aspect."""

    #: whether the decoder's attention uses RoPE2D too (its head dim must then divide by 4)
    decoder_rope: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for w, h, what in ((self.enc_embed_dim, self.enc_num_heads, "enc"), (self.dec_embed_dim, self.dec_num_heads, "dec")):
            if w % h:
                raise ValueError(f"{what}_embed_dim={w} is not divisible by {what}_num_heads={h}")
        for w, h, what in ((self.enc_embed_dim, self.enc_num_heads, "enc"),) + (
                ((self.dec_embed_dim, self.dec_num_heads, "dec"),) if type(self).decoder_rope else ()):
            if (w // h) % 4:
                raise ValueError(f"{what} head dim {w // h} must be divisible by 4 for RoPE2D")
        if not self.pos_embed.startswith("RoPE"):
            raise ValueError(
                f"pos_embed={self.pos_embed!r} is not supported: mv_interp implements RoPE2D ('RoPE100'), "
                "which every released CroCo-based checkpoint (DUSt3R, MASt3R, Fast3R) uses"
            )
        if self.head_type not in self.supported_heads():
            raise ValueError(f"head_type={self.head_type!r}; supported: {self.supported_heads()}")

    @classmethod
    def supported_heads(cls) -> tuple[str, ...]:
        return ("linear", "dpt")

    @property
    def rope_base(self) -> float:
        """The RoPE2D frequency base (100 for ``"RoPE100"``)."""
        return float(self.pos_embed[4:] or 100)


def py_literal(v: Any) -> str:
    """``v`` as a Python literal of an upstream constructor string (``inf`` bare, dicts as ``dict(...)``)."""
    if isinstance(v, dict):
        return "dict(" + ", ".join(f"{k}={py_literal(x)}" for k, x in v.items()) + ")"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(py_literal(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    return repr(v)
