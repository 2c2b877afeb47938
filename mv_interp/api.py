"""Top-level entry points."""

from __future__ import annotations

from .loading import BUNDLED_DIR
from .model import check_device, load_model  # noqa: F401 - the top-level entry points, defined with MVModel

__all__ = ["load_model", "check_device", "list_models"]


def list_models() -> list[str]:
    """Names of the models bundled with the package (loadable offline by name)."""
    if not BUNDLED_DIR.is_dir():
        return []
    return sorted(p.name for p in BUNDLED_DIR.iterdir() if (p / "config.json").is_file())
