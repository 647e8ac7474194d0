"""Recursive discovery of image files, in a stable order."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .decode import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class Discovery:
    root: Path
    images: list[str]    # POSIX paths relative to root, sorted
    other_files: int     # files without an image extension (captions, notes, ...), not classified


def discover_images(root: str | Path) -> Discovery:
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory; pass the folder that holds the images")
    images: list[str] = []
    other = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # .git, .cache, ...
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.startswith("."):
                continue
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                rel = name if rel_dir == "." else os.path.join(rel_dir, name)
                images.append(Path(rel).as_posix())
            else:
                other += 1
    images.sort()
    return Discovery(root, images, other)
