"""Image files in, model views out — the way the DUSt3R reference prepares them.

* 224 models: resize the short side to 224, centre-crop a 224×224 square.
* 512 models (any other size): resize the long side to ``size``, centre-crop each side
  down to a multiple of 16 (and a square image to 4:3 unless ``square_ok``).
* Pixels are normalised to [-1, 1] (mean 0.5, std 0.5).

Example::

    >>> views = load_images(["left.jpg", "right.jpg"], size=512)   # [2, 3, H, W]
    >>> out = model(views[0:1], views[1:2])
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

PathLike = str | os.PathLike


def _open(image) -> "Image.Image":  # noqa: F821
    from PIL import Image, ImageOps

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        img = Image.open(path)
        img = ImageOps.exif_transpose(img)
    except Exception as e:  # noqa: BLE001 - PIL raises many types
        raise ValueError(f"cannot read image {path}: {e}") from e
    return img.convert("RGB")


def resize_long_side(img, long_side: int):
    from PIL import Image

    W, H = img.size
    scale = long_side / max(W, H)
    new = (round(W * scale), round(H * scale))
    # downscaling: antialiased Lanczos; upscaling: bicubic (as the reference)
    interp = Image.LANCZOS if scale < 1 else Image.BICUBIC
    return img.resize(new, interp)


def crop_box(width: int, height: int, size: int, square_ok: bool = False, patch: int = 16) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centre crop applied after resizing."""
    cx, cy = width // 2, height // 2
    if size == 224:
        half = min(cx, cy)
        return (cx - half, cy - half, cx + half, cy + half)
    halfw, halfh = ((2 * cx) // patch) * patch // 2, ((2 * cy) // patch) * patch // 2
    if not square_ok and width == height:
        halfh = 3 * halfw // 4
    return (cx - halfw, cy - halfh, cx + halfw, cy + halfh)


def prepare_image(image, size: int = 224, square_ok: bool = False, patch: int = 16) -> "Image.Image":  # noqa: F821
    """Resize and crop a PIL image (or file) as the reference does for ``size``."""
    img = _open(image)
    W, H = img.size
    if size == 224:
        img = resize_long_side(img, round(size * max(W / H, H / W)))
    else:
        img = resize_long_side(img, size)
    return img.crop(crop_box(*img.size, size=size, square_ok=square_ok, patch=patch))


def to_tensor(img) -> Float[Tensor, "3 H W"]:
    """PIL image → float tensor in [-1, 1]."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).mul(2).sub(1).contiguous()


def to_image(t: Float[Tensor, "3 H W"]) -> np.ndarray:
    """Normalised tensor → ``uint8`` array ``[H, W, 3]`` for display."""
    arr = t.detach().float().cpu().add(1).div(2).clamp(0, 1).permute(1, 2, 0).numpy()
    return (arr * 255).round().astype(np.uint8)


def center_crop(t: Tensor, height: int, width: int) -> Tensor:
    H, W = t.shape[-2:]
    top, left = (H - height) // 2, (W - width) // 2
    return t[..., top : top + height, left : left + width]


def load_images(images: Sequence, size: int = 224, square_ok: bool = False, patch: int = 16,
                common_shape: bool = True) -> Float[Tensor, "n 3 H W"] | list[Tensor]:
    """Load files (or PIL images) as model views.

    With ``common_shape`` (default) the views are centre-cropped to their common size so
    they stack into one ``[n, 3, H, W]`` tensor (a portrait and a landscape photo meet at
    their overlap); otherwise a list of ``[3, H, W]`` tensors is returned.
    """
    if not images:
        raise ValueError("load_images needs at least one image")
    views = [to_tensor(prepare_image(im, size, square_ok, patch)) for im in images]
    if not common_shape:
        return views
    h = min(v.shape[-2] for v in views)
    w = min(v.shape[-1] for v in views)
    return torch.stack([center_crop(v, h, w) for v in views])
