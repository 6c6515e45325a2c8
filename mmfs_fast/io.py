"""Image files in and out (SPEC §1).

Loading: any PIL-readable file, PIL image or numpy array → RGB → LANCZOS resize to
the model size → ``x / 127.5 - 1`` as a (3, H, W) float tensor. Modes are mapped to
RGB as follows: transparency (RGBA, LA, palette with a transparent colour) is
composited on white, since face crops with a cut-out background look most natural
on a plain light one; CMYK, grayscale, 1-bit and palette images go through PIL's
conversion; 16-bit images (I;16*, and 32-bit integer images, which PNG/TIFF
readers use for 16-bit data) are scaled by 255/65535 rather than clipped; the EXIF
orientation of photos is applied. Non-square images are resized, not cropped: give
aligned face crops.

Saving: a [-1, 1] tensor → ``clamp(x·0.5 + 0.5, 0, 1)·255``, rounded → 8-bit RGB PNG.

Every failure is an :class:`ImageError` naming the file and what is wrong with it.
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from mmfs_fast import atomic
from mmfs_fast.errors import ImageError, option

# Larger images are rejected before decoding (decompression bombs); override per
# call or with the environment variable below.
DEFAULT_MAX_PIXELS = 50_000_000
MAX_PIXELS_ENV = "MMFS_FAST_MAX_PIXELS"

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_WHITE = (255, 255, 255)


def max_pixels_limit(max_pixels: int | None = None) -> int:
    """The pixel limit in force: the argument, else $MMFS_FAST_MAX_PIXELS, else the default."""
    if max_pixels is not None:
        return max_pixels
    value = os.environ.get(MAX_PIXELS_ENV)
    if value is None:
        return DEFAULT_MAX_PIXELS
    try:
        return int(value)
    except ValueError:
        raise ImageError(f"${MAX_PIXELS_ENV} must be an integer, got {value!r}") from None


def _describe(src) -> str:
    return str(src) if isinstance(src, (str, os.PathLike)) else f"<{type(src).__name__}>"


def _check_pixels(width: int, height: int, name: str, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageError(f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of "
                         f"{max_pixels} (raise it with {option('max_pixels')} or ${MAX_PIXELS_ENV})")
    if width == 0 or height == 0:
        raise ImageError(f"{name}: empty image ({width}x{height})")


def _open_file(path: Path, max_pixels: int) -> Image.Image:
    if path.is_dir():
        raise ImageError(f"{path}: is a directory")
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    try:
        # our own limit (checked before decoding) replaces PIL's decompression-bomb warning
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file (unrecognised format)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: exceeds PIL's decompression-bomb limit ({e})") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot be read ({e.strerror or e})") from None
    except Exception as e:  # PIL's parsers raise ValueError, SyntaxError, struct.error … on malformed headers
        raise ImageError(f"{path}: corrupt image header ({type(e).__name__}: {e})") from None
    try:
        _check_pixels(img.width, img.height, str(path), max_pixels)
    except ImageError:
        img.close()
        raise
    try:
        img.load()
    except Exception as e:  # as above, for the image data
        img.close()
        raise ImageError(f"{path}: corrupt or truncated image ({type(e).__name__}: {e})") from None
    return img


def _from_array(a: np.ndarray) -> Image.Image:
    """(H, W), (H, W, 1|3|4) arrays: uint8, uint16 (scaled) or float in [0, 1]."""
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ImageError(f"array of shape {a.shape}: expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
    if a.dtype == np.uint16:
        a = _scale_16_bit(a)
    elif a.dtype.kind == "f":
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise ImageError("float array: values must be finite and in [0, 1]")
        a = np.rint(a * 255).astype(np.uint8)
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        raise ImageError(f"array of dtype {a.dtype}: expected uint8, uint16, bool or float in [0, 1]")
    return Image.fromarray(np.ascontiguousarray(a))


def _scale_16_bit(a: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(a.astype(np.float64), 0, 65535) * (255 / 65535)).astype(np.uint8)


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    img = ImageOps.exif_transpose(img)
    if img.mode in _SIXTEEN_BIT_MODES:
        img = Image.fromarray(_scale_16_bit(np.asarray(img)))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode == "F":
        raise ImageError(f"{name}: 32-bit floating-point images are not supported; save it as 8 or 16 bit")
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise ImageError(f"{name}: cannot convert mode {img.mode} to RGB ({e})") from None


def open_rgb(src, max_pixels: int | None = None) -> Image.Image:
    """A path, PIL image or numpy array as an RGB PIL image of its own size."""
    limit = max_pixels_limit(max_pixels)
    name = _describe(src)
    if isinstance(src, (str, os.PathLike)):
        img = _open_file(Path(src), limit)
    elif isinstance(src, (Image.Image, np.ndarray)):
        img = src if isinstance(src, Image.Image) else _from_array(src)
        _check_pixels(img.width, img.height, name, limit)
    else:
        raise ImageError(f"{name}: expected a file path, PIL image or numpy array")
    try:
        return _to_rgb(img, name)
    except ImageError:
        raise
    except Exception as e:  # a malformed EXIF block or a mode PIL cannot convert
        raise ImageError(f"{name}: cannot be converted to RGB ({type(e).__name__}: {e})") from None


def pil_to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """RGB PIL image → (3, size, size) float32 tensor in [-1, 1]."""
    if img.size != (size, size):
        img = img.resize((size, size), Image.LANCZOS)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())
    return (x / 127.5 - 1).permute(2, 0, 1).contiguous()


def load_image(src, size: int = 512, max_pixels: int | None = None) -> torch.Tensor:
    """A path, PIL image or numpy array → (3, size, size) float32 tensor in [-1, 1]."""
    return pil_to_tensor(open_rgb(src, max_pixels), size)


def to_pil(x: torch.Tensor) -> Image.Image:
    """A (3, H, W) or (1, 3, H, W) tensor in [-1, 1] → 8-bit RGB PIL image."""
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"expected an image tensor (3, H, W), got shape {tuple(x.shape)}")
    pixels = (x.detach().float().cpu() * 0.5 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def save_image(x: torch.Tensor, path) -> Path:
    """Write a [-1, 1] image tensor as a PNG, atomically (parent folders are created)."""
    return atomic.save_pil(to_pil(x), path)


def image_grid(images: list[torch.Tensor], columns: int) -> torch.Tensor:
    """Tile equally sized (3, H, W) images row by row; empty cells stay black (-1)."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    c, h, w = images[0].shape
    rows = math.ceil(len(images) / columns)
    grid = torch.full((c, rows * h, columns * w), -1.0)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        grid[:, r * h:(r + 1) * h, col * w:(col + 1) * w] = img.detach().float().cpu()
    return grid
