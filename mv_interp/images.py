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
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from .errors import UserError, WrongTypeError

PathLike = str | os.PathLike
#: how far outside [-1, 1] a pixel may lie before :func:`check_views` warns (resampling overshoot)
RANGE_TOLERANCE = 1e-2


class ImageRangeWarning(UserWarning):
    """Image values outside [-1, 1]: legal, but not what the models were trained on."""


def _is_fake(x: torch.Tensor) -> bool:
    """A fake tensor, or a forward under a fake / dispatch mode (shape inference): no values to read."""
    from torch._subclasses.fake_tensor import is_fake
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return is_fake(x) or _get_current_dispatch_mode() is not None


def check_views(views: Sequence[Any], device: Any = None, patch: int | None = None, where: str = "view",
                values: bool = True) -> None:
    """Raise a :class:`~mv_interp.errors.UserError` unless every view is a float image batch
    ``[batch, 3, H, W]`` with finite values (on ``device`` when given); warn when values fall
    outside [-1, 1].

    Catches the inputs that otherwise run and give a wrong answer (uint8 / 0–255 images,
    NaN pixels) or fail deep inside a convolution (1 channel, channels-last, numpy arrays).
    ``values=False`` checks types and shapes only (no pass over the pixels).
    """
    for i, x in enumerate(views, start=1):
        name = f"{where} {i}"
        if isinstance(x, np.ndarray):
            raise WrongTypeError(
                f"{name} is a numpy array {x.shape} ({x.dtype}); the model takes torch tensors [batch, 3, H, W] in "
                "[-1, 1]: use mv_interp.load_images(files) or torch.from_numpy(a).permute(0, 3, 1, 2) / 127.5 - 1"
            )
        if not isinstance(x, torch.Tensor):
            raise WrongTypeError(f"{name} is a {type(x).__name__}; the model takes image tensors [batch, 3, H, W] "
                                 "in [-1, 1] (see mv_interp.load_images)")
        shape = tuple(x.shape)
        if x.ndim != 4:
            raise UserError(f"{name} has shape {list(shape)}; the model takes [batch, 3, H, W] "
                            "(add a batch axis with x[None])")
        if shape[1] != 3:
            if shape[-1] == 3:
                fix = "it looks channels-last [batch, H, W, 3]: use x.permute(0, 3, 1, 2)"
            elif shape[1] == 1:
                fix = "it has 1 channel (grey): repeat it to RGB with x.expand(-1, 3, -1, -1)"
            else:
                fix = "give RGB images"
            raise UserError(f"{name} has shape {list(shape)} with {shape[1]} channel(s); the model takes "
                            f"[batch, 3, H, W]: {fix}")
        if shape[0] == 0:
            raise UserError(f"{name} holds an empty batch (shape {list(shape)}); give at least one image")
        if not x.is_floating_point():
            raise UserError(
                f"{name} has dtype {x.dtype}; the model takes float images in [-1, 1]. Load files with "
                "mv_interp.load_images, or convert 0-255 pixels with x.float() / 127.5 - 1"
            )
        if patch and (shape[2] % patch or shape[3] % patch):
            raise UserError(f"{name} is {shape[2]}x{shape[3]} (HxW), not a multiple of the patch size ({patch} pixels); "
                            f"crop or resize it (mv_interp.load_images(..., size=...) does)")
        if device is not None and x.device != torch.device(device):
            raise UserError(f"{name} is on {x.device} but the model is on {torch.device(device)}: "
                            "move the images with .to(model.device) (or the model with .to(...))")
        if not values or torch.compiler.is_compiling() or x.device.type == "meta" or _is_fake(x):
            continue  # no values to look at (shape inference: scan, hook_shapes)
        lo, hi = (float(v) for v in torch.aminmax(x.detach().float()))
        if not (np.isfinite(lo) and np.isfinite(hi)):
            bad = int((~torch.isfinite(x)).sum())
            raise UserError(f"{name} has {bad} NaN or infinite pixel value(s); the outputs would be NaN. "
                            "Fix or drop those images")
        if lo < -1 - RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
            hint = (" — it looks like 0-255 pixels: divide by 127.5 and subtract 1 (or use mv_interp.load_images)"
                    if hi > 10 else " — normalise to [-1, 1] (mean 0.5, std 0.5, as mv_interp.load_images does)")
            warnings.warn(f"{name} has values in [{lo:.3g}, {hi:.3g}], outside the [-1, 1] the model was trained "
                          f"on{hint}", ImageRangeWarning, stacklevel=3)
        elif lo >= 0 and hi > 0.5 and x[0].numel() >= 3 * 16 * 16:
            # a photo normalised to [-1, 1] has pixels darker than mid-grey; [0, 1] images have none
            warnings.warn(f"{name} has no negative values ([{lo:.3g}, {hi:.3g}]): it looks like [0, 1] pixels; "
                          "the model takes [-1, 1]: use x * 2 - 1 (or mv_interp.load_images)", ImageRangeWarning,
                          stacklevel=3)


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


def _resize_long_side(img, long_side: int):
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
        img = _resize_long_side(img, round(size * max(W / H, H / W)))
    else:
        img = _resize_long_side(img, size)
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
    if isinstance(images, (str, os.PathLike)):
        raise WrongTypeError(f"load_images takes a list of images; got the single path {str(images)!r}: "
                             "pass [path]")
    if not images:
        raise UserError("load_images needs at least one image")
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
        raise UserError(f"load_images: patch={patch!r} must be a positive integer (16 for every released model)")
    if isinstance(size, bool) or not isinstance(size, int) or size < patch:
        raise UserError(f"load_images: size={size!r} must be an integer of at least one patch ({patch} pixels); "
                        "the usual sizes are 224 and 512")
    views = [to_tensor(prepare_image(im, size, square_ok, patch)) for im in images]
    if not common_shape:
        return views
    h = min(v.shape[-2] for v in views)
    w = min(v.shape[-1] for v in views)
    return torch.stack([center_crop(v, h, w) for v in views])
