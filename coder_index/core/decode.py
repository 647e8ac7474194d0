"""Turn any image file into an 8-bit RGB PIL image, or a clear reason why not.

``Image.convert('RGB')`` alone is wrong for several real files: 16-bit PNGs saturate to white,
transparent pixels become black, EXIF-rotated photos stay sideways. Each case is handled here.

A file that gives no image gets one reason per kind of file, read from its bytes rather than from
Pillow's message (which changes between Pillow versions): an empty file, a file whose format is not
recognised, an image whose file stops before its format's end marker (truncated), or a complete
image file whose data cannot be decoded (corrupt). Files and uploads share this code, so the CLI's
errors file and the server give the same reason for the same bytes.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from struct import error as struct_error
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from coder_index.core.choices import IMAGE_EXTENSIONS  # noqa: F401 - re-exported for discovery
from coder_index.core.untrusted import NotARegularFile, open_regular_file

EMPTY = "empty file (0 bytes)"
NOT_AN_IMAGE = "not an image (unrecognised file format)"

# Leading bytes of the formats coder-index reads. A file starting with one is that format, whatever
# its name; its end marker (when the format has one) tells a truncated file from a corrupt one.
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)


class ImageDecodeError(Exception):
    """A file could not be turned into an image; the message is the reason written to errors.csv."""


class ImageTooLarge(ImageDecodeError):
    """An image whose header declares more pixels than the caller accepts (nothing was decoded)."""


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


def load_image(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    """Decode ``path`` fully (truncation shows up here, not later) and return RGB. With
    ``max_pixels``, an image declaring more is refused from its header (``ImageTooLarge``)."""
    try:
        with open_regular_file(path) as fh:
            return _decode(fh, max_pixels)
    except NotARegularFile:
        raise ImageDecodeError("not a regular file (FIFO, socket, device or directory); skipped") from None
    except FileNotFoundError:
        raise ImageDecodeError("file not found (deleted while running?)") from None
    except PermissionError:
        raise ImageDecodeError("permission denied") from None
    except IsADirectoryError:
        raise ImageDecodeError("not a regular file (FIFO, socket, device or directory); skipped") from None
    except OSError as exc:  # a read error of the disk, not of the image's data
        raise ImageDecodeError(f"could not be read: {exc.strerror or exc.__class__.__name__}") from None


def load_image_from(fh: BinaryIO, max_pixels: int | None = None) -> Image.Image:
    """Decode an already opened file (e.g. one opened once and checked, so that what was checked is
    what is decoded) exactly as ``load_image`` decodes a path."""
    return _decode(fh, max_pixels)


def declared_pixels(fh: BinaryIO) -> int:
    """width x height from the image's header, without decoding it (0 when it has none)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(fh) as img:
                return int(img.width) * int(img.height)
    except Exception:  # not an image, or a header Pillow refuses: the decoder will say why
        return 0
    finally:
        fh.seek(0)


def decode_thumbnail(fh: BinaryIO, size: int, max_pixels: int | None = None) -> Image.Image:
    """An RGB image whose longest side is at most ``size``, decoded reduced where the format allows
    (JPEG draft: the DCT scaled by 1/2 to 1/8 while decoding), so that a 36-megapixel photo is never
    whole in memory for a thumbnail; ``max_pixels`` refuses larger images from their header."""
    return _decode(fh, max_pixels, thumbnail=size)


