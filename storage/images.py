"""Image decoding that never lies: every image becomes (H, W, 3) uint8 RGB, or a clear error.

Choices (ours, documented in the README too):

- EXIF orientation is applied (``ImageOps.exif_transpose``), so ``images/hw`` and all boxes refer to
  the image as a viewer shows it.
- Transparency (RGBA, LA, PA, palette with a transparent index) is composited on **white**: dropping
  alpha would expose whatever colour the encoder left under transparent pixels (often black or junk).
- 16-bit greyscale (``I;16*``) is scaled by the type's full range, ``v * 255 / 65535``; 32-bit integer
  (``I``) and float (``F``) have no fixed white point, so they are stretched linearly from the image's
  own [min, max] to [0, 255] (a constant image keeps its value, clipped to [0, 255]). Never a clip of
  the raw values, which turns most 16-bit images white.
- Multi-frame files (GIF, TIFF) give their first frame.
- Images with a side below ``min_side`` (default 2, so a 1x1 tracking pixel is an error) and images
  above ``max_pixels`` are errors. PIL's own decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``)
  also applies; its warning is escalated to an error, so the effective limit is the smaller of the two.
- Truncated files are errors: the whole image is decoded up front, and decoding refuses to run while
  ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is True (that setting silently pads missing data with grey).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default MAX_IMAGE_PIXELS (~0.25 GB as RGB)
_WHITE = (255, 255, 255)


class BadImageError(ValueError):
    """An image that cannot be decoded faithfully; ``path`` and ``reason`` say which and why."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 2) -> np.ndarray:
    """Decode ``path`` (a local path or an fsspec URL) to an (H, W, 3) uint8 RGB array.

    Raises :class:`BadImageError` for a missing, empty, truncated, corrupt, too small or too large image.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by other code); vlcache will not decode "
            "images while truncated files would be silently padded with grey. Set it back to False."
        )
    data = _read_bytes(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as img:
                return _decode(img, path, max_pixels, min_side)
        except BadImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadImageError(path, f"too large (PIL decompression-bomb guard): {e}") from None
        except UnidentifiedImageError:
            raise BadImageError(path, "not an image, or a format PIL cannot identify") from None
        except MemoryError:
            raise
        except Exception as e:  # PIL raises OSError, SyntaxError, EOFError, zlib.error... on bad data
            raise BadImageError(path, f"truncated or corrupt image data ({type(e).__name__}: {e})") from None


def _read_bytes(path) -> bytes:
    # Whole-file read: images are small, and it lets one code path serve local files and fsspec URLs.
    if isinstance(path, str) and "://" in path:
        import fsspec

        try:
            with fsspec.open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise BadImageError(path, "file not found") from None
    else:
        p = Path(path)
        if not p.exists():
            raise BadImageError(path, "file not found")
        if not p.is_file():
            raise BadImageError(path, "not a regular file")
        data = p.read_bytes()
    if len(data) == 0:
        raise BadImageError(path, "empty file (0 bytes)")
    return data


def _decode(img: Image.Image, path, max_pixels: int, min_side: int) -> np.ndarray:
    w, h = img.size
    if w * h > max_pixels:
        raise BadImageError(path, f"too large {w}x{h} ({w * h} pixels > max_pixels {max_pixels})")
    if min(w, h) < min_side:
        raise BadImageError(path, f"image too small ({w}x{h}; every side must be >= {min_side} px)")
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    img.load()  # force the full decode now, so truncation is an error here and not grey pixels later
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as e:
        raise BadImageError(path, f"unreadable EXIF orientation ({type(e).__name__}: {e})") from None
    return to_rgb(img, path)


def to_rgb(img: Image.Image, path="<image>") -> np.ndarray:
    """Convert a decoded PIL image of any common mode to (H, W, 3) uint8 RGB (see module docstring)."""
    mode = img.mode
    if mode == "RGB":
        out = img
    elif mode.startswith("I;16") or mode in ("I", "F"):
        return np.repeat(_scale_to_uint8(img, mode, path)[:, :, None], 3, axis=2)
    elif mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "RGB") and "transparency" in img.info):
        out = _on_white(img.convert("RGBA"))
    elif mode == "P":
        out = img.convert("RGBA")
        out = _on_white(out) if out.getextrema()[3][0] < 255 else out.convert("RGB")
    else:  # L, 1, CMYK, YCbCr, LAB, HSV
        try:
            out = img.convert("RGB")
        except (ValueError, OSError) as e:
            raise BadImageError(path, f"unsupported image mode {mode!r}: {e}") from None
    arr = np.asarray(out, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise BadImageError(path, f"mode {mode!r} decoded to shape {arr.shape}, expected (H, W, 3)")
    return np.ascontiguousarray(arr)


def _on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGB", rgba.size, _WHITE)
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _scale_to_uint8(img: Image.Image, mode: str, path) -> np.ndarray:
    if mode.startswith("I;16"):
        # np.asarray understands the byte order of I;16, I;16B and I;16L
        x = np.asarray(img).astype(np.float64)
        return np.rint(x * (255.0 / 65535.0)).astype(np.uint8)
    x = np.asarray(img, dtype=np.float64)
    if not np.isfinite(x).all():
        raise BadImageError(path, f"mode {mode!r} image holds NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if hi == lo:
        return np.full(x.shape, np.clip(lo, 0, 255), dtype=np.uint8)
    return np.rint((x - lo) * (255.0 / (hi - lo))).astype(np.uint8)
