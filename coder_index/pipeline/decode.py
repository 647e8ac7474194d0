"""Turn any image file into an 8-bit RGB PIL image, or a clear reason why not.

``Image.convert('RGB')`` alone is wrong for several real files: 16-bit PNGs saturate to white,
transparent pixels become black, EXIF-rotated photos stay sideways. Each case is handled here.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..choices import IMAGE_EXTENSIONS  # noqa: F401 - re-exported for discovery
from ..untrusted import NotARegularFile, open_regular_file


class ImageDecodeError(Exception):
    """A file could not be turned into an image; the message is the reason written to errors.csv."""


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB view of any PIL mode (I;16, I, F, CMYK, LA, RGBA, P with transparency, ...)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # CLIP saw photos, not black voids
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def load_image(path: str | Path) -> Image.Image:
    """Decode ``path`` fully (truncation shows up here, not later) and return RGB."""
    try:
        with open_regular_file(path) as fh:
            return _decode(fh)
    except NotARegularFile:
        raise ImageDecodeError("not a regular file (FIFO, socket, device or directory); skipped") from None
    except FileNotFoundError:
        raise ImageDecodeError("file not found (deleted while running?)") from None
    except PermissionError:
        raise ImageDecodeError("permission denied") from None
    except OSError as exc:
        raise _os_error(exc) from None


class ImageTooLarge(ImageDecodeError):
    """An image whose header declares more pixels than the caller accepts (nothing was decoded)."""


def decode_image_bytes(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Decode an image held in memory (an upload) exactly as ``load_image`` decodes a file. With
    ``max_pixels``, an image declaring more is refused from its header, before any pixel is decoded."""
    try:
        return _decode(io.BytesIO(data), max_pixels)
    except OSError as exc:
        raise _os_error(exc) from None


def _decode(fh: BinaryIO, max_pixels: int | None = None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fh) as img:
                if max_pixels is not None and img.width * img.height > max_pixels:
                    raise ImageTooLarge(f"image of {img.width} x {img.height} pixels is larger than the "
                                        f"{max_pixels:,} pixels accepted; send a smaller image")
                img.load()
                if getattr(img, "is_animated", False):
                    img.seek(0)
                img = ImageOps.exif_transpose(img)
                return to_rgb(img)
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image (unrecognised file format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"image too large to decode safely: {exc}") from None
    except (ValueError, SyntaxError, EOFError, MemoryError) as exc:
        raise ImageDecodeError(f"corrupt image: {exc.__class__.__name__}: {exc}") from None


def _os_error(exc: OSError) -> ImageDecodeError:
    msg = str(exc) or exc.__class__.__name__
    if "truncated" in msg:
        return ImageDecodeError(f"truncated image: {msg}")
    return ImageDecodeError(f"corrupt image: {msg}")
