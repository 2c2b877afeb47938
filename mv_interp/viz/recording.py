"""The 4D view as a rerun recording (``.rrd``): time axis = site, one point cloud per view.

rerun is an optional extra (``pip install "mv-interp[rerun]"``, about 660 MB with pyarrow); without it
everything else works and the HTML viewers show the same frames. Open a recording with
``rerun path/to/file.rrd`` (the viewer ships with rerun-sdk).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..io import atomic_write
from .viewer import Frame, to_numpy

#: how to get the ``.rrd`` files, for messages and pages
RERUN_HINT = 'pip install "mv-interp[rerun]"'


def rerun_available() -> bool:
    """Whether ``rerun`` (rerun-sdk) can be imported, so ``.rrd`` recordings can be written."""
    try:
        import rerun  # noqa: F401
    except ImportError:
        return False
    return True


def write_rerun_recording(path: str | os.PathLike, frames: Sequence[Frame], images: Sequence[np.ndarray],
                          valid: Sequence[np.ndarray] | None = None, gt: Sequence[np.ndarray] | None = None,
                          app_id: str = "mv_interp", view_names: Sequence[str] | None = None) -> Path:
    """Log every frame's pointmaps (coloured by the input images) on a ``site`` timeline and save atomically.

    Entities: ``world/<view>/points`` per frame, ``world/<view>/gt`` (static) and ``images/<view>`` (static).
    Needs the ``rerun`` extra (:func:`rerun_available`).
    """
    try:
        import rerun as rr
    except ImportError:
        raise ImportError(f"writing {Path(path).name} needs rerun-sdk, an optional extra: {RERUN_HINT}") from None

    n_views = len(images)
    names = list(view_names or [f"view{v + 1}" for v in range(n_views)])
    masks = [(to_numpy(valid[v]).astype(bool).reshape(-1) if valid is not None else None) for v in range(n_views)]
    colors = [to_numpy(images[v]).reshape(-1, 3) for v in range(n_views)]

    def pick(v: int, pts) -> tuple[np.ndarray, np.ndarray]:
        p = to_numpy(pts).reshape(-1, 3).astype(np.float32)
        keep = np.isfinite(p).all(-1)
        if masks[v] is not None:
            keep &= masks[v]
        return p[keep], colors[v][keep]

    rec = rr.RecordingStream(app_id)
    rec.log("world", rr.ViewCoordinates.RDF, static=True)  # OpenCV camera frame: x right, y down, z forward
    for v, name in enumerate(names):
        rec.log(f"images/{name}", rr.Image(to_numpy(images[v])), static=True)
        if gt is not None:
            p, _ = pick(v, gt[v])
            rec.log(f"world/{name}/gt", rr.Points3D(p, colors=np.full((len(p), 3), 150, np.uint8), radii=0.003), static=True)
    for i, frame in enumerate(frames):
        rec.set_time("site", sequence=i)
        rec.log("site", rr.TextLog(frame.label))
        for v, name in enumerate(names):
            p, c = pick(v, frame.views[v])
            rec.log(f"world/{name}/points", rr.Points3D(p, colors=c, radii=0.004))
    return atomic_write(path, lambda tmp: rec.save(str(tmp)))
