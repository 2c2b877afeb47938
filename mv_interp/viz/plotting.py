"""The one matplotlib bootstrap: headless pyplot and atomic PNG writes.

Every figure mv_interp draws (probes, heads, the report) goes through :func:`pyplot` (the
``Agg`` backend unless the user chose another, so nothing needs a display) and
:func:`save_figure` (written atomically, the figure closed afterwards).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..io import atomic_write

__all__ = ["pyplot", "save_figure"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on a headless backend (``Agg``, unless one was already chosen)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110, tight: bool = False) -> Path:
    """Write ``fig`` as a PNG to ``path`` atomically and close it; ``tight`` crops to the drawn area."""
    plt = pyplot()
    extra = {"bbox_inches": "tight"} if tight else {}
    try:
        return atomic_write(Path(path), lambda p: fig.savefig(p, format="png", dpi=dpi, **extra))
    finally:
        plt.close(fig)
