"""Builds an image folder with the awkward files real folders hold."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

GOOD = ["a/red_0.jpg", "a/red_1.jpg", "a/sub/red_2.png", "b/blue_0.jpg", "b/blue_1.bmp",
        "gray.png", "deep16.png", "cmyk.jpg", "rgba.png", "chat_été_猫.jpg", "UPPER.JPG"]
BAD = {"corrupt.jpg": "corrupt", "truncated.jpg": "truncated", "fake.jpg": "not an image"}
OTHER = ["notes.txt"]


def _jpeg_bytes(rng: np.random.Generator, size: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_messy_folder(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("a/sub", "b"):
        (root / sub).mkdir(parents=True, exist_ok=True)

    def rgb(color: tuple[int, int, int]) -> Image.Image:
        arr = np.full((40, 56, 3), color, dtype=np.uint8) + rng.integers(0, 20, (40, 56, 3), dtype=np.uint8)
        return Image.fromarray(arr)

    rgb((200, 20, 20)).save(root / "a/red_0.jpg")
    rgb((210, 30, 10)).save(root / "a/red_1.jpg")
    rgb((190, 10, 30)).save(root / "a/sub/red_2.png")
    rgb((20, 20, 200)).save(root / "b/blue_0.jpg")
    rgb((10, 30, 210)).save(root / "b/blue_1.bmp")
    Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8), mode="L").save(root / "gray.png")
    deep = (rng.integers(20000, 40000, (30, 30))).astype(np.uint16)
    Image.fromarray(deep).save(root / "deep16.png")  # mode I;16
    rgb((120, 200, 40)).convert("CMYK").save(root / "cmyk.jpg")
    rgba = np.dstack([np.full((30, 30, 3), 90, np.uint8), np.tile(np.arange(30, dtype=np.uint8) * 8, (30, 1))])
    Image.fromarray(rgba, mode="RGBA").save(root / "rgba.png")
    rgb((50, 50, 50)).save(root / "chat_été_猫.jpg")
    rgb((70, 80, 90)).save(root / "UPPER.JPG", format="JPEG")

    good = _jpeg_bytes(rng)
    # valid JPEG headers and end marker, scrambled entropy-coded data in between
    (root / "corrupt.jpg").write_bytes(good[:400] + bytes(rng.integers(0, 255, len(good) - 402, dtype=np.uint8))
                                       + b"\xff\xd9")
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "fake.jpg").write_text("this is a text file with a .jpg name\n")
    (root / "notes.txt").write_text("not an image\n")
    (root / ".hidden").mkdir(exist_ok=True)
    rgb((1, 2, 3)).save(root / ".hidden" / "skip.jpg")  # hidden folders are not searched
    return root


def make_colour_classes(root: Path, classes: list[str], splits: dict[str, int], *, tint: int, noise: int,
                        seed: int) -> None:
    """``root/SPLIT/CLASS/J.png``: for each split, that many 32x32 images per class, class i's channel
    i raised by ``tint`` under uniform noise up to ``noise`` (three colour classes a tiny model tells
    apart after a few shots)."""
    rng = np.random.default_rng(seed)
    for split, n in splits.items():
        for i, c in enumerate(classes):
            (root / split / c).mkdir(parents=True)
            for j in range(n):
                base = np.zeros(3)
                base[i] = tint
                arr = np.clip(base + rng.integers(0, noise, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{j}.png")