def decode_image_bytes(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Decode an image held in memory (an upload) exactly as ``load_image`` decodes a file. With
    ``max_pixels``, an image declaring more is refused from its header, before any pixel is decoded."""
    return _decode(io.BytesIO(data), max_pixels)


def sniff_format(head: bytes) -> str | None:
    """The format named by a file's first bytes (None: not one coder-index recognises by itself)."""
    for magic, name in _SIGNATURES:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return None


def _size(fh: BinaryIO) -> int:
    try:
        return os.fstat(fh.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
        pos = fh.tell()
        end = fh.seek(0, io.SEEK_END)
        fh.seek(pos)
        return end


def _read_at(fh: BinaryIO, offset: int, n: int) -> bytes:
    fh.seek(max(0, offset))
    return fh.read(n)


def jpeg_has_end_marker(tail: bytes) -> bool:
    """Whether a JPEG's last bytes hold its end-of-image marker (padding after it tolerated): the one
    test of a complete JPEG, for the reasons given here and for the tensor decoder's choice."""
    return tail.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")


def _is_truncated(fmt: str, fh: BinaryIO, size: int) -> bool:
    """Whether the file stops before the end its format declares or marks."""
    head, tail = _read_at(fh, 0, 32), _read_at(fh, size - 64, 64)
    if fmt == "JPEG":
        return not jpeg_has_end_marker(tail)
    if fmt == "PNG":
        return b"IEND" not in tail[-12:]
    if fmt == "GIF":
        return not tail.rstrip(b"\x00").endswith(b";")                # the trailer byte
    if fmt == "WebP":
        return len(head) < 12 or int.from_bytes(head[4:8], "little") + 8 > size
    if fmt == "BMP":
        return len(head) < 6 or int.from_bytes(head[2:6], "little") > size
    if fmt == "TIFF":
        return _tiff_data_end(fh, head) > size
    return False


_TIFF_TYPE_SIZE = {3: 2, 4: 4, 16: 8}  # SHORT, LONG, LONG8: the types of offsets and byte counts


def _tiff_data_end(fh: BinaryIO, head: bytes) -> float:
    """Where the first image's last strip or tile ends, from its IFD (inf: the IFD itself is cut)."""
    order = "little" if head[:2] == b"II" else "big"
    ifd = int.from_bytes(head[4:8], order)
    count_raw = _read_at(fh, ifd, 2)
    if len(count_raw) < 2:
        return float("inf")
    n = int.from_bytes(count_raw, order)
    entries = _read_at(fh, ifd + 2, 12 * n)
    if len(entries) < 12 * n:
        return float("inf")
    values: dict[int, list[int]] = {}
    for e in range(n):
        tag, typ, count = (int.from_bytes(entries[12 * e + a:12 * e + b], order) for a, b in ((0, 2), (2, 4), (4, 8)))
        if tag not in (273, 279, 324, 325) or typ not in _TIFF_TYPE_SIZE:
            continue
        width = _TIFF_TYPE_SIZE[typ]
        raw = entries[12 * e + 8:12 * e + 12]
        if count * width > 4:
            raw = _read_at(fh, int.from_bytes(raw, order), count * width)
            if len(raw) < count * width:
                return float("inf")
        values[tag] = [int.from_bytes(raw[i * width:(i + 1) * width], order) for i in range(count)]
    offsets, counts = values.get(273) or values.get(324) or [], values.get(279) or values.get(325) or []
    return max((o + c for o, c in zip(offsets, counts, strict=False)), default=ifd + 2 + 12 * n)


def failure_reason(fh: BinaryIO, pil_format: str | None = None) -> str:
    """The reason a file that Pillow could not decode gives no image, from its bytes alone."""
    size = _size(fh)
    if size == 0:
        return EMPTY
    fmt = sniff_format(_read_at(fh, 0, 16)) or pil_format
    if fmt is None:
        return NOT_AN_IMAGE
    if _is_truncated(fmt, fh, size):
        return f"truncated {fmt} image (the file ends before the image data does)"
    return f"corrupt {fmt} image (the image data cannot be decoded)"


def _decode(fh: BinaryIO, max_pixels: int | None = None, thumbnail: int | None = None) -> Image.Image:
    """The one decoder: header checks, full decode (or, for a ``thumbnail`` of that many pixels on
    its longest side, a reduced one), EXIF orientation, 8-bit RGB; every failure a reason."""
    pil_format = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Pillow's notes on odd files: the reason comes below
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fh) as img:
                pil_format = img.format
                if max_pixels is not None and img.width * img.height > max_pixels:
                    raise ImageTooLarge(f"image of {img.width} x {img.height} pixels is larger than the "
                                        f"{max_pixels:,} pixels accepted; send a smaller image")
                if thumbnail is not None:
                    img.draft("RGB", (thumbnail, thumbnail))  # JPEG only; a no-op elsewhere
                img.load()
                if getattr(img, "is_animated", False):
                    img.seek(0)
                img = ImageOps.exif_transpose(img)
                if thumbnail is not None:
                    img.thumbnail((thumbnail, thumbnail))
                return to_rgb(img)
    except ImageTooLarge:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge(f"image too large to decode safely (more than {Image.MAX_IMAGE_PIXELS:,} pixels)") \
            from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, MemoryError, IndexError,
            TypeError, KeyError, ZeroDivisionError, struct_error):
        # Pillow's message differs between versions and decoders; the reason comes from the bytes
        raise ImageDecodeError(failure_reason(fh, pil_format)) from None
