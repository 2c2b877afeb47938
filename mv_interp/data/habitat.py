"""Convert DUSt3R's Habitat renders to the capture format.

The Habitat generator of the DUSt3R authors writes, per multi-view sample ``key`` (an
8-digit index) and view ``i`` (from 1): ``{key}_{i}.jpeg`` (RGB), ``{key}_{i}_depth.exr``
(z-depth in metres, one channel) and ``{key}_{i}_camera_params.json`` with
``camera_intrinsics`` (3×3), ``R_cam2world`` (3×3, OpenCV axes) and ``t_cam2world`` (3).
Its intrinsics put the principal point at ``(W/2, H/2)`` — the image centre when pixel
centres sit at half-integers — so by default it is moved by −0.5 px to the data format's
integer pixel-centre convention.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..io import atomic_write
from .capture import CaptureError, MissingFileError, check_camera, check_depth, read_exr, update_index, write_view

_PARAMS = re.compile(r"^(?P<key>.+)_(?P<view>\d+)_camera_params\.json$")


def exr_reader_available() -> bool:
    """Whether :func:`~mv_interp.data.capture.read_exr` has a backend (OpenEXR, OpenCV or imageio)."""
    import importlib.util

    return any(importlib.util.find_spec(m) is not None for m in ("OpenEXR", "cv2", "imageio"))


def find_habitat_tuples(src: str | os.PathLike) -> dict[tuple[str, str], list[int]]:
    """``{(relative dir, key): sorted view numbers}`` of every Habitat sample under ``src``."""
    src = Path(src)
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for path in sorted(src.rglob("*_camera_params.json")):
        m = _PARAMS.match(path.name)
        if m:
            groups[(path.parent.relative_to(src).as_posix(), m["key"])].append(int(m["view"]))
    return {k: sorted(v) for k, v in sorted(groups.items())}


def read_habitat_camera(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(K, cam2world) from a ``*_camera_params.json``."""
    try:
        data = json.loads(path.read_text())
        K = np.asarray(data["camera_intrinsics"], dtype=np.float64)
        R = np.asarray(data["R_cam2world"], dtype=np.float64)
        t = np.asarray(data["t_cam2world"], dtype=np.float64).reshape(-1)
    except json.JSONDecodeError as e:
        raise CaptureError(f"{path}: not valid JSON ({e})") from None
    except (KeyError, TypeError, ValueError) as e:
        raise CaptureError(f"{path}: needs camera_intrinsics (3x3), R_cam2world (3x3) and t_cam2world (3) "
                           f"({e!r})") from None
    if R.shape != (3, 3) or t.shape != (3,):
        raise CaptureError(f"{path}: R_cam2world must be 3x3 and t_cam2world 3 values, got {R.shape} and {t.shape}")
    c2w = np.eye(4)
    c2w[:3, :3], c2w[:3, 3] = R, t
    return K, c2w


def convert_habitat(src: str | os.PathLike, dst: str | os.PathLike, shift_half_pixel: bool = True,
                    progress: bool = False) -> dict[str, int]:
    """Convert every Habitat sample under ``src`` into a capture directory ``dst``.

    Views keep their names (``{dir}/{key}_{i}``); images are copied unchanged; depth is
    written as ``.depth.npy``; each sample with ≥ 2 views becomes one tuple of the index.
    Views already converted are skipped, so an interrupted run resumes. Returns counts.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"Habitat source directory not found: {src}")
    groups = find_habitat_tuples(src)
    if not groups:
        raise CaptureError(f"{src}: no '*_{{i}}_camera_params.json' files found; expected DUSt3R's Habitat layout "
                           "({key}_{i}.jpeg, {key}_{i}_depth.exr, {key}_{i}_camera_params.json)")
    if not exr_reader_available():
        raise ImportError("converting Habitat renders reads their .exr depth maps, and no EXR reader is installed: "
                          "pip install OpenEXR (or opencv-python, or imageio with its FreeImage plugin)")
    from PIL import Image

    items = groups.items()
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="habitat → capture", unit="tuple")
    tuples, skipped, n_views = [], 0, 0
    for (rel, key), numbers in items:
        stems = []
        for i in numbers:
            base = src / rel / f"{key}_{i}"
            stem = f"{rel}/{key}_{i}" if rel != "." else f"{key}_{i}"
            stems.append(stem)
            if (dst / f"{stem}.json").is_file():  # written last: the view is complete
                skipped += 1
                continue
            image_path = next((base.parent / (base.name + e) for e in (".jpeg", ".jpg", ".png")
                               if (base.parent / (base.name + e)).is_file()), None)
            if image_path is None:
                raise MissingFileError(f"{base}.jpeg: missing image of Habitat view {key}_{i}")
            depth_path = base.parent / f"{base.name}_depth.exr"
            if not depth_path.is_file():
                raise MissingFileError(f"{depth_path}: missing depth of Habitat view {key}_{i}")
            K, c2w = read_habitat_camera(base.parent / f"{base.name}_camera_params.json")
            if shift_half_pixel:
                K[0, 2] -= 0.5
                K[1, 2] -= 0.5
            with Image.open(image_path) as im:
                W, H = im.size
            depth = read_exr(depth_path)
            if depth.shape != (H, W):
                raise CaptureError(f"{depth_path}: depth is {depth.shape[1]}x{depth.shape[0]} (WxH) but "
                                   f"{image_path.name} is {W}x{H}")
            valid = check_depth(depth, None, str(depth_path))
            check_camera(K, c2w, H, W, str(base.parent / f"{base.name}_camera_params.json"))
            ext = image_path.suffix.lower()
            out = dst / stem
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(out.parent / (out.name + ext), lambda tmp, p=image_path: Path(tmp).write_bytes(p.read_bytes()))
            write_view(dst, stem, None, depth, valid, K, c2w)
            n_views += 1
        if len(stems) >= 2:
            tuples.append(tuple(stems))
    update_index(dst, tuples, source="dust3r-habitat")
    return {"tuples": len(tuples), "views_written": n_views, "views_skipped": skipped}
