"""Recursive discovery of image files, in a stable order.

Only regular files are candidates: a FIFO, socket or device named ``x.jpg`` would block or feed the
decoder garbage, so such entries are skipped and reported. Symbolic links are followed only to
regular files (a dangling link or a link to a FIFO is reported like the FIFO itself). Hidden files
and folders (names starting with '.') are not classified; they are counted in the summary.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
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


@dataclass
class ListedFiles:
    """Image files named one by one (command-line arguments, ``--files-from``), read relative to the
    working directory; a row names each file as given (normalised). ``paths`` may be a stream (the
    lines of a file list): it is read once, as the run goes."""

    paths: Iterable[str]


class RemoteFile(str):
    """A listed image URL: a row named by its public form (``core.remote.public_url``: no credentials)
    that reads its own bytes (with ``core.remote``'s retries) in the decoding workers."""

    __slots__ = ("source", "ext")

    def __new__(cls, source: str) -> RemoteFile:
        from coder_index.core.remote import path_part, public_url

        self = super().__new__(cls, public_url(source))
        self.source = source
        self.ext = os.path.splitext(path_part(source))[1].lower()
        return self

    def __reduce__(self) -> tuple:
        return (RemoteFile, (self.source,))

    def read(self) -> bytes:
        """The image's bytes; a missing one is that file's error row (as a missing listed path is),
        a refusal (401, 403) stops the run."""
        from coder_index.core.decode import ImageDecodeError
        from coder_index.core.remote import RemoteError, fetch_bytes

        try:
            return fetch_bytes(self.source, max_bytes=MAX_REMOTE_IMAGE_BYTES)
        except RemoteError as exc:
            if exc.missing:
                raise ImageDecodeError(str(exc).split(": ", 1)[-1]) from None
            raise


MAX_REMOTE_IMAGE_BYTES = 256 << 20


def walk_listed(paths: Iterable[str], stats: Discovery) -> Iterator[str]:
    """The listed paths that are regular files (or links to one), normalised, each once; what is
    missing or not a regular file goes to ``stats.special`` with the reason (the errors file lists
    it). The extension is not checked: the user named the file. A listed URL is read where it lives
    (``RemoteFile``); its row is its public form."""
    from coder_index.core.remote import is_url, local_path

    seen: set[str] = set()
    for given in paths:
        if not given:
            continue
        if given.startswith("pipe:"):  # a list is data: a command in it is never run
            if given not in seen:
                seen.add(given)
                stats.special.append((given, "skipped: a pipe: command runs only when given as a shard on the "
                                             "command line, never from a file list"))
            continue
        if is_url(given):
            item = RemoteFile(given)
            if str(item) not in seen:
                seen.add(str(item))
                stats.found += 1
                yield item
            continue
        path = os.path.normpath(local_path(given))
        if path in seen:
            continue
        seen.add(path)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            why = "a broken symbolic link" if os.path.islink(path) else "no such file"
            stats.special.append((path, f"skipped: {why}"))
            continue
        except OSError as exc:
            stats.special.append((path, f"skipped: {exc.strerror or exc}"))
            continue
        if stat.S_ISREG(st.st_mode) and path.lower().endswith((".tar", ".tar.gz", ".tgz")):
            stats.special.append((path, "skipped: a webdataset shard, not an image; classify shards given as "
                                        "arguments (classify SHARD.tar ...), not listed in --files-from"))
        elif stat.S_ISREG(st.st_mode):
            stats.found += 1
            yield path
        else:
            stats.special.append((path, f"skipped: {_kind(st.st_mode)}, not a regular file"))


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
