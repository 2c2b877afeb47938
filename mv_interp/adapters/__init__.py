"""Model families. Each file registers one :class:`~mv_interp.adapters.base.Adapter`."""

from .base import (
    Adapter,
    AttentionSite,
    MultiViewModel,
    ProbeSite,
    adapter_for_model,
    adapters,
    get_adapter,
    list_adapters,
    patch_tokens,
    pattern_blocks,
    register_adapter,
    view_tokens,
)
from . import dust3r  # noqa: F401  (registers "dust3r")
from . import mast3r  # noqa: F401  (registers "mast3r")
from . import fast3r  # noqa: F401  (registers "fast3r")
from . import vggt  # noqa: F401  (registers "vggt")

__all__ = [
    "Adapter", "AttentionSite", "MultiViewModel", "ProbeSite", "adapter_for_model", "adapters", "get_adapter",
    "list_adapters", "patch_tokens", "pattern_blocks", "register_adapter", "view_tokens",
]
