"""Real captures on disk: a directory of views grouped into pairs/tuples by ``index.json``.

Layout (paths in the index are view *stems*, relative to the root, without extension)::

    capture/
      index.json                {"format": "mv-interp-capture", "version": 1,
                                 "tuples": [["kitchen/0001", "kitchen/0002"], ...]}
      kitchen/
        0001.jpg                RGB image (.png, .jpg or .jpeg)
        0001.depth.npy          z-depth in metres, float32 [H, W]; 0/NaN/inf = no depth
                                (or .depth.png: uint16 millimetres, or .depth.exr: float)
        0001.json               {"intrinsics": 3x3 K, "cam2world": 4x4 OpenCV camera-to-world}
        0001.mask.png           optional valid mask (non-zero = valid), same size as the image
        0002.jpg ...

K uses the pixel-centre convention of the data format: pixel ``(u, v)`` (column, row)
looks along ``K⁻¹ [u, v, 1]``. The loader resizes and crops each view to the model's input
size the way :mod:`mv_interp.images` does (224: short side to 224, centre square; other
sizes: long side to ``size``, centre crop to multiples of 16), resampling depth and mask by
nearest neighbour and adjusting K, then crops the views of a tuple to their common size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError
from ..images import _resize_long_side, crop_box, to_image, to_tensor
from ..loading import atomic_write
from .geometry import complete_view, crop_intrinsics, resize_intrinsics

INDEX = "index.json"
FORMAT = "mv-interp-capture"
VERSION = 1
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
#: largest distance of the principal point from the image centre, as a fraction of the image size
PRINCIPAL_POINT_TOLERANCE = 0.2
DEPTH_EXTS = (".depth.npy", ".depth.exr", ".depth.png")


class CaptureError(UserError):
    """Bad data in a capture directory; the message names the file and the problem."""


class MissingFileError(CaptureError, FileNotFoundError):
    """A file a capture needs is not there."""


@dataclass
class RawView:
    """One view as stored, validated but not resized."""

    image: np.ndarray  # uint8 [H, W, 3]
    depth: np.ndarray  # float32 [H, W], 0 where invalid
    valid: np.ndarray  # bool [H, W]
    intrinsics: np.ndarray  # float64 [3, 3]
    cam2world: np.ndarray  # float64 [4, 4]
    stem: Path


# --------------------------------------------------------------------------------------
# Reading and validating
# --------------------------------------------------------------------------------------


def read_index(root: str | os.PathLike) -> list[tuple[str, ...]]:
    """The tuples of view stems listed in ``root/index.json``."""
    path = Path(root) / INDEX
    if not path.is_file():
        raise MissingFileError(f"{path}: no index file; a capture directory needs {INDEX} listing its tuples "
                               f"(see docs/data.md), e.g. {{\"format\": \"{FORMAT}\", \"version\": 1, "
                               "\"tuples\": [[\"scene/0001\", \"scene/0002\"]]}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CaptureError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, dict):
        if data.get("format", FORMAT) != FORMAT:
            raise CaptureError(f"{path}: \"format\" is {data['format']!r}, not {FORMAT!r}; this is not an mv_interp "
                               "capture index (see docs/data.md)")
        if data.get("version", VERSION) != VERSION:
            raise CaptureError(f"{path}: index version {data['version']!r} is not supported (this mv_interp reads "
                               f"version {VERSION}); upgrade mv_interp or rewrite the index")
    tuples = data.get("tuples") if isinstance(data, dict) else None
    if not isinstance(tuples, list) or not all(isinstance(t, list) and len(t) >= 2 and all(isinstance(s, str) for s in t)
                                               for t in tuples):
        raise CaptureError(f"{path}: \"tuples\" must be a list of lists of at least 2 view stems (strings)")
    for t in tuples:
        for stem in t:
            check_stem(root, stem)
    return [tuple(t) for t in tuples]


def check_stem(root: str | os.PathLike, stem: str) -> Path:
    """``root/stem``, refusing stems that are absolute or climb out of the capture root."""
    parts = Path(stem).parts
    if not stem or Path(stem).is_absolute() or ".." in parts or "\\" in stem:
        raise CaptureError(f"{Path(root) / INDEX}: view stem {stem!r} must be a relative path inside the capture "
                           "root (no leading '/', no '..'), e.g. 'kitchen/0001'")
    path = Path(root) / stem
    if not path.parent.resolve().is_relative_to(Path(root).resolve()):
        raise CaptureError(f"{Path(root) / INDEX}: view stem {stem!r} leads outside the capture root "
                           f"{Path(root)} (through a symbolic link); copy the files into the capture instead")
    return path


def _find(stem: Path, exts: Sequence[str], what: str, required: bool = True) -> Path | None:
    for ext in exts:
        p = stem.parent / (stem.name + ext)
        if p.is_file():
            return p
    if required:
        raise MissingFileError(f"{stem}{exts[0]}: missing {what} (looked for {', '.join(stem.name + e for e in exts)} "
                               f"in {stem.parent})")
    return None


def read_exr(path: str | os.PathLike) -> np.ndarray:
    """First channel of an EXR file as float32 ``[H, W]``, with whichever reader is importable
    (OpenEXR, OpenCV, or imageio with the FreeImage plugin)."""
    path = Path(path)
    try:
        import OpenEXR
    except ImportError:
        OpenEXR = None
    if OpenEXR is not None and hasattr(OpenEXR, "File"):
        try:
            with OpenEXR.File(str(path)) as f:
                channels = f.channels()
                for name in ("Y", "Z", "depth", "R", "RGB", "RGBA", *channels):
                    if name in channels:
                        arr = np.asarray(channels[name].pixels, dtype=np.float32)
                        return arr[..., 0] if arr.ndim == 3 else arr
        except Exception as e:  # noqa: BLE001 - the bindings raise plain RuntimeError/OSError
            raise CaptureError(f"{path}: cannot read EXR depth ({e})") from None
    try:
        os.environ.setdefault("OPENCV_IO_ENABLE_OPENEXR", "1")  # OpenCV reads EXR only when asked to
        import cv2
    except ImportError:
        cv2 = None
    if cv2 is not None:
        arr = cv2.imread(str(path), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
        if arr is None:
            raise CaptureError(f"{path}: OpenCV cannot read this EXR file (is OPENCV_IO_ENABLE_OPENEXR=1 set "
                               "before cv2 is first imported?)")
        arr = np.asarray(arr, dtype=np.float32)
        return arr[..., 0] if arr.ndim == 3 else arr
    try:
        import imageio.v2 as imageio
    except ImportError:
        imageio = None
    if imageio is not None:
        try:
            arr = np.asarray(imageio.imread(str(path), format="EXR-FI"), dtype=np.float32)
        except Exception as e:  # noqa: BLE001
            raise CaptureError(f"{path}: imageio cannot read EXR ({e}); pip install OpenEXR") from None
        return arr[..., 0] if arr.ndim == 3 else arr
    raise ImportError(f"reading {path} needs an EXR reader and none is installed: pip install OpenEXR "
                      "(or opencv-python, or imageio with its FreeImage plugin)")


def read_depth(path: Path) -> np.ndarray:
    """Depth in metres, float32 ``[H, W]`` (``.npy`` float metres, ``.png`` uint16 millimetres, ``.exr``)."""
    name = path.name
    try:
        if name.endswith(".npy"):
            arr = np.load(path, allow_pickle=False)
            if not np.issubdtype(arr.dtype, np.floating):
                raise CaptureError(f"{path}: depth .npy must hold floats in metres, got dtype {arr.dtype}")
        elif name.endswith(".png"):
            from PIL import Image

            arr = np.asarray(Image.open(path))
            if arr.dtype != np.uint16 and arr.dtype != np.int32:
                raise CaptureError(f"{path}: depth .png must be 16-bit (millimetres), got {arr.dtype}")
            arr = arr.astype(np.float32) / 1000.0
        else:
            arr = read_exr(path)
    except (CaptureError, ImportError):
        raise
    except Exception as e:  # noqa: BLE001 - numpy/PIL raise many types on corrupt files
        raise CaptureError(f"{path}: cannot read depth ({e})") from None
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise CaptureError(f"{path}: depth must be a 2D [H, W] map, got shape {arr.shape}")
    return arr


def check_camera(K: np.ndarray, cam2world: np.ndarray, height: int, width: int, where: str) -> None:
    """Raise :class:`CaptureError` unless K and cam2world are a valid pinhole camera for an
    image of ``height × width`` (finite, zero bottom rows, proper orthonormal rotation, positive
    focal lengths, principal point inside the image)."""
    if K.shape != (3, 3) or cam2world.shape != (4, 4):
        raise CaptureError(f"{where}: intrinsics must be 3x3 and cam2world 4x4, got {K.shape} and {cam2world.shape}")
    if not (np.isfinite(K).all() and np.isfinite(cam2world).all()):
        raise CaptureError(f"{where}: camera contains NaN or inf")
    if not np.allclose(cam2world[3], [0, 0, 0, 1], atol=1e-6):
        raise CaptureError(f"{where}: cam2world's last row must be [0, 0, 0, 1], got {cam2world[3].tolist()}")
    R = cam2world[:3, :3]
    err = np.abs(R.T @ R - np.eye(3)).max()
    if err > 1e-3:
        raise CaptureError(f"{where}: cam2world rotation is not orthonormal (max |RᵀR − I| = {err:.3g}); "
                           "store a rigid camera-to-world transform (no scale or shear)")
    if np.linalg.det(R) < 0:
        raise CaptureError(f"{where}: cam2world rotation has determinant −1 (a reflection); "
                           "check the axis convention (OpenCV: x right, y down, z forward)")
    if not np.allclose(K[2], [0, 0, 1], atol=1e-6) or abs(K[1, 0]) > 1e-6:
        raise CaptureError(f"{where}: intrinsics must look like [[fx, s, cx], [0, fy, cy], [0, 0, 1]], "
                           f"got {K.tolist()}")
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        raise CaptureError(f"{where}: focal lengths must be positive, got fx={K[0, 0]}, fy={K[1, 1]}")
    cx, cy = K[0, 2], K[1, 2]
    if not (-0.5 <= cx <= width - 0.5 and -0.5 <= cy <= height - 0.5):
        raise CaptureError(f"{where}: principal point ({cx:.1f}, {cy:.1f}) lies outside the {width}x{height} image; "
                           "are the intrinsics for another resolution?")
    # K of a 2x (0.5x) resolution puts the principal point at the image's edge (a quarter in): a
    # real camera's lies near the centre, and centre crops keep it there
    off_x, off_y = abs(cx - (width - 1) / 2) / width, abs(cy - (height - 1) / 2) / height
    if max(off_x, off_y) > PRINCIPAL_POINT_TOLERANCE:
        raise CaptureError(
            f"{where}: principal point ({cx:.1f}, {cy:.1f}) is {100 * max(off_x, off_y):.0f}% of the image size away "
            f"from the centre of the {width}x{height} image (at most {100 * PRINCIPAL_POINT_TOLERANCE:.0f}% is "
            "accepted); the intrinsics are probably for another resolution: scale K with the image"
        )


def check_depth(depth: np.ndarray, valid: np.ndarray | None, where: str) -> np.ndarray:
    """Validity mask of a depth map; raises where depth marked valid is not finite and positive,
    or where depth is negative (a point behind the camera)."""
    finite = np.isfinite(depth)
    if valid is not None:
        bad = valid & ~(finite & (depth > 0))
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise CaptureError(f"{where}: {int(bad.sum())} pixel(s) marked valid by the mask have non-finite or "
                               f"non-positive depth (first at row {r}, column {c}: {depth[r, c]})")
        return valid.copy()
    negative = finite & (depth < 0)
    if negative.any():
        r, c = np.argwhere(negative)[0]
        raise CaptureError(f"{where}: {int(negative.sum())} pixel(s) have negative depth (first at row {r}, column "
                           f"{c}: {depth[r, c]}); store 0 (or NaN) where there is no depth")
    return finite & (depth > 0)


def read_view(root: str | os.PathLike, stem: str) -> RawView:
    """Read and validate one view (raises :class:`CaptureError` naming the offending file)."""
    from PIL import Image

    base = check_stem(root, stem)
    img_path = _find(base, IMAGE_EXTS, "image")
    depth_path = _find(base, DEPTH_EXTS, "depth map")
    cam_path = _find(base, (".json",), "camera file")
    mask_path = _find(base, (".mask.png",), "mask", required=False)
    try:
        image = np.asarray(Image.open(img_path).convert("RGB"))
    except Exception as e:  # noqa: BLE001
        raise CaptureError(f"{img_path}: cannot read image ({e})") from None
    H, W = image.shape[:2]
    depth = read_depth(depth_path)
    if depth.shape != (H, W):
        raise CaptureError(f"{depth_path}: depth is {depth.shape[1]}x{depth.shape[0]} (WxH) but the image "
                           f"{img_path.name} is {W}x{H}; they must match pixel for pixel")
    mask = None
    if mask_path is not None:
        try:
            mask = np.asarray(Image.open(mask_path).convert("L")) > 0
        except Exception as e:  # noqa: BLE001
            raise CaptureError(f"{mask_path}: cannot read mask ({e})") from None
        if mask.shape != (H, W):
            raise CaptureError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but the image is {W}x{H}")
    valid = check_depth(depth, mask, str(depth_path) + (f" (mask {mask_path.name})" if mask_path else ""))
    if not valid.any():
        raise CaptureError(f"{depth_path}: the view has no valid pixel (every depth is 0, NaN or inf"
                           + (f", or the mask {mask_path.name} is empty" if mask_path else "")
                           + "); it cannot supervise anything: fix the depth map or drop the view from index.json")
    try:
        cam = json.loads(cam_path.read_text())
        K = np.asarray(cam["intrinsics"], dtype=np.float64)
        c2w = np.asarray(cam["cam2world"], dtype=np.float64)
    except json.JSONDecodeError as e:
        raise CaptureError(f"{cam_path}: not valid JSON ({e})") from None
    except (KeyError, TypeError) as e:
        raise CaptureError(f"{cam_path}: needs \"intrinsics\" (3x3) and \"cam2world\" (4x4) entries ({e!r} missing "
                           "or malformed)") from None
    except ValueError as e:
        raise CaptureError(f"{cam_path}: intrinsics / cam2world are not numeric matrices ({e})") from None
    check_camera(K, c2w, H, W, str(cam_path))
    return RawView(image=image, depth=np.where(valid, depth, 0).astype(np.float32), valid=valid, intrinsics=K,
                   cam2world=c2w, stem=base)


# --------------------------------------------------------------------------------------
# Resizing to the model's input
# --------------------------------------------------------------------------------------


def _nearest(arr: np.ndarray, new_w: int, new_h: int) -> np.ndarray:
    """Nearest-neighbour resize with pixel-centre alignment (never mixes depths across edges)."""
    H, W = arr.shape[:2]
    rows = np.minimum(((np.arange(new_h) + 0.5) * H / new_h).astype(np.int64), H - 1)
    cols = np.minimum(((np.arange(new_w) + 0.5) * W / new_w).astype(np.int64), W - 1)
    return arr[rows[:, None], cols[None, :]]


def prepare_view(raw: RawView, size: int = 224, square_ok: bool = False, patch: int = 16
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Resize + crop one view as :func:`mv_interp.images.prepare_image` does; returns
    ``img [3, H, W]`` in [-1, 1], ``depth [H, W]``, ``valid [H, W]`` and the adjusted ``K``."""
    from PIL import Image

    img = Image.fromarray(raw.image)
    W0, H0 = img.size
    long_side = round(size * max(W0 / H0, H0 / W0)) if size == 224 else size
    if max(W0, H0) != long_side:
        img = _resize_long_side(img, long_side)
    W1, H1 = img.size
    box = crop_box(W1, H1, size=size, square_ok=square_ok, patch=patch)
    img = img.crop(box)
    depth = _nearest(raw.depth, W1, H1) if (W1, H1) != (W0, H0) else raw.depth
    valid = _nearest(raw.valid, W1, H1) if (W1, H1) != (W0, H0) else raw.valid
    left, top, right, bottom = box
    depth, valid = depth[top:bottom, left:right], valid[top:bottom, left:right]
    K = torch.from_numpy(raw.intrinsics).to(torch.float64)
    K = crop_intrinsics(resize_intrinsics(K, W1 / W0, H1 / H0), left, top).to(torch.float32)
    return (to_tensor(img), torch.from_numpy(np.ascontiguousarray(depth, dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(valid)), K)


def _center_crop(img, depth, valid, K, h, w):
    H, W = depth.shape
    top, left = (H - h) // 2, (W - w) // 2
    return (img[:, top:top + h, left:left + w], depth[top:top + h, left:left + w], valid[top:top + h, left:left + w],
            crop_intrinsics(K, left, top))


def load_tuple(root: str | os.PathLike, stems: Sequence[str], size: int = 224, square_ok: bool = False
               ) -> list[dict[str, Tensor]]:
    """Load a tuple of views (view 1 first) at the model's input size, as unbatched view dicts
    of the data format (``img [3, H, W]``, ``depth [H, W]``, ..., ``pts3d [H, W, 3]`` in view 1's frame)."""
    raws = [read_view(root, s) for s in stems]
    prepared = [prepare_view(raw, size, square_ok) for raw in raws]
    raws_c2w = [torch.from_numpy(raw.cam2world) for raw in raws]
    h = min(p[1].shape[0] for p in prepared)
    w = min(p[1].shape[1] for p in prepared)
    prepared = [_center_crop(*p, h, w) for p in prepared]
    ref = raws_c2w[0].to(torch.float32)[None]
    views = []
    for (img, depth, valid, K), c2w in zip(prepared, raws_c2w):
        v = complete_view(img[None], depth[None], valid[None], K[None], c2w.to(torch.float32)[None], ref)
        views.append({k: t[0] for k, t in v.items()})
    return views


class CaptureDataset(torch.utils.data.Dataset):
    """The tuples of a capture directory as samples (lists of unbatched view dicts).

    >>> ds = CaptureDataset("my_capture", size=224)
    >>> loader = torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=collate_views)
    """

    def __init__(self, root: str | os.PathLike, size: int = 224, square_ok: bool = False):
        self.root = Path(root)
        self.size = size
        self.square_ok = square_ok
        self.tuples = read_index(self.root)

    def __len__(self) -> int:
        return len(self.tuples)

    def __getitem__(self, i: int) -> list[dict[str, Tensor]]:
        return load_tuple(self.root, self.tuples[i], self.size, self.square_ok)


def check_capture(root: str | os.PathLike) -> dict[str, int]:
    """Validate every view of a capture directory (raises at the first problem); returns counts."""
    tuples = read_index(root)
    stems = sorted({s for t in tuples for s in t})
    for s in stems:
        read_view(root, s)
    return {"tuples": len(tuples), "views": len(stems)}


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def _write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_view(root: Path, stem: str, image: np.ndarray | None, depth: np.ndarray, valid: np.ndarray, K: np.ndarray,
               cam2world: np.ndarray, image_ext: str = ".png") -> None:
    """Write one view's files, each atomically, the camera file last (its presence marks a
    complete view). ``image=None`` leaves the image to the caller."""
    import io

    from PIL import Image

    base = Path(root) / stem
    if image is not None:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG" if image_ext in (".jpg", ".jpeg") else "PNG", quality=95)
        _write_bytes(base.parent / (base.name + image_ext), buf.getvalue())
    buf = io.BytesIO()
    np.save(buf, np.where(valid, depth, 0).astype(np.float32))
    _write_bytes(base.parent / (base.name + ".depth.npy"), buf.getvalue())
    if not valid.all():
        buf = io.BytesIO()
        Image.fromarray(valid.astype(np.uint8) * 255).save(buf, format="PNG")
        _write_bytes(base.parent / (base.name + ".mask.png"), buf.getvalue())
    cam = {"intrinsics": np.asarray(K, dtype=np.float64).tolist(),
           "cam2world": np.asarray(cam2world, dtype=np.float64).tolist()}
    _write_bytes(base.parent / (base.name + ".json"), json.dumps(cam, indent=1).encode())


def update_index(root: str | os.PathLike, tuples: Sequence[Sequence[str]], **meta) -> Path:
    """Add tuples to ``root/index.json`` (created if absent; existing tuples kept, none duplicated)."""
    path = Path(root) / INDEX
    existing = read_index(root) if path.is_file() else []
    data = json.loads(path.read_text()) if path.is_file() else {}
    seen = set(existing)
    merged = list(existing) + [tuple(t) for t in tuples if tuple(t) not in seen]
    data.pop("tuples", None)
    data.update({"format": FORMAT, "version": VERSION, **meta})
    # one tuple per line: readable, and diff-friendly for large indexes
    head = json.dumps(data)[:-1]
    body = ",\n".join("  " + json.dumps(list(t)) for t in merged)
    text = f"{head}{', ' if data else ''}\"tuples\": [\n{body}\n]}}\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def write_capture(views: Sequence[dict[str, Tensor]], root: str | os.PathLike, names: Sequence[str] | None = None,
                  start: int = 0) -> list[tuple[str, ...]]:
    """Save batched views (e.g. from :func:`render_views`) in the capture format.

    Scene ``b`` becomes ``{names[b]}/view{k}.*`` (k = 1, 2, ...) (default names ``scene_{start + b:06d}``), and
    its tuple is added to ``index.json``. Images are stored as 8-bit PNG; depth, K and poses
    exactly. Returns the tuples written.
    """
    root = Path(root)
    B = views[0]["depth"].shape[0]
    names = list(names) if names is not None else [f"scene_{start + b:06d}" for b in range(B)]
    if len(names) != B:
        raise ValueError(f"write_capture: {len(names)} names for {B} scenes")
    tuples = []
    for b in range(B):
        stems = []
        for k, v in enumerate(views, start=1):
            stem = f"{names[b]}/view{k}"
            write_view(root, stem, to_image(v["img"][b]), v["depth"][b].cpu().numpy(), v["valid"][b].cpu().numpy(),
                       v["intrinsics"][b].cpu().double().numpy(), v["cam2world"][b].cpu().double().numpy())
            stems.append(stem)
        tuples.append(tuple(stems))
    update_index(root, tuples)
    return tuples


__all__ = ["CaptureDataset", "CaptureError", "MissingFileError", "RawView", "check_camera", "check_capture", "check_stem",
           "check_depth", "load_tuple", "prepare_view", "read_depth", "read_exr", "read_index", "read_view",
           "update_index", "write_capture", "write_view"]
