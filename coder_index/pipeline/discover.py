"""Recursive discovery of image files, in a stable order.

Only regular files are candidates: a FIFO, socket or device named ``x.jpg`` would block or feed the
decoder garbage, so such entries are skipped and reported. Symbolic links are followed only to
regular files (a dangling link or a link to a FIFO is reported like the FIFO itself). Hidden files
and folders (names starting with '.') are not classified; they are counted in the summary.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from coder_index.core.decode import IMAGE_EXTENSIONS


@dataclass
class Discovery:
    root: Path
    images: list[str]    # POSIX paths relative to root, sorted (``discover_images``; empty when streaming)
    other_files: int     # files without an image extension (captions, notes, ...), not classified
    hidden: int = 0      # hidden files and folders skipped
    special: list[tuple[str, str]] = field(default_factory=list)  # (relative path, why) of non-regular entries
    found: int = 0       # image files seen (streaming or not)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def walk_images(root: Path, stats: Discovery) -> Iterator[str]:
    """Image paths under ``root`` (relative, POSIX), depth-first with each folder's entries sorted
    (a stable order), as a stream: ten million files are never one list. Only strings are made per
    file (no Path objects); the counts of what was skipped go into ``stats``."""
    def walk(directory: str, rel: str) -> Iterator[str]:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            return
        for e in entries:
            name = e.name
            r = f"{rel}/{name}" if rel else name
            if name.startswith("."):
                stats.hidden += 1
                continue
            try:
                if e.is_dir(follow_symlinks=False):
                    yield from walk(e.path, r)
                    continue
                is_image = os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
                if not is_image:
                    stats.other_files += 1
                    continue
                if e.is_file(follow_symlinks=True):  # regular file, or a link to one
                    stats.found += 1
                    yield r
                else:
                    try:
                        why = _kind(os.stat(e.path).st_mode)
                    except OSError:
                        why = "a broken symbolic link"
                    stats.special.append((r, f"skipped: {why}, not a regular file"))
            except OSError as exc:
                stats.special.append((r, f"skipped: {exc.strerror or exc}"))

    yield from walk(str(root), "")


def read_file_list(source: BinaryIO, null_separated: bool = False) -> Iterator[str]:
    """Paths from a file list, one per line (or NUL-separated, as ``find -print0`` writes them, for
    names holding newlines), streamed; bytes that are not UTF-8 become the surrogate escapes Python
    uses for such file names, so every name on disk can be listed."""
    sep = b"\0" if null_separated else b"\n"
    tail = b""
    for block in iter(lambda: source.read(1 << 20), b""):
        parts = (tail + block).split(sep)
        tail = parts.pop()
        for raw in parts:
            yield _decode_listed(raw, null_separated)
    if tail:
        yield _decode_listed(tail, null_separated)


def _decode_listed(raw: bytes, null_separated: bool) -> str:
    if not null_separated and raw.endswith(b"\r"):  # a list written on Windows
        raw = raw[:-1]
    return os.fsdecode(raw)


def discover_images(root: str | Path) -> Discovery:
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory; pass the folder that holds the images")
    found = Discovery(root, [], 0)
    found.images = list(walk_images(root, found))
    # sorted per directory while walking; a global sort keeps the order independent of nesting
    found.images.sort()
    return found
